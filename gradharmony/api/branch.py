"""The autograd-aware branch op: harmonize per-sample gradients at a shared representation.

Path decomposition (DESIGN.md): the shared representation ``h`` (B, ...) is handed to K
consumers through an identity forward. Backward receives ``dL_k/dh_b`` for every loss k
and sample b — the part of each loss's gradient that flows through sample b's own
representation, negatives of contrastive losses included — harmonizes them per sample
and passes one gradient on to whatever produced ``h``. With ``method="sum"`` this is
exactly plain backpropagation.

Autograd contract (every backend): the gradient passed on is a detached first-order
result. Under ``create_graph=True`` the backward still runs; asking for a gradient of
that gradient (double backward) raises a ``RuntimeError`` naming the op, instead of
returning a silently wrong second-order term.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..rules import ConflictCurriculum, Rule, get_rule
from .functional import HarmonizeResult, harmonize
from .stats import ConflictStats

__all__ = ["Harmonizer"]


class _Branch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, harmonizer: "Harmonizer", h: Tensor, k: int) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.harmonizer = harmonizer
        ctx.set_materialize_grads(False)
        return tuple(h.view_as(h) for _ in range(k))

    @staticmethod
    @once_differentiable  # first-order only: a second-order gradient through it raises
    def backward(ctx: Any, *grads: Optional[Tensor]):  # type: ignore[override]
        present = [g for g in grads if g is not None]
        if not present:
            return None, None, None
        if len(present) == 1:  # a single consumer used h: nothing to harmonize
            return None, present[0], None
        shape = present[0].shape
        res = ctx.harmonizer._harmonize(present)
        return None, res.grad.reshape(shape), None


class Harmonizer:
    """Per-sample gradient harmonization at a shared representation.

    Args:
        method: rule name ("sum", "pcgrad", "gradvac", "cagrad", "mgda") or a :class:`Rule`.
        curriculum: optional :class:`ConflictCurriculum` weighting samples by conflict.
        backend: engine backend ("auto", "torch", "cpp", "cuda", "triton").
        nonfinite: policy for NaN/inf gradients (see :func:`harmonize`); use
            "propagate" with ``torch.amp.GradScaler`` so that it sees overflows.
        **rule_kwargs: options of the rule.

    Example:
        >>> import torch, gradharmony as gh
        >>> h = torch.randn(8, 16, requires_grad=True)
        >>> harm = gh.Harmonizer("pcgrad")
        >>> a, b = harm.branch(h, 2)
        >>> loss = (a.sum(1) ** 2).mean() + (b @ torch.randn(16)).mean()
        >>> loss.backward()
        >>> h.grad.shape, 0.0 <= harm.last_stats.conflict_fraction <= 1.0
        (torch.Size([8, 16]), True)
    """

    def __init__(
        self,
        method: Union[str, Rule] = "pcgrad",
        curriculum: Optional[ConflictCurriculum] = None,
        backend: str = "auto",
        nonfinite: str = "raise",
        **rule_kwargs: Any,
    ) -> None:
        self.rule = get_rule(method, **rule_kwargs)
        if curriculum is not None and not isinstance(curriculum, ConflictCurriculum):
            raise TypeError(f"curriculum must be a ConflictCurriculum, got {type(curriculum).__name__}")
        self.curriculum = curriculum
        self.backend = backend
        self.nonfinite = nonfinite
        self.last_result: Optional[HarmonizeResult] = None

    def branch(self, h: Tensor, k: int) -> tuple[Tensor, ...]:
        """K autograd-aware identity views of ``h`` (B, ...) whose gradients are harmonized.

        Each loss must be computed from its own view. Views that no loss uses are ignored.
        """
        if not isinstance(h, Tensor):
            raise TypeError(f"h must be a tensor, got {type(h).__name__}")
        if h.ndim < 1:
            raise ValueError("h must have a batch dimension (B, ...)")
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an int >= 2, got {k!r}")
        if not torch.is_grad_enabled() or not h.requires_grad:
            return tuple(h for _ in range(k))
        return _Branch.apply(self, h, k)

    def _harmonize(self, grads: list[Tensor]) -> HarmonizeResult:
        res = harmonize(
            grads, self.rule, reduction="none", curriculum=self.curriculum,
            backend=self.backend, nonfinite=self.nonfinite,
        )
        self.last_result = res
        return res

    @property
    def last_stats(self) -> Optional[ConflictStats]:
        """Conflict statistics of the last backward through :meth:`branch`."""
        return None if self.last_result is None else self.last_result.stats

    def step(self) -> None:
        """Advance the curriculum by one training step (no-op without one)."""
        if self.curriculum is not None:
            self.curriculum.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.state_dict(),
            "curriculum": None if self.curriculum is None else self.curriculum.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["rule"])
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])

    def __repr__(self) -> str:
        return f"Harmonizer(rule={self.rule!r}, curriculum={self.curriculum!r}, backend={self.backend!r})"
