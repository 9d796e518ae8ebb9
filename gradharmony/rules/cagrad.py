"""CAGrad: conflict-averse gradient descent (Liu et al., "Conflict-Averse Gradient Descent
for Multi-task Learning", NeurIPS 2021, eq. 2-3 and Algorithm 1), per sample.

With ``g0 = mean_k g_k`` and ``s = c |g0|``, CAGrad's direction is the maximizer of the
worst-case improvement in a ball around the average,

    d* = argmax_{|d - g0| <= s} min_k g_k . d,

through its dual ``w* = argmin_{w in simplex} F(w) = g_w . g0 + s |g_w|`` (``g_w = w^T G``):
``d* = g0 + (s / |g_w*|) g_w*``. Both sides have the same optimal value ``V* = F(w*)``.

**Solve, exact for every K.** For ``tau > 0`` let ``w(tau) = argmin_{w in simplex}
1/2 |g_w|^2 + tau g_w . g0`` (a simplex QP, solved exactly on its active set by
:mod:`gradharmony.rules._qp`). By the perspective form ``s |x| = min_tau |x|^2 / (2 tau) +
s^2 tau / 2``, ``w*`` is ``w(tau*)`` where ``|g_w(tau)| = s tau`` and ``|g_w(tau)| / tau`` is
non-increasing. On a fixed active set ``w(tau)`` is affine in ``tau``, so the equation is a
quadratic there: each step solves the QP at ``tau`` (warm-started), takes the root of that
face's quadratic, and falls back to bisecting the bracket on ``log tau`` when the root leaves
it; it ends when ``tau`` is stationary to float64 resolution, i.e. exact on the final active
set. Then ``lambda = s / |g_w*|``.

**Pareto-stationary samples.** When 0 lies in the hull of the gradients and the ball reaches
the dual cone ``C = {d : g_k . d >= 0 for all k}``, the optimal value is ``V* = 0``, the dual
optimum has ``g_w* = 0`` and the formula above divides by zero; every ``d`` of the ball with
``min_k g_k . d = 0`` (the ball's part of C) is optimal. gradharmony then returns the optimal
``d`` nearest ``g0``: the projection ``P_C(g0) = g0 + G^T v`` (``v >= 0``, the same
non-negative QP as UPGrad's), which lies in the ball. It is also the limit of
``g0 + lambda g_w`` along the dual path. A sample is treated as stationary when its
min-norm point is below ``2 sqrt(K eps)`` times the RMS gradient norm (``eps`` of the Gram's
dtype: the resolution of a norm read from a Gram matrix) and ``|P_C(g0) - g0| <= s``.
E.g. ``G = [[0, 1], [1, 1], [0, -2]]``, ``c = 0.4``: ``g0`` is in C, the output is
``K g0 = [1, 0]``; ``G = [[-1, 2], [1, 1], [-1, -1]]``: the output is ``[-1.5, 1.5]``.

Conventions (docs/RULES.md): returned as the weights of ``K d*`` (``c = 0`` gives ``sum``).
The official code and LibMTL return ``d* / (1 + c^2)`` (``rescale=1``, their default) or
``d* / (1 + c)`` (``rescale=2``); torchjd returns ``d*`` computed on the Gram matrix
normalized to unit trace-ish scale (``normalize``) and 0 at a Pareto-stationary sample.
Default ``c = 0.4`` (the paper's multi-task setting); LibMTL and torchjd examples use 0.5.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._qp import active_set_qp, warn_unconverged
from .base import Rule, check_float, check_max_iter, solve_float64
from .upgrad import dual_cone_weights

__all__ = ["CAGrad", "cagrad_weights"]

#: Cap on the root-finding steps on log(tau) (face root, else bisection of a bracket at most
#: log(max|g_k| / tol) <~ 20 wide: 2^-60 of it is < 2e-17). The face root usually ends it in a few steps.
MAX_STEPS = 80


def _face_root(M: Tensor, b: Tensor, s: Tensor, w: Tensor, tau: Tensor) -> Tensor:
    """Root tau' of ``|g_w(tau')|^2 = s^2 tau'^2`` with w(tau') = p + tau' q on w's face.

    On the face F = supp(w): ``M_FF w_F + nu 1 = -tau b_F``, ``sum w_F = 1``; q solves the
    same bordered system with right-hand side ``(-b_F, 0)``, ``p = w - tau q``. Returns the
    root where the quadratic crosses from + to - (NaN where there is none).
    """
    B, K = w.shape
    m = (w > 0).to(M.dtype)
    A = torch.zeros(B, K + 1, K + 1, dtype=M.dtype, device=M.device)
    A[:, :K, :K] = M * (m.unsqueeze(-1) * m.unsqueeze(-2)) + torch.diag_embed(1 - m)
    A[:, :K, K] = m
    A[:, K, :K] = m
    rhs = torch.zeros(B, K + 1, dtype=M.dtype, device=M.device)
    rhs[:, :K] = -b * m
    sol, info = torch.linalg.solve_ex(A, rhs)
    q = torch.where((info == 0).unsqueeze(-1), sol[:, :K] * m, torch.nan)
    p = w - tau.unsqueeze(-1) * q
    a2 = torch.einsum("bk,bkj,bj->b", q, M, q) - s * s
    a1 = torch.einsum("bk,bkj,bj->b", p, M, q)
    a0 = torch.einsum("bk,bkj,bj->b", p, M, p)
    disc = a1 * a1 - a2 * a0
    # f(x) = a2 x^2 + 2 a1 x + a0 (|g_w|^2 - s^2 x^2): take the root where f decreases,
    # f'(x) = 2 (a2 x + a1) < 0, as h does
    sq = disc.clamp_min(0).sqrt()
    r1 = (-a1 - sq) / a2
    r2 = (-a1 + sq) / a2
    r = torch.where(a2 * r1 + a1 < 0, r1, r2)
    lin = -a0 / (2 * a1)  # a2 = 0
    r = torch.where(a2 == 0, lin, r)
    return torch.where(disc >= 0, r, torch.nan)


def _norm(M: Tensor, w: Tensor) -> Tensor:
    return torch.einsum("bk,bkj,bj->b", w, M, w).clamp_min(0).sqrt()


def cagrad_weights(M: Tensor, c: float = 0.4, max_iter: Optional[int] = None) -> Tensor:
    """CAGrad weights per sample: ``K d* = w^T G`` with ``w = K (1/K + lambda w*)``.

    Args:
        M: (B, K, K) Gram matrices (any float dtype; solved in float64 after scaling each
            sample by its mean diagonal, which CAGrad's direction is equivariant to).
        c: radius factor, >= 0.
        max_iter: cap on active-set steps of each QP solve.
    Returns:
        (B, K) float64 weights (stationary samples: ``K (1/K + v)``, see the module doc).
    """
    B, K, _ = M.shape
    eps = torch.finfo(M.dtype).eps
    Mn = solve_float64(M)
    dt, dev = Mn.dtype, Mn.device
    u = torch.full((B, K), 1.0 / K, dtype=dt, device=dev)
    if c == 0:
        return K * u
    b = torch.einsum("bkj,bj->bk", Mn, u)  # g_k . g0
    s = c * (b * u).sum(-1).clamp_min(0).sqrt()
    zeros = torch.zeros(B, K, dtype=dt, device=dev)
    w_min, ok_min = active_set_qp(Mn, zeros, simplex=True, max_iter=max_iter)
    t_min = _norm(Mn, w_min)
    # the projection of g0 onto the dual cone: weights u + v
    uv = dual_cone_weights(Mn, u.unsqueeze(1), max_iter).squeeze(1)
    r = _norm(Mn, uv - u)
    tol_t = 2.0 * math.sqrt(K * eps)
    stationary = ((t_min <= tol_t) & (r <= s)) | (s <= 0)
    finite = torch.isfinite(Mn).flatten(1).all(-1)
    # the root of h(tau) = |g_w(tau)| / tau - s (non-increasing) on log tau
    t_max = Mn.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(0).sqrt()
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    tiny = 1e-300
    # h(tau_lo) >= 0 at tau_lo = max(t_min, tol_t) / s: |g_w| >= t_min, and where t_min < tol_t
    # (0 in the hull to the Gram's resolution, not stationary) |g_w(tau)| ~ r tau with r > s.
    # Below tol_t a norm read from the Gram is rounding: the bracket stays above it.
    lo = torch.log(t_min.clamp_min(tol_t) / s_safe)
    hi = torch.log(t_max.clamp_min(tiny) / s_safe)
    w = w_min
    tau = torch.exp(0.5 * (lo + hi))
    width_2 = width_1 = torch.full_like(lo, math.inf)
    for _ in range(MAX_STEPS):
        w, _ = active_set_qp(Mn, tau.unsqueeze(-1) * b, simplex=True, w0=w, max_iter=max_iter)
        above = _norm(Mn, w) >= s * tau  # h(tau) >= 0: the root is to the right
        log_tau = torch.log(tau)
        lo = torch.where(above, log_tau, lo)
        hi = torch.where(above, hi, log_tau)
        # on w's face, w(tau') = p + tau' q exactly: |g_w(tau')|^2 = s^2 tau'^2 is a quadratic
        root = _face_root(Mn, b, s, w, tau)
        ok = torch.isfinite(root) & (root > 0)
        lr = torch.log(torch.where(ok, root, torch.ones_like(root)))
        # tau is the root of its own face's quadratic: exact on this active set
        converged = ok & ((lr - log_tau).abs() <= 1e-13 * (1 + log_tau.abs()))
        # safeguard (as in Brent's method): take the root only strictly inside the bracket and
        # while the bracket halves at least every two steps; else bisect (two faces whose
        # roots lie on each other's side would otherwise alternate for ever)
        slack = 1e-13 * (1 + lo.abs() + hi.abs())
        ok &= (lr > lo + slack) & (lr < hi - slack)
        width = hi - lo
        ok &= width <= 0.5 * width_2
        width_2, width_1 = width_1, width
        nxt = torch.where(converged, log_tau, torch.where(ok, lr, 0.5 * (lo + hi)))
        tau = torch.exp(nxt)
        converged |= stationary | ~finite  # a NaN/inf sample: nothing to bisect
        if bool(converged.all()):
            break
    w, ok = active_set_qp(Mn, tau.unsqueeze(-1) * b, simplex=True, w0=w, max_iter=max_iter)
    warn_unconverged(ok_min & (ok | stationary), "cagrad", max_iter)
    t = _norm(Mn, w)
    lam = torch.where(t > 0, s / torch.where(t > 0, t, torch.ones_like(t)), torch.zeros_like(t))
    out = u + lam.unsqueeze(-1) * w
    out = torch.where(stationary.unsqueeze(-1), uv, out)
    return K * out


class CAGrad(Rule):
    """CAGrad per sample (Liu et al., NeurIPS 2021), exact for every K.

    Args:
        c: radius of the conflict-averse ball, ``|d - g0| <= c |g0|`` (paper: 0.4), >= 0.
        max_iter: cap on the active-set steps of each QP solve (None: 4K + 20).
    """

    name = "cagrad"

    def __init__(self, c: float = 0.4, max_iter: Optional[int] = None) -> None:
        self.c = check_float("c", c, 0.0)
        self.max_iter = check_max_iter(max_iter)

    def solve(self, M: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return cagrad_weights(M, self.c, self.max_iter).to(M.dtype), None

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c}, max_iter={self.max_iter})"
