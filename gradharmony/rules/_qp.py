"""Batched active-set solvers of the small quadratic programs behind MGDA, CAGrad and UPGrad.

Both solve, independently for each of N problems (vectorized, any device, float64),

    min_w  1/2 w^T A w + q^T w   subject to  w >= 0           (``simplex=False``)
                                 or         w >= 0, sum w = 1 (``simplex=True``)

with A (N, K, K) symmetric positive semi-definite and q in the range of A (``q = A x``; any q
when A is positive definite): then both are least-squares / min-norm-point problems
(``1/2 |G^T w + G^T x|^2`` up to a constant), the case of every rule here. The method is the primal active-set
method (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithm 16.3) in the form of
Lawson & Hanson's NNLS (*Solving Least Squares Problems*, 1974, ch. 23) and Wolfe's
minimum-norm-point algorithm (*Math. Programming* 11, 1976): on the current free set F the
equality-constrained problem is solved exactly (one batched linear solve, bordered by the
sum constraint on the simplex); a blocking constraint is added when that point leaves the
feasible set, and the most negative Lagrange multiplier of the fixed set is freed when it
does not. An index is freed only at the minimizer of the current face, so the free set stays
linearly (NNLS) or affinely (simplex) independent and the linear systems are non-singular
in exact arithmetic; the method ends after finitely many steps with the exact solution on
its active set (every K). :func:`kkt_residual` measures the KKT conditions of a result.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

#: Relative tolerance of the multiplier sign test (of max(|A|, |q|)); float64 solves.
MULT_TOL = 1e-12


def default_max_iter(K: int) -> int:
    """Cap on active-set steps: each index is typically freed once and fixed at most once."""
    return 4 * K + 20


def active_set_qp(
    A: Tensor,
    q: Tensor,
    simplex: bool,
    w0: Optional[Tensor] = None,
    max_iter: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Solve N non-negative (or simplex-constrained) convex QPs by the primal active-set method.

    Args:
        A: (N, K, K) symmetric PSD, float64.
        q: (N, K) linear term, in the range of A.
        simplex: add the constraint ``sum w = 1``.
        w0: optional (N, K) feasible start (warm start; its support is the first free set).
            Default: 0 (NNLS) or the best vertex (simplex).
        max_iter: cap on active-set steps (default :func:`default_max_iter`).
    Returns:
        ``(w, converged)``: (N, K) solutions (always feasible) and (N,) bool, False where the
        cap was reached or a linear system was singular to working precision (a problem with
        NaN/inf entries counts as converged: its w is meaningless, the engine's non-finite
        policy decides about it).
    """
    N, K, _ = A.shape
    dev, dt = A.device, A.dtype
    max_iter = default_max_iter(K) if max_iter is None else max_iter
    ar = torch.arange(N, device=dev)
    if w0 is not None:
        w = w0.clone()
        free = w > 0
    elif simplex:
        k0 = (0.5 * A.diagonal(dim1=1, dim2=2) + q).argmin(-1)
        w = torch.zeros(N, K, dtype=dt, device=dev)
        w[ar, k0] = 1.0
        free = w > 0
    else:
        w = torch.zeros(N, K, dtype=dt, device=dev)
        free = torch.zeros(N, K, dtype=torch.bool, device=dev)
    scale = torch.maximum(A.abs().flatten(1).amax(-1), q.abs().amax(-1))
    tol = MULT_TOL * scale.clamp_min(torch.finfo(dt).tiny)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    failed = torch.zeros(N, dtype=torch.bool, device=dev)
    last = torch.full((N,), -1, dtype=torch.long, device=dev)
    n = K + 1 if simplex else K
    eyeK = torch.eye(K, dtype=dt, device=dev)
    for _ in range(max_iter):
        # the early exit reads the flags on the host; under torch.compile the loop runs to the
        # cap instead (every update is masked by ~done: identical results, no host sync)
        if not torch.compiler.is_compiling() and bool(done.all()):
            break
        m = free.to(dt)
        sys_ = torch.zeros(N, n, n, dtype=dt, device=dev)
        sys_[:, :K, :K] = A * (m.unsqueeze(-1) * m.unsqueeze(-2)) + eyeK * (1 - m).unsqueeze(-1)
        rhs = torch.zeros(N, n, dtype=dt, device=dev)
        rhs[:, :K] = -q * m
        if simplex:
            sys_[:, :K, K] = m
            sys_[:, K, :K] = m
            rhs[:, K] = 1.0
        sol, info = torch.linalg.solve_ex(sys_, rhs)
        res = (torch.einsum("nij,nj->ni", sys_, sol) - rhs).abs().amax(-1)
        ok = (info == 0) & torch.isfinite(sol).all(-1) & (res <= 1e-8 * (1 + sol.abs().amax(-1)) * (1 + scale))
        newly_failed = ~done & ~ok
        failed |= newly_failed
        done |= newly_failed
        w_eq = torch.where(free, sol[:, :K], 0.0)
        # -- a blocking constraint: step towards w_eq until the first free weight reaches 0
        block = free & (w_eq < 0)
        has_block = block.any(-1) & ~done
        ratio = torch.where(block, w / (w - w_eq).clamp_min(torch.finfo(dt).tiny), torch.inf)
        alpha, i_blk = ratio.min(-1)
        alpha = alpha.clamp(0, 1)
        stuck = has_block & (alpha <= 0) & (i_blk == last)  # the index just freed: rounding, stop
        done |= stuck
        has_block &= ~stuck
        w_step = (w + alpha.unsqueeze(-1) * (w_eq - w)).clamp_min(0)
        w_step[ar, i_blk] = torch.where(has_block, torch.zeros_like(alpha), w_step[ar, i_blk])
        free_blk = free.clone()
        free_blk[ar, i_blk] = False
        # -- no blocking constraint: w_eq is the face's minimizer; test the fixed multipliers
        at_min = ~has_block & ~done
        grad = torch.einsum("nij,nj->ni", A, w_eq) + q
        mult = grad + sol[:, K : K + 1] if simplex else grad  # sum-constraint multiplier folded in
        mult = torch.where(free, torch.inf, mult)
        m_min, j = mult.min(-1)
        improve = at_min & (m_min < -tol)
        free_add = free.clone()
        free_add[ar, j] = True
        # -- apply
        w = torch.where(has_block.unsqueeze(-1), w_step, torch.where(at_min.unsqueeze(-1), w_eq, w))
        free = torch.where(has_block.unsqueeze(-1), free_blk, torch.where(improve.unsqueeze(-1), free_add, free))
        last = torch.where(improve, j, torch.where(has_block, torch.full_like(last, -1), last))
        done |= at_min & ~improve
    w = w.clamp_min(0)
    if simplex:
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
    finite = torch.isfinite(A).flatten(1).all(-1) & torch.isfinite(q).all(-1)
    return w, (done & ~failed) | ~finite  # a non-finite problem is the caller's (nonfinite policy)


