"""A drop-in optimizer wrapper that harmonizes the gradients of K losses.

Two granularities:

- ``"batch"``: classic PCGrad-style surgery on the K whole-batch gradients
  ``dL_k/dtheta`` (one sample of K gradients; a curriculum does not apply).
- ``"sample"``: per-sample harmonization at parameter level with the *term
  decomposition* of DESIGN.md: ``g_{k,b} = d l_{k,b} / dtheta``, the gradient of the loss
  term anchored at sample b (its negatives included). Phase 1 computes the per-sample
  gradients chunk by chunk (``chunk_size`` samples at a time, batched vector-Jacobian
  products), keeping only their B Gram matrices; the rule and the curriculum turn those
  into weights ``w_{k,b}``; phase 2 is one backward of ``sum_b sum_k w_{k,b} l_{k,b}``
  with ``w`` held constant, which is exactly ``sum_b w_b^T G_b``. Memory is bounded by
  ``chunk_size * K * P`` (P = number of parameters).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..engine import core, reference
from ..rules import ConflictCurriculum, Rule, get_rule
from .functional import harmonize
from .stats import ConflictStats, conflict_stats

__all__ = ["HarmonizedOptimizer"]

GRANULARITIES = ("batch", "sample")


class HarmonizedOptimizer:
    """Wraps a ``torch.optim.Optimizer``; ``backward(losses)`` harmonizes, ``step()`` steps.

    Args:
        optimizer: any torch optimizer (its param groups are used as they are).
        method: rule name or :class:`Rule` ("sum" reproduces plain ``backward()``).
        curriculum: a :class:`ConflictCurriculum` (granularity "sample" only); advanced by
            :meth:`step`.
        granularity: "batch" or "sample" (see the module docs).
        chunk_size: samples per batched per-sample-gradient pass ("sample").
        scaler: optional ``torch.amp.GradScaler``: losses are scaled in :meth:`backward`,
            :meth:`step` unscales, skips steps with inf/NaN and updates the scale.
        backend: engine backend.
        nonfinite: NaN/inf policy (default "raise"; "propagate" when a scaler is given).

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
        **rule_kwargs: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if curriculum is not None and granularity != "sample":
            raise ValueError("a curriculum weights samples: use granularity='sample'")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.optimizer = optimizer
        self.rule = get_rule(method, **rule_kwargs)
        self.curriculum = curriculum
        self.granularity = granularity
        self.chunk_size = chunk_size
        self.scaler = scaler
        self.backend = backend
        self.nonfinite = nonfinite or ("propagate" if scaler is not None else "raise")
        self.last_stats: Optional[ConflictStats] = None
        self._warned_vmap = False

    # -- torch.optim.Optimizer surface ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if self.scaler is not None:
            out = self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if self.curriculum is not None:
            self.curriculum.step()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "rule": self.rule.state_dict(),
            "curriculum": None if self.curriculum is None else self.curriculum.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.rule.load_state_dict(state["rule"])
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    # -- backward -------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, losses: Sequence[Tensor], retain_graph: bool = False) -> None:
        """Accumulate the harmonized gradient of ``losses`` into ``p.grad``.

        Args:
            losses: K >= 2 losses: scalars for granularity "batch", per-sample vectors
                (B,) for "sample".
        """
        if not isinstance(losses, (list, tuple)) or len(losses) < 2:
            raise ValueError("losses must be a list of K >= 2 loss tensors")
        for k, l in enumerate(losses):
            if not isinstance(l, Tensor):
                raise TypeError(f"loss {k} is a {type(l).__name__}, not a tensor")
            if not l.requires_grad:
                raise ValueError(f"loss {k} does not require grad (was it computed under no_grad?)")
        params = self._params()
        if not params:
            raise ValueError("the optimizer has no parameter that requires grad")
        if self.granularity == "batch":
            self._backward_batch(losses, params, retain_graph)
        else:
            self._backward_sample(losses, params, retain_graph)

    def _backward_batch(self, losses: Sequence[Tensor], params: list[Tensor], retain_graph: bool) -> None:
        for k, l in enumerate(losses):
            if l.numel() != 1:
                raise ValueError(
                    f"granularity 'batch' needs scalar losses; loss {k} has shape {tuple(l.shape)} "
                    "(use granularity='sample' for per-sample losses)"
                )
        K = len(losses)
        dt = torch.float32
        for p in params:
            dt = torch.promote_types(dt, p.dtype)
        rows = []
        for k, l in enumerate(losses):
            gs = torch.autograd.grad(self._scale(l.reshape(())), params,
                                     retain_graph=retain_graph or k < K - 1, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(dt)
                                   for g, p in zip(gs, params)]))
        G = torch.stack(rows).unsqueeze(0)  # (1, K, P)
        res = harmonize(G, self.rule, backend=self.backend, nonfinite=self.nonfinite)
        self.last_stats = res.stats
        self._accumulate(params, res.grad[0])

    @staticmethod
    def _accumulate(params: list[Tensor], flat: Tensor) -> None:
        off = 0
        for p in params:
            n = p.numel()
            g = flat[off : off + n].view_as(p).to(p.dtype)
            off += n
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    def _per_sample_grads(self, loss: Tensor, params: list[Tensor], rows: Tensor) -> Tensor:
        """(n, P) gradients of the loss terms ``loss[rows]`` w.r.t. params."""
        B = loss.shape[0]
        E = torch.zeros(rows.numel(), B, dtype=loss.dtype, device=loss.device)
        E[torch.arange(rows.numel()), rows] = 1
        scaled = self._scale(loss)
        try:
            gs = torch.autograd.grad(scaled, params, grad_outputs=E, is_grads_batched=True,
                                     retain_graph=True, allow_unused=True)
        except RuntimeError as exc:  # an op without a batching rule: loop instead
            if not self._warned_vmap:
                warnings.warn(f"gradharmony: batched per-sample gradients failed ({exc}); looping",
                              RuntimeWarning, stacklevel=3)
                self._warned_vmap = True
            per = [torch.autograd.grad(scaled, params, grad_outputs=E[i], retain_graph=True, allow_unused=True)
                   for i in range(rows.numel())]
            gs = tuple(
                torch.stack([p_[j] if p_[j] is not None else torch.zeros_like(params[j]) for p_ in per])
                for j in range(len(params))
            )
        n = rows.numel()
        return torch.cat([(g if g is not None else torch.zeros(n, *p.shape, dtype=p.dtype, device=p.device))
                          .reshape(n, -1) for g, p in zip(gs, params)], dim=1)

    def _backward_sample(self, losses: Sequence[Tensor], params: list[Tensor], retain_graph: bool) -> None:
        first = losses[0]
        for k, l in enumerate(losses):
            if l.ndim != 1:
                raise ValueError(f"granularity 'sample' needs per-sample losses (B,); loss {k} has shape {tuple(l.shape)}")
            if l.shape != first.shape:
                raise ValueError(f"loss {k} has batch size {l.shape[0]} but loss 0 has {first.shape[0]}")
        B, K = first.shape[0], len(losses)
        Ms, Ss, Fs = [], [], []
        for s in range(0, B, self.chunk_size):
            rows = torch.arange(s, min(B, s + self.chunk_size), device=first.device)
            Gc = torch.stack([self._per_sample_grads(l, params, rows) for l in losses], dim=1)  # (n, K, P)
            M, M_solve, finite = core.gram_pass(Gc, backend=self.backend, nonfinite=self.nonfinite)
            Ms.append(M)
            Ss.append(M_solve)
            Fs.append(finite)
            del Gc
        M_solve = torch.cat(Ss)
        finite = torch.cat(Fs)
        rule = self.rule
        if rule.method_id is not None:
            cos, w, phi = reference.solve(M_solve, rule.method_id, rule.order(B, K, M_solve.device),
                                          rule.target(K, M_solve.device))
        else:
            w, phi = rule.solve(M_solve)
            cos = reference.cosine(M_solve)
        w = torch.where(finite.unsqueeze(-1), w, torch.zeros_like(w)) if self.nonfinite == "skip" else w
        raw = s_w = None
        if self.curriculum is not None:
            raw = self.curriculum.weights_from_cos(cos)
            s_w = self.curriculum.normalized(raw)
            w = w * s_w.to(w.dtype).unsqueeze(-1)
        mask = finite if s_w is None else finite & (s_w > 0)
        rule.update(cos, phi, mask)
        cur = self.curriculum
        self.last_stats = conflict_stats(cos, s_w, raw, cur.threshold_tensor if cur is not None else None,
                                         reduce=cur.reduce if cur is not None else "min")
        w = w.detach()
        if self.nonfinite in ("skip", "zero") and not bool(finite.all()):
            # Backpropagating a zero weight through a non-finite term still gives NaN
            # (0 * inf): combine the per-sample gradients chunk by chunk instead.
            self._accumulate(params, self._combine_chunks(losses, params, w, finite))
            return
        total = sum((w[:, k].to(l.dtype) * l).sum() for k, l in enumerate(losses))
        self._scale(total).backward(retain_graph=retain_graph)

    def _combine_chunks(self, losses: Sequence[Tensor], params: list[Tensor], w: Tensor,
                        finite: Tensor) -> Tensor:
        """sum_b w_b^T G_b from recomputed per-sample gradients, non-finite entries zeroed."""
        B = losses[0].shape[0]
        flat: Optional[Tensor] = None
        for s in range(0, B, self.chunk_size):
            rows = torch.arange(s, min(B, s + self.chunk_size), device=losses[0].device)
            Gc = torch.stack([self._per_sample_grads(l, params, rows) for l in losses], dim=1)
            Gc = torch.nan_to_num_(Gc, nan=0.0, posinf=0.0, neginf=0.0)
            if self.nonfinite == "skip":
                Gc[~finite[rows]] = 0
            part = reference.combine(Gc, w[rows], "sum")
            flat = part if flat is None else flat + part
        assert flat is not None
        return flat
