"""The one harmonization pipeline of the API layer.

Every entry point (:func:`~gradharmony.harmonize`, the branch op of
:class:`~gradharmony.Harmonizer` and both granularities of
:class:`~gradharmony.HarmonizedOptimizer`) runs the same steps:

1. Gram matrices ``M_b = G_b G_b^T`` (engine backend; a fused kernel where possible);
2. one health check of their diagonals (:func:`gradharmony.engine.core.health_check`);
3. the rule's solve ``M_b -> w_b``;
4. curriculum weights ``s_b`` (samples skipped as non-finite are out of the batch: they
   enter neither the quantile nor the normalisation, and get ``s_b = 0``);
5. the rule state update (GradVac's EMA) on the kept samples;
6. the combine ``sum_k s_b w_{b,k} g_{b,k}``;
7. statistics (computed lazily from the same cosines and weights).

Steps 3-5 and 7 only need the Gram matrices: :func:`weigh` is that part, callable with
Gram matrices computed elsewhere (e.g. from activations and output gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

from ..engine import core
from ..engine.backends import FUSED_MAX_K, select_backend
from ..rules import ConflictCurriculum, Rule
from .stats import ConflictStats, conflict_stats

__all__ = ["Weighed", "weigh", "run"]


@dataclass
class Weighed:
    """Weights of one call (see :func:`weigh`).

    Attributes:
        cos: (B, K, K) pairwise cosines before harmonization.
        weights: (B, K) coefficients with the curriculum folded in: the harmonized
            gradient of sample b is ``sum_k weights[b, k] g_{b,k}``. 0 for skipped samples.
        phi: (B, K, K) GradVac visit cosines, or None.
        sample_weights: (B,) applied curriculum factor (normalised), or None.
        curriculum_weights: (B,) raw curriculum weights in [0, 1], or None.
        finite: (B,) bool, False for samples with NaN/inf gradients.
        threshold: curriculum score threshold (0-d tensor), or None.
        score_reduce: how the curriculum reduces pairwise cosines ("min"/"mean").
    """

    cos: Tensor
    weights: Tensor
    phi: Optional[Tensor]
    sample_weights: Optional[Tensor]
    curriculum_weights: Optional[Tensor]
    finite: Tensor
    threshold: Optional[Union[float, Tensor]] = None
    score_reduce: str = "min"
    _stats: Optional[ConflictStats] = field(default=None, repr=False)

    @property
    def stats(self) -> ConflictStats:
        """Conflict statistics (see :class:`~gradharmony.ConflictStats`)."""
        if self._stats is None:
            self._stats = conflict_stats(self.cos, self.sample_weights, self.curriculum_weights,
                                         self.threshold, reduce=self.score_reduce)
        return self._stats


def weigh(
    M: Tensor,
    rule: Rule,
    curriculum: Optional[ConflictCurriculum] = None,
    finite: Optional[Tensor] = None,
    nonfinite: str = "skip",
    *,
    solved: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None,
    order: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
    masked: bool = False,
) -> Weighed:
    """Rule coefficients, curriculum weights, rule state update and statistics from Grams.

    Args:
        M: (B, K, K) Gram matrices to solve on (finite, in a safe range: the
            ``gram_solve`` of :func:`gradharmony.engine.core.health_check`, or Grams the
            caller computed and checked itself).
        rule: a :class:`~gradharmony.rules.Rule`; its state (GradVac's EMA) is updated
            with the cosines of the kept samples.
        curriculum: optional :class:`~gradharmony.ConflictCurriculum`.
        finite: (B,) bool, False for samples whose gradients held NaN/inf (default: all
            True). They never update the rule state.
        nonfinite: what the non-finite samples are: "skip" (out of the batch: weight 0,
            excluded from the curriculum's quantile and normalisation), "zero" or
            "propagate" (kept in the batch as they are).
        solved: ``(cos, w, phi)`` already solved on ``M`` (a kernel did it), or None.
        order: the visiting order (B, K, K) the solve used, or None to draw it from the rule.
        dtype: dtype of the solved cosines and weights (default: M's; the health check's
            ``gram_solve`` is float64 where it holds rebuilt rows, pass the accumulation dtype).
        masked: ``finite`` comes from a device health check: it is applied as a mask without
            reading it on the host (one read remains with a curriculum under "skip": the
            curriculum's quantile is over the kept samples).
    Returns:
        :class:`Weighed`; ``weights`` (B, K) include the curriculum factor.
    """
    core.check_policy(nonfinite)
    if M.ndim != 3 or M.shape[1] != M.shape[2]:
        raise ValueError(f"M must be Gram matrices (B, K, K), got shape {tuple(M.shape)}")
    B, K, _ = M.shape
    if solved is None:
        if rule.method_id is not None:
            if order is None:
                order = rule.order(B, K, M.device)
            solved = core.solve_rows(M, rule.method_id, order, rule.target(K, M.device), None, dtype=dtype)
        else:
            solved = core.solve_rows(M, None, None, None, rule.solve, dtype=dtype)
    cos, w, phi = solved
    given = finite is not None
    if finite is None:
        finite = torch.ones(B, dtype=torch.bool, device=M.device)
    elif finite.shape != (B,) or finite.dtype != torch.bool:
        raise ValueError(f"finite must be a bool tensor of shape ({B},), got {finite.dtype} {tuple(finite.shape)}")
    if not given:
        all_finite = True  # nothing to read
    elif masked and not (curriculum is not None and nonfinite == "skip"):
        all_finite = False  # not read on the host: masking is a no-op on finite samples
    else:
        all_finite = bool(finite.all()) if B else True
    skip = nonfinite == "skip" and not all_finite
    raw = s = None
    if curriculum is not None:
        if skip:  # a skipped sample is out of the batch for the curriculum too
            raw = cos.new_zeros(B, dtype=torch.float32)
            s = cos.new_zeros(B, dtype=torch.float32)
            raw_keep = curriculum.weights_from_cos(cos[finite])
            raw[finite] = raw_keep.to(raw.dtype)
            s[finite] = curriculum.normalized(raw_keep).to(s.dtype)
        else:
            raw = curriculum.weights_from_cos(cos)
            s = curriculum.normalized(raw)
        w = w * s.to(w.dtype).unsqueeze(-1)
    if skip:
        w = torch.where(finite.unsqueeze(-1), w, torch.zeros_like(w))
    mask = None
    if s is not None:
        mask = s > 0
    if not all_finite:
        mask = finite if mask is None else mask & finite
    rule.update(cos, phi, mask)
    return Weighed(cos=cos, weights=w, phi=phi, sample_weights=s, curriculum_weights=raw, finite=finite,
                   threshold=curriculum.threshold_tensor if curriculum is not None else None,
                   score_reduce=curriculum.reduce if curriculum is not None else "min")


@dataclass
class PipelineOutput:
    out: Tensor  # (B, D) or (D,)
    gram: Tensor  # (B, K, K)
    weighed: Weighed
    backend: str
    nonfinite_samples: Optional[Tensor]  # None also when the check ran on the device (see finite)
    finite: Optional[Tensor] = None  # (B,) bool from a device check (nonfinite_samples is then None)


def run(
    G: Tensor,
    rule: Rule,
    curriculum: Optional[ConflictCurriculum] = None,
    *,
    backend: str = "auto",
    nonfinite: str = "raise",
    reduction: str = "none",
) -> PipelineOutput:
    """The whole pipeline on validated, contiguous per-sample gradients G (B, K, D).

    ``reduction``: "none" (B, D) or "sum" over samples (D,).
    """
    core.check_policy(nonfinite)
    be = select_backend(backend, G)
    B, K, _ = G.shape
    kernel = rule.method_id is not None and K <= FUSED_MAX_K
    order = rule.order(B, K, G.device) if rule.method_id is not None else None
    target = rule.target(K, G.device) if rule.method_id is not None else None
    if core.use_device_check(G, nonfinite):
        # no host sync: every row is solved on the rescaled float64 Gram, then combined
        h = core.health_check(G, None, nonfinite, device=True)
        weighed = weigh(h.gram_solve, rule, curriculum, h.finite, nonfinite, order=order,
                        dtype=h.gram.dtype, masked=True)
        out = core.combine(be, G, weighed.weights, reduction, h, nonfinite)
        return PipelineOutput(out=out, gram=h.gram, weighed=weighed, backend=be.name,
                              nonfinite_samples=None, finite=h.finite)
    out = solved = None
    if kernel:  # the fused op, or under a curriculum the solve op (no combine)
        out, M, cos, w, phi = core.kernel_solve(be, G, rule.method_id, order, target,
                                                reduction if curriculum is None else None)
        solved = (cos, w, phi)
    else:
        M = be.gram(G)
    h = core.health_check(G, M, nonfinite)
    if solved is not None:
        solved = core.solve_rows(h.gram_solve, rule.method_id, order, target, None, solved, h.repaired)
    finite = h.finite if h.nonfinite_samples is not None else None  # None: no host sync in weigh
    weighed = weigh(h.gram_solve, rule, curriculum, finite, nonfinite, solved=solved, order=order, dtype=M.dtype)
    stale = h.repaired is not None or (h.nonfinite_samples is not None and nonfinite in ("skip", "zero"))
    if out is None or stale:
        out = be.combine(core.repaired_input(G, h, nonfinite), weighed.weights, reduction)
    return PipelineOutput(out=out, gram=h.gram, weighed=weighed, backend=be.name,
                          nonfinite_samples=h.nonfinite_samples)