def warn_unconverged(converged: Tensor, rule: str, max_iter: Optional[int]) -> None:
    """One ``RuntimeWarning`` naming the rule and the count of samples whose solve stopped early
    (at the cap, or on a linear system singular to working precision); their weights are the
    last feasible iterate. Not under ``torch.compile`` (counting them is a host read)."""
    if torch.compiler.is_compiling():
        return
    n = int((~converged).sum())
    if n:
        warnings.warn(
            f"{rule}: the active-set solve of {n} of {converged.numel()} problems stopped before "
            f"its KKT conditions held (max_iter={max_iter}); their weights are the last feasible "
            "iterate (pass a larger max_iter)", RuntimeWarning, stacklevel=3)


def kkt_residual(A: Tensor, q: Tensor, w: Tensor, simplex: bool) -> Tensor:
    """Largest violation of the KKT conditions of the QP at w, per problem: (N,).

    Stationarity with the multipliers read from w: ``grad = A w + q`` must equal ``-nu``
    (simplex; 0 for NNLS) on the support and be ``>= -nu`` off it; plus primal feasibility.
    Relative to max(|A|, |q|).
    """
    grad = torch.einsum("nij,nj->ni", A, w) + q
    supp = w > 0
    if simplex:
        nu = -(grad * w).sum(-1, keepdim=True)  # = -grad on the support
    else:
        nu = torch.zeros_like(grad[:, :1])
    lam = grad + nu
    comp = torch.where(supp, lam.abs(), (-lam).clamp_min(0)).amax(-1)
    feas = (-w).clamp_min(0).amax(-1)
    if simplex:
        feas = torch.maximum(feas, (w.sum(-1) - 1).abs())
    scale = torch.maximum(A.abs().flatten(1).amax(-1), q.abs().amax(-1)).clamp_min(torch.finfo(A.dtype).tiny)
    return torch.maximum(comp / scale, feas)
