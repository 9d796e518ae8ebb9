"""Per-step conflict statistics a trainer can log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["ConflictStats", "conflict_stats", "HIST_EDGES"]

#: Edges of the cosine histogram reported by :meth:`ConflictStats.to_dict` (20 bins on [-1, 1]).
HIST_EDGES = torch.linspace(-1.0, 1.0, 21)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class ConflictStats:
    """Conflict statistics of one harmonization call (tensors are detached).

    Attributes:
        cos: (B, K, K) pairwise cosines before harmonization.
        score: (B,) conflict score (cosine for K = 2; min over pairs for K > 2).
        sample_weights: (B,) applied per-sample factor (1 without curriculum).
        curriculum_weights: (B,) raw curriculum weights in [0, 1], or None.
        threshold: curriculum score threshold (a float, or a 0-d tensor kept on the device
            until read, so that computing statistics costs no host sync), or None.
    """

    cos: Tensor
    score: Tensor
    sample_weights: Tensor
    curriculum_weights: Optional[Tensor] = None
    threshold: Optional[Union[float, Tensor]] = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return int(self.score.shape[0])

    @property
    def conflict_fraction(self) -> float:
        """Fraction of samples with at least one pair of conflicting gradients (cos < 0)."""
        if self.batch_size == 0:
            return 0.0
        return float((self.score < 0).float().mean())

    @property
    def kept_fraction(self) -> float:
        """Fraction of samples with a non-zero weight (mean raw weight for soft curricula)."""
        if self.batch_size == 0:
            return 0.0
        if self.curriculum_weights is None:
            return 1.0
        return float(self.curriculum_weights.float().mean())

    def histogram(self) -> Tensor:
        """Counts (20,) of the conflict score over :data:`HIST_EDGES`."""
        s = self.score.detach().float().cpu().clamp(-1, 1)
        return torch.histc(s, bins=20, min=-1.0, max=1.0).to(torch.int64)

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat floats for logging: fractions, score quantiles, mean cosine, histogram."""
        d: dict[str, float] = {
            f"{prefix}conflict_fraction": self.conflict_fraction,
            f"{prefix}kept_fraction": self.kept_fraction,
        }
        if self.batch_size:
            s = self.score.detach().float().cpu()
            qs = torch.quantile(s, torch.tensor(QUANTILES))
            for q, v in zip(QUANTILES, qs.tolist()):
                d[f"{prefix}cos_q{int(q * 100):02d}"] = v
            d[f"{prefix}cos_mean"] = float(s.mean())
            for i, c in enumerate(self.histogram().tolist()):
                d[f"{prefix}cos_hist_{i:02d}"] = float(c)
        if self.threshold is not None:
            d[f"{prefix}threshold"] = float(self.threshold)
        return d


def conflict_stats(
    cos: Tensor,
    sample_weights: Optional[Tensor] = None,
    curriculum_weights: Optional[Tensor] = None,
    threshold: Optional[Union[float, Tensor]] = None,
    reduce: str = "min",
) -> ConflictStats:
    """Statistics from cosines (B, K, K) (see :class:`ConflictStats`)."""
    from ..rules.curriculum import conflict_score

    cos = cos.detach()
    score = conflict_score(cos, reduce)
    if sample_weights is None:
        sample_weights = torch.ones_like(score)
    return ConflictStats(cos=cos, score=score, sample_weights=sample_weights.detach(),
                         curriculum_weights=None if curriculum_weights is None else curriculum_weights.detach(),
                         threshold=threshold)
