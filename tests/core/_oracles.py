"""Float64 oracles written independently of the engine.

Per-sample Python loops of the textbook algorithms on the actual gradient vectors
(no Gram-matrix algebra), exact min-norm QPs by active-set enumeration, and brute
force over the simplex. Slow, obviously correct, float64 only.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

F64 = torch.float64


def _fixed_order(K: int) -> list[list[int]]:
    return [list(range(K)) for _ in range(K)]


def pcgrad_sample(g: Tensor, order: Optional[Sequence[Sequence[int]]] = None) -> Tensor:
    """PCGrad (Yu et al. 2020, Alg. 1) on one sample's K x D gradients; returns sum_i g'_i."""
    g = g.to(F64)
    K = g.shape[0]
    order = _fixed_order(K) if order is None else order
    out = torch.zeros(g.shape[1], dtype=F64)
    for i in range(K):
        gi = g[i].clone()
        for j in order[i]:
            j = int(j)
            if j == i:
                continue
            d = torch.dot(gi, g[j])
            nj = torch.dot(g[j], g[j])
            if d < 0 and nj > 0:
                gi = gi - d / nj * g[j]
        out += gi
    return out


def gradvac_sample(
    g: Tensor, target: Tensor, order: Optional[Sequence[Sequence[int]]] = None
) -> tuple[Tensor, Tensor]:
    """GradVac (Wang et al. 2021) on one sample; returns (sum_i g'_i, phi (K, K) seen at visits)."""
    g = g.to(F64)
    target = target.to(F64)
    K = g.shape[0]
    order = _fixed_order(K) if order is None else order
    out = torch.zeros(g.shape[1], dtype=F64)
    phis = torch.zeros(K, K, dtype=F64)
    for i in range(K):
        gi = g[i].clone()
        for j in order[i]:
            j = int(j)
            if j == i:
                continue
            ni, nj = gi.norm(), g[j].norm()
            if ni == 0 or nj == 0:
                phi = torch.tensor(0.0, dtype=F64)
            else:
                phi = (torch.dot(gi, g[j]) / (ni * nj)).clamp(-1, 1)
            phis[i, j] = phi
            t = target[i, j]
            if phi < t and ni > 0 and nj > 0 and t < 1:
                coef = ni * (t * torch.sqrt(1 - phi**2) - phi * torch.sqrt(1 - t**2)) / (nj * torch.sqrt(1 - t**2))
                gi = gi + coef * g[j]
        out += gi
    return out, phis


def min_norm_point(g: Tensor) -> Tensor:
    """Exact min-norm point of conv{g_1..g_K} (K x D): enumerate active sets of the simplex QP."""
    g = g.to(F64)
    K = g.shape[0]
    M = g @ g.T
    best, best_val = None, math.inf
    for r in range(1, K + 1):
        for S in itertools.combinations(range(K), r):
            idx = list(S)
            A = torch.zeros(r + 1, r + 1, dtype=F64)
            A[:r, :r] = M[idx][:, idx]
            A[:r, r] = 1
            A[r, :r] = 1
            rhs = torch.zeros(r + 1, dtype=F64)
            rhs[r] = 1
            sol = torch.linalg.lstsq(A, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            wS = sol[:r]
            if (wS < -1e-12).any() or abs(float(wS.sum()) - 1) > 1e-8:
                continue
            w = torch.zeros(K, dtype=F64)
            w[idx] = wS.clamp_min(0)
            w = w / w.sum()
            val = float(w @ M @ w)
            if val < best_val:
                best, best_val = w, val
    assert best is not None
    return best @ g


def mgda_k2_closed_form(g: Tensor) -> Tensor:
    """Min-norm point of the segment [g_1, g_2]: gamma* = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1)."""
    g = g.to(F64)
    diff = g[0] - g[1]
    den = torch.dot(diff, diff)
    if den == 0:
        return g[0].clone()
    gamma = (torch.dot(g[1] - g[0], g[1]) / den).clamp(0, 1)
    return gamma * g[0] + (1 - gamma) * g[1]


def cagrad_objective(g: Tensor, w: Tensor, c: float) -> Tensor:
    """CAGrad dual objective F(w) = g_w . g0 + c |g0| |g_w| (g_w = w^T g, g0 = mean g)."""
    g0 = g.mean(0)
    gw = w @ g
    return gw @ g0 + c * g0.norm() * gw.norm()


def cagrad_k2_grid(g: Tensor, c: float, n: int = 20001) -> Tensor:
    """CAGrad direction for K = 2 by brute force over a fine grid of the simplex, x K."""
    g = g.to(F64)
    gam = torch.linspace(0, 1, n, dtype=F64)
    W = torch.stack([gam, 1 - gam], 1)
    GW = W @ g  # (n, D)
    g0 = g.mean(0)
    F = GW @ g0 + c * g0.norm() * GW.norm(dim=1)
    gw = GW[F.argmin()]
    d = g0 + (c * g0.norm() / gw.norm()) * gw if gw.norm() > 0 else g0
    return 2 * d


def random_unit_in_span(g: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """n random unit vectors in the row span of g (K x D)."""
    Q, _ = torch.linalg.qr(g.to(F64).T)  # (D, K)
    z = torch.randn(n, Q.shape[1], dtype=F64, generator=gen)
    z = z / z.norm(dim=1, keepdim=True)
    return z @ Q.T
