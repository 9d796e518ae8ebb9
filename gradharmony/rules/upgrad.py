"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024, arXiv:2406.16232, eq. 5), per sample.

Each gradient is projected onto the dual cone ``{d : g_k . d >= 0 for all k}`` of all of
them and the projections are summed: ``out = sum_i pi(g_i)``. With the Gram matrix, the
projection of ``g_i`` is ``(e_i + v_i)^T G`` where ``v_i = argmin_{v >= 0} 1/2 v^T M v +
(M e_i)^T v`` (the dual of the projection; Moreau). The K non-negative least-squares
problems of every sample are solved together, exactly on their active sets, in float64
(:mod:`gradharmony.rules._qp`) — per sample and vectorized over the batch.

The output never conflicts with any gradient (``g_k . out >= 0``) and equals ``sum_k g_k``
when no pair conflicts.

Conventions (docs/RULES.md): sum scale; torchjd's ``UPGradWeighting`` (default preference
vector ``1/K``) returns these weights divided by K.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._qp import active_set_qp, warn_unconverged
from .base import Rule, check_max_iter, solve_float64

__all__ = ["UPGrad", "dual_cone_weights"]


def dual_cone_weights(M: Tensor, U: Tensor, max_iter: Optional[int] = None) -> Tensor:
    """Weights of the projections of the vectors ``U^T G`` onto the dual cone of G's rows.

    Args:
        M: (B, K, K) Gram matrices, float64.
        U: (B, P, K) the P vectors to project, as weights of the rows of G.
        max_iter: cap on active-set steps per problem.
    Returns:
        (B, P, K): ``U + V`` with ``V >= 0``, ``(U + V)^T G`` the projections.
    """
    B, P, K = U.shape
    A = M.unsqueeze(1).expand(B, P, K, K).reshape(B * P, K, K)
    q = torch.einsum("bpk,bkj->bpj", U, M).reshape(B * P, K)
    V, ok = active_set_qp(A, q, simplex=False, max_iter=max_iter)
    warn_unconverged(ok, "dual-cone projection", max_iter)
    return U + V.view(B, P, K)


class UPGrad(Rule):
    """UPGrad per sample: the sum of each gradient's projection onto the dual cone.

    Args:
        max_iter: cap on the active-set steps of each projection (None: 4K + 20).
    """

    name = "upgrad"

    def __init__(self, max_iter: Optional[int] = None) -> None:
        self.max_iter = check_max_iter(max_iter)

    def solve(self, M: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        Mn = solve_float64(M)
        B, K, _ = Mn.shape
        eye = torch.eye(K, dtype=Mn.dtype, device=Mn.device).expand(B, K, K)
        W = dual_cone_weights(Mn, eye, self.max_iter)
        return W.sum(1).to(M.dtype), None

    def __repr__(self) -> str:
        return f"UPGrad(max_iter={self.max_iter})"
