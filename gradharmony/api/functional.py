"""The functional op: :func:`harmonize`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from . import pipeline
from ..rules import ConflictCurriculum, Rule, get_rule
from .stats import ConflictStats, conflict_stats

__all__ = ["harmonize", "HarmonizeResult", "as_per_sample_grads", "check_losses"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


def as_per_sample_grads(grads: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """Validate and view per-sample gradients as a contiguous (B, K, D) tensor.

    Args:
        grads: a tensor (B, K, D) (trailing dims beyond 3 are flattened), or a sequence
            of K tensors of one shape (B, ...), each flattened per sample.
    Raises:
        TypeError: non-tensor or non-floating input.
        ValueError: K < 2, shapes/batch sizes that differ, mixed devices or dtypes.
    """
    if isinstance(grads, Tensor):
        if grads.ndim < 3:
            raise ValueError(
                f"per-sample gradients must have shape (B, K, D), got {tuple(grads.shape)}; "
                "pass a list of K tensors (B, ...) for one tensor per loss"
            )
        if grads.dtype not in _FLOATS:
            raise TypeError(f"gradients must be floating point, got dtype {grads.dtype}")
        if grads.shape[1] < 2:
            raise ValueError(f"need gradients of K >= 2 losses, got K={grads.shape[1]} (shape {tuple(grads.shape)})")
        # explicit trailing size: reshape(..., -1) is ambiguous for an empty batch (B = 0)
        G = grads.reshape(grads.shape[0], grads.shape[1], math.prod(grads.shape[2:]))
        return G.contiguous()
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads must be a tensor (B, K, D) or a sequence of K tensors, got {type(grads).__name__}")
    if len(grads) < 2:
        raise ValueError(f"need gradients of K >= 2 losses, got {len(grads)}")
    first = grads[0]
    for k, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"gradient of loss {k} is a {type(g).__name__}, not a tensor")
        if g.dtype not in _FLOATS:
            raise TypeError(f"gradient of loss {k} has dtype {g.dtype}; gradients must be floating point")
        if g.ndim < 1:
            raise ValueError(f"gradient of loss {k} is a scalar; per-sample gradients need shape (B, ...)")
        if g.shape != first.shape:
            what = "batch size" if g.shape[:1] != first.shape[:1] else "shape"
            raise ValueError(
                f"gradient of loss {k} has {what} {tuple(g.shape)} but loss 0 has {tuple(first.shape)}"
            )
        if g.device != first.device:
            raise ValueError(f"gradient of loss {k} is on {g.device} but loss 0 is on {first.device}")
        if g.dtype != first.dtype:
            raise TypeError(f"gradient of loss {k} has dtype {g.dtype} but loss 0 has {first.dtype}")
    B = first.shape[0]
    D = math.prod(first.shape[1:])  # not -1: ambiguous for an empty batch (B = 0)
    return torch.stack([g.reshape(B, D) for g in grads], dim=1)


def check_losses(losses: Sequence[Tensor]) -> None:
    """Check the K >= 2 losses handed to a ``backward(losses)``: tensors that require grad.

    Raises:
        ValueError: not a list/tuple of K >= 2, or a loss that does not require grad.
        TypeError: a loss that is not a tensor.
    """
    if not isinstance(losses, (list, tuple)) or len(losses) < 2:
        raise ValueError("losses must be a list of K >= 2 loss tensors")
    for k, l in enumerate(losses):
        if not isinstance(l, Tensor):
            raise TypeError(f"loss {k} is a {type(l).__name__}, not a tensor")
        if not l.requires_grad:
            raise ValueError(f"loss {k} does not require grad (was it computed under no_grad?)")


@dataclass
class HarmonizeResult:
    """What :func:`harmonize` returns.

    Attributes:
        grad: (B, D) harmonized gradient per sample, or (D,) with reduction "sum"/"mean".
        cos: (B, K, K) pairwise cosines before harmonization.
        weights: (B, K) coefficients, curriculum weights included:
            ``grad = einsum("bk,bkd->bd", weights, G)`` (summed over b for "sum", / B for "mean").
        gram: (B, K, K) Gram matrices ``G_b G_b^T``.
        sample_weights: (B,) applied per-sample curriculum factor, or None.
        curriculum_weights: (B,) raw curriculum weights in [0, 1], or None.
        backend: name of the backend that ran.
        nonfinite_samples: (n,) indices of the samples that held NaN/inf, or None (a property).
        finite: (B,) bool mask of the finite samples when the health check ran on the device
            (no host sync; ``nonfinite_samples`` reads it), else None.
    """

    grad: Tensor
    cos: Tensor
    weights: Tensor
    gram: Tensor
    sample_weights: Optional[Tensor]
    curriculum_weights: Optional[Tensor]
    backend: str
    threshold: Optional[Union[float, Tensor]] = None  # 0-d tensor until read (no host sync)
    score_reduce: str = "min"
    _nonfinite: Optional[Tensor] = field(default=None, repr=False)
    _stats: Optional[ConflictStats] = field(default=None, repr=False)
    finite: Optional[Tensor] = field(default=None, repr=False)

    @property
    def nonfinite_samples(self) -> Optional[Tensor]:
        """(n,) indices of the samples whose gradients held NaN/inf, or None if none did.

        Where the health check ran on the device (an accelerator or ``torch.compile``; see
        README, "Numerics"), the indices are read from the (B,) mask ``finite`` only here
        (one host sync, on first read).
        """
        if self._nonfinite is None and self.finite is not None and self.finite.numel():
            idx = (~self.finite).nonzero().squeeze(-1)
            self._nonfinite = idx if idx.numel() else None
            self.finite = None
        return self._nonfinite

    @property
    def stats(self) -> ConflictStats:
        """Conflict statistics of this call (see :class:`ConflictStats`)."""
        if self._stats is None:
            self._stats = conflict_stats(self.cos, self.sample_weights, self.curriculum_weights, self.threshold,
                                         reduce=self.score_reduce)
        return self._stats


def harmonize(
    grads: Union[Tensor, Sequence[Tensor]],
    method: Union[str, Rule] = "pcgrad",
    *,
    reduction: str = "none",
    curriculum: Optional[ConflictCurriculum] = None,
    backend: str = "auto",
    nonfinite: str = "raise",
    **rule_kwargs: Any,
) -> HarmonizeResult:
    """Harmonize per-sample gradients of K losses.

    For each sample b with gradients ``G_b = [g_1; ...; g_K]`` (K x D) the rule maps the
    Gram matrix ``G_b G_b^T`` to weights ``w_b`` and the output is ``s_b w_b^T G_b``
    (``s_b`` the curriculum weight). One pass over G computes all Gram matrices, a tiny
    per-sample solve gives the weights, one more pass combines (fused into one kernel
    where possible). Given one (B, K, D) tensor, nothing of that size is allocated besides
    it; K separate tensors (what :class:`Harmonizer` passes) are first stacked into one new
    (B, K, D) tensor, and ``nonfinite="skip"`` / ``"zero"`` copy G once when it holds a
    non-finite entry (see ``bench/bench_input_copy.py``).

    Args:
        grads: (B, K, D) tensor, or K tensors (B, ...) of one shape.
        method: "sum", "pcgrad", "gradvac", "cagrad", "mgda", or a :class:`Rule`
            (pass a rule instance to keep state such as the GradVac EMA across calls).
        reduction: "none" -> grad (B, D); "sum" / "mean" over samples -> (D,).
        curriculum: optional :class:`ConflictCurriculum` weighting samples by conflict.
        backend: "auto", "torch" (reference), "cpp", "cuda" or "triton".
        nonfinite: "raise" (default), "skip" (drop samples with NaN/inf), "zero" (zero
            the non-finite entries) or "propagate" (pass them through, for GradScaler).
            "raise" reads the Gram diagonals on the host once per call; the others run
            without a host sync on an accelerator and under ``torch.compile`` (README,
            "Host syncs").
        **rule_kwargs: options of the rule named by ``method`` (e.g. ``c=0.4``).

    Autograd: the outputs are detached first-order results (no graph through the
    harmonization, even when ``grads`` require grad), on every backend.

    Example:
        >>> import torch, gradharmony as gh
        >>> G = torch.tensor([[[1.0, 0.0], [-1.0, 1.0]]])  # one sample, two conflicting losses
        >>> r = gh.harmonize(G, "pcgrad")
        >>> r.grad
        tensor([[0.5000, 1.5000]])
        >>> round(float(r.cos[0, 0, 1]), 4)
        -0.7071
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if curriculum is not None and not isinstance(curriculum, ConflictCurriculum):
        raise TypeError(f"curriculum must be a ConflictCurriculum, got {type(curriculum).__name__}")
    rule = get_rule(method, **rule_kwargs)
    G = as_per_sample_grads(grads)
    B = G.shape[0]
    if G.requires_grad:  # the contract: first-order, detached outputs (see README, "Autograd")
        G = G.detach()
    with torch.no_grad():
        res = pipeline.run(G, rule, curriculum, backend=backend, nonfinite=nonfinite,
                           reduction="none" if reduction == "none" else "sum")
    out = res.out
    if reduction == "mean" and B > 0:
        out = out / B
    wd = res.weighed
    return HarmonizeResult(
        grad=out,
        cos=wd.cos,
        weights=wd.weights,
        gram=res.gram,
        sample_weights=wd.sample_weights,
        curriculum_weights=wd.curriculum_weights,
        backend=res.backend,
        threshold=wd.threshold,
        score_reduce=wd.score_reduce,
        _nonfinite=res.nonfinite_samples,
        _stats=None,
        finite=res.finite,
    )
