"""MGDA: the min-norm point of the convex hull of the gradients (Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, eq. 3 / Désidéri 2012).

Per sample, ``w* = argmin_{w in simplex} |w^T G|^2 = argmin w^T M w``, solved exactly on its
active set for every K (Wolfe's min-norm-point / primal active-set method, batched over the
samples in float64: :mod:`gradharmony.rules._qp`). ``d = w*^T G`` is the common descent
direction (``g_k . d >= |d|^2`` for all k, with equality where ``w*_k > 0``); it is 0 exactly
when the sample is Pareto-stationary (0 in the hull).

Conventions (docs/RULES.md): returned as ``K w*`` (output ``K d``), the scale of a sum of K
gradients. torchjd's ``MGDAWeighting`` and the paper return ``w*`` (weights summing to 1);
LibMTL's ``MGDA`` normalizes the gradients first (``mgda_gn='l2'``: unit-norm rows) and
returns ``K w*`` of the normalized rows. To reproduce LibMTL with ``'l2'``: divide each row
by its norm before calling. To reproduce torchjd: divide by K.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._qp import active_set_qp, warn_unconverged
from .base import Rule, check_max_iter, solve_float64

__all__ = ["MGDA", "min_norm_weights"]


def min_norm_weights(M: Tensor, max_iter: Optional[int] = None) -> Tensor:
    """Weights of the min-norm point of conv{g_1..g_K} per sample.

    Args:
        M: (B, K, K) Gram matrices, any float dtype (solved in float64 after scaling by the
            mean diagonal).
        max_iter: cap on active-set steps (None: 4K + 20).
    Returns:
        (B, K) float64 weights on the simplex.
    """
    Mn = solve_float64(M)
    B, K, _ = Mn.shape
    w, ok = active_set_qp(Mn, torch.zeros(B, K, dtype=Mn.dtype, device=Mn.device), simplex=True,
                          max_iter=max_iter)
    warn_unconverged(ok, "mgda", max_iter)
    return w


class MGDA(Rule):
    """MGDA per sample: ``K`` times the min-norm convex combination of the K gradients.

    Args:
        max_iter: cap on the active-set steps of the simplex solve (None: 4K + 20, more
            than the solver takes on any input we know).
    """

    name = "mgda"

    def __init__(self, max_iter: Optional[int] = None) -> None:
        self.max_iter = check_max_iter(max_iter)

    def solve(self, M: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        K = M.shape[1]
        return (K * min_norm_weights(M, self.max_iter)).to(M.dtype), None

    def __repr__(self) -> str:
        return f"MGDA(max_iter={self.max_iter})"
