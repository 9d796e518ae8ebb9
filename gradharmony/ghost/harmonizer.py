"""Parameter-level per-sample harmonization with the path decomposition, by ghost Grams.

Decomposition: ``g_{k,i}`` is the part of ``dL_k/dtheta`` that flows through sample i's own
forward pass (the path decomposition of DESIGN.md, the one :class:`gradharmony.Harmonizer`
uses at a representation), now over every shared parameter; ``sum_i g_{k,i} = dL_k/dtheta``.

One step:

1. forward under :meth:`ParameterHarmonizer.capture`: hooks keep each supported layer's
   inputs ``a`` and output tensor (free parameters are expanded over the rows);
2. K backward passes of the losses w.r.t. those outputs only (no weight gradient is
   computed) give ``b^k``;
3. per layer, the per-sample Gram contribution ``<G^k_i, G^l_i>`` (ghost identity or
   materialized per layer, whichever costs less; see :mod:`gradharmony.ghost.registry`),
   summed over the shared layers: M (B, K, K). No (B, P) tensor exists: besides the
   captured activations and their K output gradients (O(K B T d)), a Linear/Conv layer
   whose per-sample gradients are cheaper to materialize holds them, (B, K, P_layer), only
   while its Gram is computed; LayerNorm, free parameters and fallback modules keep their
   small per-sample gradients (B, K, P_module) until the combination;
4. rule, curriculum and statistics from M, as :func:`gradharmony.harmonize`: w (B, K);
5. per layer, the combined gradient as one contraction
   ``grad W = sum_i (sum_k w_{k,i} b^k_i)^T a_i``, accumulated into ``p.grad``.

Steps 3 and 5 run without autograd graph; with ``nonfinite`` "raise" or "propagate" the
captured tensors are released once step 3's per-layer states are built.
:meth:`ParameterHarmonizer.measure` runs steps 1-3 only (per-sample cosines, no update).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..api import pipeline
from ..api.functional import check_losses
from ..api.stats import ConflictStats
from ..engine import reference
from ..engine.core import NONFINITE_POLICIES, NonFiniteGradientError
from ..rules import ConflictCurriculum, Rule, get_rule
from . import fallback, free
from .registry import LayerRule, Use, gram_of, rule_for

__all__ = ["ParameterHarmonizer", "gram_to_weights"]


def gram_to_weights(
    M: Tensor,
    rule: Rule,
    curriculum: Optional[ConflictCurriculum],
    finite: Tensor,
    nonfinite: str = "skip",
) -> tuple[Tensor, Tensor, ConflictStats]:
    """Per-sample Gram (B, K, K) -> weights w (B, K), cosines (B, K, K), statistics.

    The Gram-level pipeline shared with :func:`gradharmony.harmonize` and the optimizer
    wrapper, :func:`gradharmony.api.pipeline.weigh`: rule solve, curriculum weights folded into
    w (samples skipped under ``nonfinite="skip"`` get weight 0 and stay out of the curriculum's
    quantile and normalisation), rule state update, statistics.

    Args:
        M: (B, K, K) Gram matrices (rescaled per sample is fine: every rule is scale-invariant).
        finite: (B,) bool, False for samples whose gradients held NaN/inf.
        nonfinite: the harmonizer's policy for those samples ("skip", "zero", "propagate").
    """
    wd = pipeline.weigh(M, rule, curriculum, finite, nonfinite)
    return wd.weights.detach(), wd.cos, wd.stats


class _Entry:
    """One unit of the plan: a module with a layer rule, a fallback module, or one free parameter."""

    def __init__(self, kind: str, name: str, module: Optional[nn.Module], rule: Optional[LayerRule],
                 params: list[nn.Parameter]) -> None:
        self.kind, self.name, self.module, self.rule, self.params = kind, name, module, rule, params
        self.uses: list[Use] = []
        self.state: Any = None

    def prepare(self, B: int) -> None:
        """Per-layer state from the captured tensors (kept from the Gram to the combination)."""
        if self.kind == "rule":
            self.state = self.rule.prepare(self.module, self.uses, B)
        elif self.kind == "fallback":
            self.state = fallback.per_sample(self.module, self.uses, B, self.name)
        else:
            self.state = free.per_sample(self.params[0], self.uses, B, self.name)

    def gram(self, K: int) -> Tensor:
        if self.kind == "rule":
            return self.rule.gram(self.module, self.state, K)
        return gram_of(self.state)

    def combine(self, w: Tensor) -> list[Tensor]:
        if self.kind == "rule":
            return self.rule.combine(self.module, self.state, w)
        if self.kind == "fallback":
            return fallback.combine(self.module, self.state, w)
        return [free.combine(self.params[0], self.state, w)]

    def clear(self) -> None:
        self.uses, self.state = [], None


class ParameterHarmonizer:
    """Per-sample harmonization of K losses over all shared parameters, without per-sample model gradients.

    Decomposition: path (``g_{k,i}`` = the part of ``dL_k/dtheta`` through sample i's own
    forward pass; see the module docstring). The optimizer wrapper's ``granularity="sample"``
    uses the term decomposition instead (``d l_{k,i}/dtheta``).

    Supported layers (one rule each, :mod:`gradharmony.ghost`): ``nn.Linear``,
    ``nn.Conv1d/2d/3d`` with kernel == stride (patch tokenizers), ``nn.LayerNorm``,
    ``nn.Embedding`` (padding_idx honoured), free parameters of shape (1, ...) broadcast
    over the rows (position embeddings, aggregation tokens, also in ``nn.ParameterDict``).
    Any other module with parameters runs a torch.func fallback (a warning names it).
    Requirements: each captured tensor's N rows are B contiguous groups (one per sample);
    every parameter is used through its own module (no weight tying or ``F.linear(x,
    other.weight)``); modules run without in-place changes of their outputs.

    Args:
        model: the module to harmonize (the raw module, not a DDP wrapper: under
            ``torch.distributed`` the combined gradients are averaged over ranks here, and
            the curriculum decides on the global batch).
        method: rule name or :class:`Rule`.
        curriculum: optional :class:`ConflictCurriculum` (advanced by :meth:`step`).
        optimizer: optional optimizer stepped by :meth:`step`.
        shared_only: True (default): the Gram sums only parameters reached by >= 2 losses;
            a parameter reached by one loss gets that loss's plain gradient.
        scaler: optional ``torch.amp.GradScaler`` (losses scaled in :meth:`backward`;
            :meth:`step` unscales, skips inf/NaN steps and updates the scale).
        nonfinite: "raise" (default), "skip" (samples with NaN/inf get weight 0 and their
            activations and output gradients are zeroed), "zero" (non-finite entries of the
            captured activations and output gradients are zeroed) or "propagate" (default
            with a scaler).
        **rule_kwargs: options of the rule named by ``method``.

    Example:
        >>> import torch, gradharmony as gh
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> ph = gh.ParameterHarmonizer(net, "pcgrad")
        >>> x = torch.randn(6, 4)
        >>> with ph.capture(batch_size=6):
        ...     y = net(x)
        >>> ph.backward([y[:, 0].pow(2).mean(), (1 - y[:, 1]).pow(2).mean()])
        >>> tuple(ph.last_gram.shape)
        (6, 2, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        method: Union[str, Rule] = "pcgrad",
        *,
        curriculum: Optional[ConflictCurriculum] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        shared_only: bool = True,
        scaler: Optional["torch.amp.GradScaler"] = None,
        nonfinite: Optional[str] = None,
        **rule_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass the raw module (model.module), not a DistributedDataParallel wrapper: "
                            "the harmonizer averages the combined gradients over ranks itself")
        if curriculum is not None and not isinstance(curriculum, ConflictCurriculum):
            raise TypeError(f"curriculum must be a ConflictCurriculum, got {type(curriculum).__name__}")
        self.nonfinite = nonfinite or ("propagate" if scaler is not None else "raise")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        self.model, self.rule, self.curriculum = model, get_rule(method, **rule_kwargs), curriculum
        self.optimizer, self.shared_only, self.scaler = optimizer, shared_only, scaler
        self.last_stats: Optional[ConflictStats] = None
        self.last_gram: Optional[Tensor] = None
        self.last_weights: Optional[Tensor] = None
        self._entries, self._free_by_id = self._plan(model)
        self._batch_size: Optional[int] = None
        self._capturing = False

    # -- plan ------------------------------------------------------------------------------
    def _plan(self, model: nn.Module) -> tuple[list[_Entry], dict[int, _Entry]]:
        entries: list[_Entry] = []
        free_by_id: dict[int, _Entry] = {}
        for name, mod in model.named_modules():
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            r = rule_for(mod)
            if r is not None:
                entries.append(_Entry("rule", name, mod, r, [p for _, p in own]))
            elif isinstance(mod, (nn.ParameterDict, nn.ParameterList)) or all(free.is_free(p) for _, p in own):
                for n, p in own:
                    if not free.is_free(p):
                        raise ValueError(f"parameter {name}.{n} of shape {tuple(p.shape)} in a parameter "
                                         "container is not of shape (1, ...): it cannot be split per sample")
                    e = _Entry("free", f"{name}.{n}" if name else n, mod, None, [p])
                    e.attr = n  # type: ignore[attr-defined]
                    entries.append(e)
                    free_by_id[id(p)] = e
            else:
                warnings.warn(f"gradharmony: module {name or '<root>'} ({type(mod).__name__}) has no ghost-Gram "
                              "rule; its per-sample gradients are materialized with torch.func (slower)",
                              RuntimeWarning, stacklevel=3)
                entries.append(_Entry("fallback", name or type(mod).__name__, mod, None, [p for _, p in own]))
        return entries, free_by_id

    # -- capture ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, batch_size: int) -> Iterator[None]:
        """Record the forward pass run inside this context (hooks are removed on exit).

        Args:
            batch_size: B, the number of samples (a captured tensor's rows are B groups).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self._batch_size = batch_size
        for e in self._entries:
            e.uses = []
        handles = []
        swapped: list[tuple[nn.Module, str, Tensor]] = []
        self._capturing = True

        def record(entry: _Entry) -> Callable:
            def hook(mod: nn.Module, args: tuple, out: Any) -> None:
                if not self._capturing or not isinstance(out, Tensor) or not out.requires_grad:
                    return
                entry.uses.append(Use(inputs=tuple(args), out=out))
            return hook

        def expand(e: _Entry, rows: int) -> Tensor:
            p = e.params[0]
            x = p.expand(rows, *p.shape[1:])
            e.uses.append(Use(inputs=(), out=x))
            return x

        def first_rows(args: tuple, kwargs: dict) -> Optional[int]:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, Tensor) and id(a) not in self._free_by_id and a.ndim >= 1:
                    return a.shape[0]
            return None

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict):
            if not self._capturing:
                return None
            rows = first_rows(args, kwargs)
            if rows is None:
                return None
            # free parameters passed as arguments (aggregation tokens from a ParameterDict)
            changed = False
            new_args = list(args)
            for j, a in enumerate(args):
                if isinstance(a, Tensor) and id(a) in self._free_by_id:
                    new_args[j] = expand(self._free_by_id[id(a)], rows)
                    changed = True
            new_kwargs = dict(kwargs)
            for k, a in kwargs.items():
                if isinstance(a, Tensor) and id(a) in self._free_by_id:
                    new_kwargs[k] = expand(self._free_by_id[id(a)], rows)
                    changed = True
            # free parameters the module owns (position embeddings): swapped for the call
            for n, p in list(mod._parameters.items()):
                if p is not None and id(p) in self._free_by_id:
                    mod._parameters[n] = expand(self._free_by_id[id(p)], rows)  # type: ignore[assignment]
                    swapped.append((mod, n, p))
            return (tuple(new_args), new_kwargs) if changed else None

        def post_hook(mod: nn.Module, args: tuple, out: Any) -> None:
            while swapped and swapped[-1][0] is mod:
                m, n, p = swapped.pop()
                m._parameters[n] = p  # type: ignore[assignment]

        try:
            for mod in self.model.modules():
                handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
                handles.append(mod.register_forward_hook(post_hook))
            for e in self._entries:
                if e.kind in ("rule", "fallback"):
                    handles.append(e.module.register_forward_hook(record(e)))
            yield
        finally:
            self._capturing = False
            for h in handles:
                h.remove()
            while swapped:
                m, n, p = swapped.pop()
                m._parameters[n] = p  # type: ignore[assignment]

    # -- backward --------------------------------------------------------------------------
    def backward(self, losses: Sequence[Tensor], retain_graph: bool = False) -> None:
        """Accumulate the harmonized gradient of K losses into ``p.grad``.

        Args:
            losses: K >= 2 scalar losses of the captured forward (a (B,) vector is summed).
        Raises:
            RuntimeError: nothing was captured.
            ValueError: bad losses, a parameter reached outside its module, rows that are not
                a multiple of B.
            NonFiniteGradientError: NaN/inf gradients with ``nonfinite="raise"``.
        """
        rf = torch.autograd.profiler.record_function
        B, K, live, shared, M = self._output_grads_and_gram(losses, retain_graph)
        finite = torch.isfinite(M.diagonal(dim1=1, dim2=2)).all(-1)
        if self.nonfinite != "propagate" and not bool(finite.all()):  # the one host sync
            if self.nonfinite == "raise":
                i = int((~finite).nonzero()[0])
                raise NonFiniteGradientError(
                    f"the gradients of sample {i} are not finite; pass nonfinite='skip' to drop such samples, "
                    "'zero' to zero the non-finite entries, or 'propagate' (e.g. for torch.amp.GradScaler)")
            self._sanitize(live, B, finite)
            with torch.no_grad():
                for e in live:
                    e.prepare(B)
                M = self._gram(shared, B, K)
            if self.nonfinite == "zero":
                finite = torch.ones_like(finite)
        self.last_gram = M
        diag_max = M.diagonal(dim1=1, dim2=2).amax(-1)
        scale = torch.where(diag_max > 0, diag_max, torch.ones_like(diag_max))
        M_solve = M / scale[:, None, None] if self.nonfinite != "propagate" else M
        with rf("ghost.solve"):
            w, cos, stats = gram_to_weights(M_solve, self.rule, self.curriculum, finite,
                                            "skip" if self.nonfinite == "raise" else self.nonfinite)
        self.last_weights, self.last_stats = w, stats
        grads: list[tuple[nn.Parameter, Tensor]] = []
        with rf("ghost.combine"), torch.no_grad():
            self._combine(live, shared, w, B, K, grads)
        self._accumulate(grads)
        self._batch_size = None

    def measure(self, losses: Sequence[Tensor], retain_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Per-sample Gram and cosines of the captured forward's K losses; changes no state.

        The first half of :meth:`backward` (K backward passes to the captured layer outputs,
        the per-sample Gram over the shared parameters) for measuring only: no gradient is
        written, the rule state, curriculum and ``last_*`` attributes are left alone, and
        non-finite values pass through (no ``nonfinite`` policy). Under ``torch.distributed``
        the Grams are of this rank's samples (gradients of the losses of every rank, as in
        :meth:`backward`).

        Args:
            losses: K >= 2 scalar losses (a (B,) vector is summed), as for :meth:`backward`.
        Returns:
            (Gram (B, K, K) in the accumulation dtype, cosines (B, K, K) in [-1, 1];
            a zero gradient has cosine 0 with everything: :func:`gradharmony.engine.reference.cosine`).
        """
        B, K, live, shared, M = self._output_grads_and_gram(losses, retain_graph)
        for e in self._entries:
            e.clear()
        self._batch_size = None
        return M, reference.cosine(M)

    def _output_grads_and_gram(self, losses: Sequence[Tensor], retain_graph: bool
                               ) -> tuple[int, int, list[_Entry], list[_Entry], Tensor]:
        """K backward passes to the captured outputs, per-layer preparation, Gram (B, K, K)."""
        check_losses(losses)
        B = self._batch_size
        if B is None:
            raise RuntimeError("run the forward pass inside `with harmonizer.capture(batch_size):` first")
        K = len(losses)
        scalars = [l.sum() if l.ndim else l for l in losses]
        if self.scaler is not None:
            scalars = [self.scaler.scale(l) for l in scalars]
        live = [e for e in self._entries if e.uses]
        targets = [u.out for e in live for u in e.uses]
        unseen = [e for e in self._entries if e.kind == "free" and not e.uses]
        unseen_p = [e.params[0] for e in unseen]
        per_loss = []
        rf = torch.autograd.profiler.record_function
        for k, l in enumerate(scalars):
            with rf("ghost.output_grads"):
                gs = torch.autograd.grad(l, targets + unseen_p, retain_graph=retain_graph or k < K - 1,
                                         allow_unused=True)
            for e, g in zip(unseen, gs[len(targets):]):
                if g is not None:
                    raise ValueError(f"parameter {e.name} reaches loss {k} outside any captured call (it is "
                                     "used neither by its module nor as a module argument): it cannot be "
                                     "split per sample")
            per_loss.append(gs[:len(targets)])
        j = 0
        for e in live:
            e.reached = set()  # type: ignore[attr-defined]
            for u in e.uses:
                u.grads = []
                for k in range(K):
                    g = per_loss[k][j]
                    if g is None:
                        g = torch.zeros_like(u.out)
                    else:
                        e.reached.add(k)  # type: ignore[attr-defined]
                    u.grads.append(g)
                j += 1
        del per_loss, targets
        live = [e for e in live if e.reached]  # type: ignore[attr-defined]
        shared = [e for e in live if len(e.reached) >= 2 or not self.shared_only]  # type: ignore[attr-defined]
        with rf("ghost.prepare"), torch.no_grad():  # no graph of the Gram or combination (torch.func still runs)
            for e in live:
                e.prepare(B)
        if self.nonfinite in ("raise", "propagate"):
            # no second preparation from the captured tensors (that is only for "skip"/"zero", see
            # _sanitize): the per-layer states hold what the Gram and combination need
            for e in live:
                for u in e.uses:
                    u.inputs, u.out, u.grads = (), None, []
        with rf("ghost.gram"), torch.no_grad():
            M = self._gram(shared, B, K)
        return B, K, live, shared, M

    def _combine(self, live: list[_Entry], shared: list[_Entry], w: Tensor, B: int, K: int,
                 grads: list[tuple[nn.Parameter, Tensor]]) -> None:
        for e in live:
            if e in shared:
                we = w
            else:
                (k,) = tuple(e.reached)  # type: ignore[attr-defined]
                we = torch.zeros(B, K, dtype=w.dtype, device=w.device)
                we[:, k] = 1
            for p, g in zip(e.params, e.combine(we)):
                grads.append((p, g))
            e.clear()

    def _gram(self, shared: list[_Entry], B: int, K: int) -> Tensor:
        M = None
        for e in shared:
            m = e.gram(K)
            M = m if M is None else M + m
        if M is None:
            p = next(iter(self.model.parameters()))
            dt = reference.acc_dtype(p.dtype)
            return torch.zeros(B, K, K, dtype=dt, device=p.device)
        return M.to(reference.acc_dtype(M.dtype))

    def _sanitize(self, live: list[_Entry], B: int, finite: Tensor) -> None:
        """Zero non-finite entries ("zero") or whole samples ("skip") in captured tensors."""
        def fix(x: Tensor) -> Tensor:
            if not x.is_floating_point():
                return x
            if self.nonfinite == "zero":
                return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            m = x.shape[0] // B
            keep = finite.repeat_interleave(m).view(-1, *([1] * (x.ndim - 1)))
            return torch.where(keep, x, torch.zeros_like(x))
        for e in live:
            for u in e.uses:
                u.inputs = tuple(fix(a) if isinstance(a, Tensor) else a for a in u.inputs)
                u.grads = [fix(g) for g in u.grads]

    def _accumulate(self, grads: list[tuple[nn.Parameter, Tensor]]) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.reshape(-1).to(torch.float64 if g.dtype == torch.float64 else torch.float32)
                              for _, g in grads])
            dist.all_reduce(flat)
            flat = flat / dist.get_world_size()
            off, out = 0, []
            for p, g in grads:
                out.append((p, flat[off:off + g.numel()].view_as(g)))
                off += g.numel()
            grads = out
        for p, g in grads:
            g = g.to(p.dtype).view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    # -- optimizer surface ----------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        else:
            self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> Any:
        """Step the optimizer (through the scaler if any) and advance the curriculum."""
        out = None
        if self.optimizer is not None:
            if self.scaler is not None:
                out = self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                out = self.optimizer.step()
        if self.curriculum is not None:
            self.curriculum.step()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict(),
                "curriculum": None if self.curriculum is None else self.curriculum.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["rule"])
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])
