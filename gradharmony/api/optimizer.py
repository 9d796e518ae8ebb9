"""A drop-in ``torch.optim.Optimizer`` that harmonizes the gradients of K losses.

Two granularities, one pipeline (:mod:`gradharmony.api.pipeline`):

- ``"batch"``: classic PCGrad-style surgery on the K whole-batch gradients
  ``dL_k/dtheta`` (one "sample" of K gradients; a curriculum does not apply).
- ``"sample"``: per-sample harmonization at parameter level with the *term
  decomposition* of DESIGN.md: ``g_{k,b} = d l_{k,b} / dtheta``, the gradient of the loss
  term anchored at sample b (its negatives included). Phase 1 computes the per-sample
  gradients chunk by chunk (``chunk_size`` samples at a time, batched vector-Jacobian
  products), keeping only their B Gram matrices; the rule and the curriculum turn those
  into weights ``w_{k,b}``; phase 2 is one backward of ``c sum_b sum_k w_{k,b} l_{k,b}``
  with ``w`` held constant (``c = 1/B`` by default), which is exactly ``c sum_b w_b^T G_b``.
  Memory is bounded by ``chunk_size * K * P`` (P = number of shared parameters).

Which parameters are harmonized (``shared_only=True``, the default, as in PCGrad's
paper, torchjd's ``mtl_backward`` and LibMTL): a parameter that exactly one loss
reaches is task-specific and keeps its own loss's gradient (times the curriculum's
sample weights, if any); the rule sees and changes only the parameters that two or more
losses reach. ``shared_only=False`` harmonizes every parameter as one long vector.
Leaves that the losses reach but that are not in the wrapped optimizer (a head trained
by a second optimizer) get the plain gradient, as ``backward()`` would give them.

Scale: the K losses are summed (the paper's ``g = sum_k g_k'``; for ``method="sum"``
exactly ``sum(losses).backward()``). Per-sample losses ``(B,)`` are averaged over the
batch by default (``loss_reduction="mean"``: the gradient of ``sum_k l_k.mean()``);
``loss_reduction="sum"`` gives B times that.

Distributed (``torch.distributed`` initialized, ``sync=True``): every gradient is taken
with ``torch.autograd.grad``, so DDP's own all-reduce never runs; the wrapper averages
over ranks itself. At granularity "batch" the K per-loss gradients are averaged
*before* the rule, so every rank applies the same surgery to the global-batch gradients
(the rule is not linear: surgery on local gradients followed by an average is a
different update, and ranks would drift apart), and rank 0's coefficients are broadcast
(a random PCGrad order must not differ between ranks). At granularity "sample" each
sample's gradients live on one rank, so the per-sample rule is local, the curriculum
gathers its scores, and the (linear) combination is averaged over ranks: with equal
local batches this is the one-process result on the global batch.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..engine import core, reference
from ..engine.backends import select_backend
from ..rules import ConflictCurriculum, Rule, get_rule
from ..rules.rules import Sum
from . import pipeline
from .functional import check_losses
from .stats import ConflictStats

__all__ = ["HarmonizedOptimizer"]

GRANULARITIES = ("batch", "sample")
LOSS_REDUCTIONS = ("mean", "sum")


def _dist_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _reached_leaves(loss: Tensor) -> dict[int, Tensor]:
    """Leaves requiring grad that backward from ``loss`` would reach, by id."""
    out: dict[int, Tensor] = {}
    fn = loss.grad_fn
    if fn is None:
        if loss.requires_grad:
            out[id(loss)] = loss
        return out
    seen = {fn}
    stack = [fn]
    while stack:
        node = stack.pop()
        var = getattr(node, "variable", None)
        if var is not None:
            out[id(var)] = var
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return out


def _dense(g: Tensor) -> Tensor:
    return g.to_dense() if g.is_sparse else g


def _write_grad(p: Tensor, g: Tensor) -> None:
    """Accumulate ``g`` into ``p.grad`` as backward would (set when None, else add)."""
    g = g.detach()
    if g.dtype != p.dtype:
        g = g.to(p.dtype)
    if p.grad is None:
        # the layout backward's AccumulateGrad gives a new gradient: dense in the parameter's
        # strides (never an expanded view), sparse with contiguous indices and values
        if g.is_sparse:
            if not (g._indices().is_contiguous() and g._values().is_contiguous()):
                g = torch.sparse_coo_tensor(g._indices().contiguous(), g._values().contiguous(), g.shape,
                                            is_coalesced=g.is_coalesced())
        elif g.stride() != p.stride():
            g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
        p.grad = g
    elif p.grad.is_sparse or g.is_sparse:
        p.grad = p.grad + g
    else:
        p.grad.add_(g)


class HarmonizedOptimizer(torch.optim.Optimizer):
    """Wraps a ``torch.optim.Optimizer``; ``backward(losses)`` harmonizes, ``step()`` steps.

    It is a ``torch.optim.Optimizer`` to PyTorch's tools: ``param_groups``, ``defaults``
    and ``state`` are the wrapped optimizer's (get and set), so every LR scheduler,
    ``add_param_group``, ``torch.amp.GradScaler.step(wrapper)``, step hooks and
    ``step(closure)`` work.

    Args:
        optimizer: any torch optimizer (its param groups are used as they are).
        method: rule name or :class:`Rule` ("sum" reproduces plain ``backward()`` bit for
            bit at both granularities).
        curriculum: a :class:`ConflictCurriculum` (granularity "sample" only); advanced by
            :meth:`step`.
        granularity: "batch" or "sample" (see the module docs).
        chunk_size: samples per batched per-sample-gradient pass ("sample").
        scaler: optional ``torch.amp.GradScaler``: losses are scaled in :meth:`backward`,
            :meth:`step` unscales, skips steps with inf/NaN and updates the scale.
        backend: engine backend.
        nonfinite: NaN/inf policy (default "raise"; "propagate" when a scaler is given).
        shared_only: harmonize only parameters reached by two or more losses (default);
            False harmonizes every parameter as one vector.
        loss_reduction: "mean" (default: per-sample losses give the gradient of their
            batch mean) or "sum" ("sample" only).
        sync: average over ``torch.distributed`` ranks when it is initialized.
        **rule_kwargs: options of the rule.

    Raises:
        TypeError / ValueError: a wrong optimizer, granularity, chunk size or option.

    Example:
        >>> import torch, gradharmony as gh
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad")
        >>> x = torch.randn(8, 4)
        >>> out = model(x)
        >>> opt.zero_grad()
        >>> opt.backward([out[:, 0].pow(2).mean(), (1 - out[:, 1]).pow(2).mean()])
        >>> opt.step()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: Union[str, Rule] = "pcgrad",
        curriculum: Optional[ConflictCurriculum] = None,
        granularity: str = "batch",
        chunk_size: int = 16,
        scaler: Optional["torch.amp.GradScaler"] = None,
        backend: str = "auto",
        nonfinite: Optional[str] = None,
        shared_only: bool = True,
        loss_reduction: str = "mean",
        sync: bool = True,
        **rule_kwargs: Any,
    ) -> None:
        # torch.optim.Optimizer.__init__ is not called: the parameters, groups, defaults
        # and state belong to the wrapped optimizer (properties below).
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, HarmonizedOptimizer):
            raise TypeError("optimizer is already a HarmonizedOptimizer; wrap the plain optimizer once")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if curriculum is not None and granularity != "sample":
            raise ValueError("a curriculum weights samples: use granularity='sample'")
        if curriculum is not None and not isinstance(curriculum, ConflictCurriculum):
            raise TypeError(f"curriculum must be a ConflictCurriculum, got {type(curriculum).__name__}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        nonfinite = nonfinite or ("propagate" if scaler is not None else "raise")
        core.check_policy(nonfinite)
        self.optimizer = optimizer
        self.rule = get_rule(method, **rule_kwargs)
        self.curriculum = curriculum
        self.granularity = granularity
        self.chunk_size = chunk_size
        self.scaler = scaler
        self.backend = backend
        self.nonfinite = nonfinite
        self.shared_only = bool(shared_only)
        self.loss_reduction = loss_reduction
        self.sync = bool(sync)
        self.last_result: Optional[pipeline.Weighed] = None
        self._warned_vmap = False
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._zero_grad_profile_name = "Optimizer.zero_grad#HarmonizedOptimizer.zero_grad"

    # -- torch.optim.Optimizer surface: the wrapped optimizer's ----------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property  # type: ignore[override]
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def last_stats(self) -> Optional[ConflictStats]:
        """Conflict statistics of the last :meth:`backward`."""
        return None if self.last_result is None else self.last_result.stats

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"HarmonizedOptimizer(rule={self.rule!r}, granularity={self.granularity!r}, "
            f"shared_only={self.shared_only}, loss_reduction={self.loss_reduction!r}, "
            f"curriculum={self.curriculum!r}, backend={self.backend!r}, nonfinite={self.nonfinite!r},\n"
            f"  optimizer=\n{inner}\n)"
        )

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Step the wrapped optimizer (through the scaler if any), advance the curriculum.

        ``closure`` (re-evaluates the losses and calls :meth:`backward`) is passed to the
        wrapped optimizer; with a scaler it is called once before the scaled step
        (``GradScaler`` does not take closures).
        """
        args, kwargs = (), {} if closure is None else {"closure": closure}
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                args, kwargs = result
        closure = kwargs.get("closure", args[0] if args else None)
        if self.scaler is not None:
            out = None
            if closure is not None:
                with torch.enable_grad():
                    out = closure()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if self.curriculum is not None:
            self.curriculum.step()
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, args, kwargs)
        return out

    step.hooked = True  # type: ignore[attr-defined]  # the hooks run above; do not wrap again

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer", "rule", "curriculum", "scaler"}``: everything to resume."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "rule": self.rule.state_dict(),
            "curriculum": None if self.curriculum is None else self.curriculum.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`, or a plain state dict of the wrapped optimizer.

        A plain optimizer state dict (keys "state" and "param_groups") is loaded into the
        wrapped optimizer; the rule, curriculum and scaler keep their current state.

        Raises:
            ValueError: a dict of neither form.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if "optimizer" not in state_dict:
            if "state" in state_dict and "param_groups" in state_dict:
                self.optimizer.load_state_dict(state_dict)
                return
            raise ValueError(
                "not a HarmonizedOptimizer state dict (keys 'optimizer', 'rule', 'curriculum', "
                "'scaler') nor a plain optimizer's (keys 'state', 'param_groups'); got keys "
                f"{sorted(state_dict)}. Save with HarmonizedOptimizer.state_dict(), or load "
                "the inner optimizer's dict with wrapper.optimizer.load_state_dict()."
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if state_dict.get("rule") is not None:
            self.rule.load_state_dict(state_dict["rule"])
        if self.curriculum is not None and state_dict.get("curriculum") is not None:
            self.curriculum.load_state_dict(state_dict["curriculum"])
        if self.scaler is not None and state_dict.get("scaler") is not None:
            self.scaler.load_state_dict(state_dict["scaler"])

    # -- backward -------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        seen: set[int] = set()
        out = []
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _world(self) -> int:
        return _dist_world() if self.sync else 1

    def backward(self, losses: Sequence[Tensor], retain_graph: bool = False) -> None:
        """Accumulate the harmonized gradient of ``losses`` into ``p.grad``.

        Args:
            losses: K >= 2 losses: scalars for granularity "batch", per-sample vectors
                (B,) for "sample".
            retain_graph: keep the graph for another backward.
        Raises:
            ValueError / TypeError: fewer than 2 losses, non-tensors, losses without grad,
                wrong shapes; :class:`~gradharmony.engine.NonFiniteGradientError` for
                NaN/inf gradients under ``nonfinite="raise"``.
        """
        check_losses(losses)
        params = self._params()
        if not params:
            raise ValueError("the optimizer has no parameter that requires grad")
        if self.granularity == "batch":
            self._backward_batch(list(losses), params, retain_graph)
        else:
            self._backward_sample(list(losses), params, retain_graph)

    def _split(self, losses: list[Tensor], params: list[Tensor]):
        """(shared, own, foreign): harmonized params; params one loss reaches (with that loss
        index); leaves outside the optimizer that the losses reach."""
        reach = [_reached_leaves(l) for l in losses]
        mine = {id(p) for p in params}
        shared: list[Tensor] = []
        own: list[tuple[Tensor, int]] = []
        for p in params:
            ks = [k for k, r in enumerate(reach) if id(p) in r]
            if not ks:
                continue  # unreached: grad stays as it is (None), as with backward()
            if len(ks) == 1 and self.shared_only:
                own.append((p, ks[0]))
            else:
                shared.append(p)
        foreign: dict[int, Tensor] = {}
        for r in reach:
            for i, v in r.items():
                if i not in mine:
                    foreign[i] = v
        return shared, own, list(foreign.values())

    def _weigh(self, M_solve: Tensor, finite: Optional[Tensor], curriculum,
               dtype: Optional[torch.dtype] = None) -> pipeline.Weighed:
        nf = "skip" if self.nonfinite == "raise" else self.nonfinite
        # dtype: the Grams' accumulation dtype (rows the health check rebuilt are float64)
        res = pipeline.weigh(M_solve, self.rule, curriculum, finite, nf, dtype=dtype)
        self.last_result = res
        return res

    def _average(self, grads: list[Tensor]) -> list[Tensor]:
        """Average dense or sparse gradients over ranks (one all-reduce)."""
        import torch.distributed as dist

        world = self._world()
        if world == 1 or not grads:
            return grads
        dense = [_dense(g) for g in grads]
        flat = torch.cat([g.reshape(-1) for g in dense]).div_(world)
        dist.all_reduce(flat)
        out, off = [], 0
        for g, d in zip(grads, dense):
            n = d.numel()
            v = flat[off:off + n].view_as(d)
            off += n
            out.append(v.to_sparse(g.sparse_dim()) if g.is_sparse else v)
        return out

    # batch granularity ----------------------------------------------------------------------
    def _backward_batch(self, losses: list[Tensor], params: list[Tensor], retain_graph: bool) -> None:
        for k, l in enumerate(losses):
            if l.numel() != 1:
                raise ValueError(
                    f"granularity 'batch' needs scalar losses; loss {k} has shape {tuple(l.shape)} "
                    "(use granularity='sample' for per-sample losses)"
                )
        losses = [self._scale(l.reshape(())) for l in losses]
        shared, own, foreign = self._split(losses, params)
        if not shared and not own and not foreign:
            return
        world = self._world()
        leaves = shared + [p for p, _ in own] + foreign
        per_loss = []
        for k, l in enumerate(losses):
            gs = torch.autograd.grad(l, leaves, retain_graph=True, allow_unused=True)
            per_loss.append(list(gs))
        dt = torch.float32
        for p in shared:
            dt = torch.promote_types(dt, p.dtype)
        ns = len(shared)
        # G (1, K, P_shared); task-specific and foreign gradients ride along in the average
        rows = [torch.cat([(_dense(g) if g is not None else torch.zeros_like(p)).reshape(-1).to(dt)
                           for g, p in zip(gs[:ns], shared)]) if shared else torch.zeros(0, dtype=dt)
                for gs in per_loss]
        G = torch.stack(rows).unsqueeze(0)
        if world > 1:
            extra = [sum(_dense(gs[j]) for gs in per_loss if gs[j] is not None) for j in range(ns, len(leaves))]
            avg = self._average([G] + extra)
            G, extra = avg[0], avg[1:]
        else:
            extra = None
        be = select_backend(self.backend, G)
        with torch.no_grad():
            h = core.health_check(G, be.gram(G), self.nonfinite)
            wd = self._weigh(h.gram_solve, h.finite if h.nonfinite_samples is not None else None, None,
                             h.gram.dtype)
            w = wd.weights
            if world > 1:
                import torch.distributed as dist

                w = w.contiguous()
                dist.broadcast(w, 0)  # the same surgery on every rank (a random order may differ)
        if isinstance(self.rule, Sum) and world == 1:
            self._plain(losses, own + [(p, -1) for p in shared], foreign, retain_graph)
            return
        with torch.no_grad():
            out = be.combine(core.repaired_input(G, h, self.nonfinite), w, "sum")
        off = 0
        for j, p in enumerate(shared):
            n = p.numel()
            g = out[off:off + n].view_as(p)
            off += n
            sparse = [per[j] for per in per_loss if per[j] is not None and per[j].is_sparse]
            _write_grad(p, g.to_sparse(sparse[0].sparse_dim()) if sparse else g)
        for j, p in enumerate([p for p, _ in own] + foreign):
            if extra is not None:
                g = extra[j]
            else:
                gs = [per[ns + j] for per in per_loss if per[ns + j] is not None]
                g = gs[0] if len(gs) == 1 else sum(gs[1:], gs[0])
            _write_grad(p, g)

    def _plain(self, losses: list[Tensor], own, foreign, retain_graph: bool) -> None:
        """Plain backward of ``sum(losses)`` into the given leaves (the "sum" rule)."""
        leaves = [p for p, _ in own] + foreign
        total = losses[0]
        for l in losses[1:]:
            total = total + l
        gs = torch.autograd.grad(total, leaves, retain_graph=retain_graph, allow_unused=True)
        for p, g in zip(leaves, gs):
            if g is not None:
                _write_grad(p, g)

    # sample granularity ---------------------------------------------------------------------
    def _per_sample_grads(self, loss: Tensor, params: list[Tensor], rows: Tensor) -> Tensor:
        """(n, P) gradients of the loss terms ``loss[rows]`` w.r.t. params (dense)."""
        B = loss.shape[0]
        n = rows.numel()
        if not params:
            return loss.new_zeros(n, 0)
        E = torch.zeros(n, B, dtype=loss.dtype, device=loss.device)
        E[torch.arange(n), rows] = 1
        try:
            gs = torch.autograd.grad(loss, params, grad_outputs=E, is_grads_batched=True,
                                     retain_graph=True, allow_unused=True)
        except RuntimeError as exc:  # an op without a batching rule: loop instead
            if not self._warned_vmap:
                warnings.warn(f"gradharmony: batched per-sample gradients failed ({exc}); looping",
                              RuntimeWarning, stacklevel=4)
                self._warned_vmap = True
            per = [torch.autograd.grad(loss, params, grad_outputs=E[i], retain_graph=True, allow_unused=True)
                   for i in range(n)]
            gs = tuple(
                torch.stack([_dense(p_[j]) if p_[j] is not None else torch.zeros_like(params[j]) for p_ in per])
                for j in range(len(params))
            )
        return torch.cat([(_dense(g) if g is not None else torch.zeros(n, *p.shape, dtype=p.dtype, device=p.device))
                          .reshape(n, -1) for g, p in zip(gs, params)], dim=1)

    def _backward_sample(self, losses: list[Tensor], params: list[Tensor], retain_graph: bool) -> None:
        first = losses[0]
        for k, l in enumerate(losses):
            if l.ndim != 1:
                raise ValueError(f"granularity 'sample' needs per-sample losses (B,); loss {k} has shape {tuple(l.shape)}")
            if l.shape != first.shape:
                raise ValueError(f"loss {k} has batch size {l.shape[0]} but loss 0 has {first.shape[0]}")
        losses = [self._scale(l) for l in losses]
        B, K = first.shape[0], len(losses)
        shared, own, foreign = self._split(losses, params)
        if not shared and not own and not foreign:
            return
        # phase 1: Gram matrices of the per-sample gradients of the shared parameters
        Ms, Fs = [], []
        any_bad = False
        with torch.no_grad():
            for s in range(0, B, self.chunk_size):
                rows = torch.arange(s, min(B, s + self.chunk_size), device=first.device)
                with torch.enable_grad():
                    Gc = torch.stack([self._per_sample_grads(l, shared, rows) for l in losses], dim=1)  # (n, K, P)
                h = core.health_check(Gc, select_backend(self.backend, Gc).gram(Gc), self.nonfinite)
                any_bad = any_bad or h.nonfinite_samples is not None
                Ms.append(h.gram_solve)
                acc = h.gram.dtype
                Fs.append(h.finite)
                del Gc
            if B == 0:
                acc = torch.float64 if torch.promote_types(torch.float32, first.dtype) == torch.float64 else torch.float32
                M_solve = torch.zeros(0, K, K, dtype=acc, device=first.device)
                finite = torch.ones(0, dtype=torch.bool, device=first.device)
            else:
                M_solve, finite = torch.cat(Ms), torch.cat(Fs)
            wd = self._weigh(M_solve, finite if any_bad else None, self.curriculum, acc)
        W = wd.weights.detach()
        v = wd.sample_weights  # per-sample factor for task-specific and foreign leaves
        if any_bad and self.nonfinite == "skip":
            v = finite.to(W.dtype) if v is None else v * finite.to(v.dtype)
        c = 1.0 / max(B, 1) if self.loss_reduction == "mean" else 1.0
        leaves_t = [p for p, _ in own] + foreign
        if any_bad and self.nonfinite in ("skip", "zero"):
            # Backpropagating a zero weight through a non-finite term still gives NaN
            # (0 * inf): combine recomputed per-sample gradients, entries zeroed, instead.
            grads = self._combine_chunks(losses, shared, leaves_t, W, v, finite, c)
        else:
            grads = self._phase2(losses, shared, leaves_t, W, v, c, retain_graph)
        grads = self._average(grads)
        for p, g in zip(shared + leaves_t, grads):
            if g is not None:
                _write_grad(p, g)

    def _total(self, losses: list[Tensor], W: Optional[Tensor], c: float) -> Tensor:
        """``c sum_k sum_b W[b, k] l_{k,b}``; without W exactly ``sum_k l_k.mean()`` (or .sum())."""
        total = None
        for k, l in enumerate(losses):
            if W is None:
                t = l.mean() if self.loss_reduction == "mean" else l.sum()
            else:
                t = (W[:, k].to(l.dtype) * l).sum() * c
            total = t if total is None else total + t
        assert total is not None
        return total

    def _phase2(self, losses, shared, leaves_t, W, v, c, retain_graph):
        is_sum = isinstance(self.rule, Sum) and self.curriculum is None
        out: list[Optional[Tensor]] = []
        if shared:
            total = self._total(losses, None if is_sum else W, c)
            out += list(torch.autograd.grad(total, shared, retain_graph=retain_graph or bool(leaves_t),
                                            allow_unused=True))
        if leaves_t:
            Wv = None if v is None else v.detach().unsqueeze(-1).expand(-1, len(losses))
            total = self._total(losses, Wv, c)
            out += list(torch.autograd.grad(total, leaves_t, retain_graph=retain_graph, allow_unused=True))
        return out

    def _combine_chunks(self, losses, shared, leaves_t, W, v, finite, c) -> list[Tensor]:
        """The phase-2 gradients from recomputed per-sample gradients, non-finite entries zeroed."""
        B = losses[0].shape[0]
        leaves = shared + leaves_t
        ns = sum(p.numel() for p in shared)
        flat: Optional[Tensor] = None
        ones = torch.ones(B, dtype=W.dtype, device=W.device)
        vv = (ones if v is None else v.to(W.dtype)).unsqueeze(-1).expand(-1, W.shape[1])
        for s in range(0, B, self.chunk_size):
            rows = torch.arange(s, min(B, s + self.chunk_size), device=losses[0].device)
            Gc = torch.stack([self._per_sample_grads(l, leaves, rows) for l in losses], dim=1).detach()
            Gc = torch.nan_to_num_(Gc, nan=0.0, posinf=0.0, neginf=0.0)
            if self.nonfinite == "skip":
                Gc[~finite[rows]] = 0
            part = torch.cat([reference.combine(Gc[:, :, :ns].contiguous(), W[rows], "sum"),
                              reference.combine(Gc[:, :, ns:].contiguous(), vv[rows], "sum")])
            flat = part if flat is None else flat + part
        assert flat is not None
        flat = flat * c
        out, off = [], 0
        for p in leaves:
            n = p.numel()
            out.append(flat[off:off + n].view_as(p))
            off += n
        return out
