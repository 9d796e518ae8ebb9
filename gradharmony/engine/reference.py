"""Pure-PyTorch reference of every harmonization op.

This module is the single source of truth: the compiled backends (C++, CUDA,
Triton) are tested against it, and the benchmarks time it as the baseline.
Every function is vectorized over the batch of samples and works on any
device. The structure follows DESIGN.md: Gram -> coefficients -> combine.

Shapes: ``G: (B, K, D)`` per-sample gradients of K losses, ``M: (B, K, K)``
their Gram matrices, ``w: (B, K)`` combination weights, ``out = w^T G``.

Accumulation dtype: float64 for float64 input, float32 otherwise
(:func:`gradharmony.kernels.spec.acc_dtype`).

Method ids shared with the compiled kernels: 0 = sum, 1 = pcgrad, 2 = gradvac
(:data:`gradharmony.kernels.spec.METHOD_IDS`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..kernels.spec import METHOD_IDS, acc_dtype

__all__ = [
    "METHOD_IDS",
    "SolveOutput",
    "FusedOutput",
    "acc_dtype",
    "gram",
    "cosine",
    "sum_weights",
    "pcgrad_weights",
    "gradvac_weights",
    "mgda_weights",
    "cagrad_weights",
    "solve",
    "gram_solve",
    "combine",
    "fused",
]


class SolveOutput(NamedTuple):
    """What the solve op returns: gram -> per-sample solve, no combine."""

    gram: Tensor  # (B, K, K) Gram matrices, accumulation dtype
    cos: Tensor  # (B, K, K) cosines
    weights: Tensor  # (B, K) combination weights
    phi: Optional[Tensor]  # (B, K, K) GradVac visit cosines (method 2), else None


class FusedOutput(NamedTuple):
    """What the fused op returns: gram -> per-sample solve -> combine."""

    out: Tensor  # (B, D) or (D,), G's dtype
    gram: Tensor  # (B, K, K)
    cos: Tensor  # (B, K, K)
    weights: Tensor  # (B, K)
    phi: Optional[Tensor]  # (B, K, K) (method 2), else None


def gram(G: Tensor) -> Tensor:
    """Per-sample Gram matrices ``M_b = G_b G_b^T``.

    Args:
        G: (B, K, D) gradients, any floating dtype.
    Returns:
        (B, K, K) in the accumulation dtype.
    """
    dt = acc_dtype(G.dtype)
    if G.dtype == dt:
        return torch.bmm(G, G.transpose(1, 2))
    # Half precision: accumulate in float32 without materializing a float32 copy of G
    # (baddbmm with out_dtype is not universally available; chunk over D instead).
    B, K, D = G.shape
    M = torch.zeros(B, K, K, dtype=dt, device=G.device)
    chunk = max(1, (1 << 22) // max(1, B * K))
    for s in range(0, D, chunk):
        g = G[:, :, s : s + chunk].to(dt)
        M.baddbmm_(g, g.transpose(1, 2))
    return M


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (no NaN, no inf)."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), 0.0)


def cosine(M: Tensor) -> Tensor:
    """Pairwise cosine similarities from Gram matrices.

    ``cos[b, k, j] = M[b, k, j] / sqrt(M[b, k, k] M[b, j, j])``; a zero gradient has
    cosine 0 with everything (and 0 with itself), so it conflicts with nothing.

    Args:
        M: (B, K, K) Gram matrices.
    Returns:
        (B, K, K) in [-1, 1].
    """
    d = M.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # (B, K)
    den = d.unsqueeze(2) * d.unsqueeze(1)
    return _safe_div(M, den).clamp(-1.0, 1.0)


def sum_weights(M: Tensor) -> Tensor:
    """No surgery: ``w = 1`` (the plain summed gradient). Returns (B, K)."""
    return torch.ones(M.shape[:2], dtype=M.dtype, device=M.device)


def _row(M: Tensor, j: Union[int, Tensor]) -> Tensor:
    """Row j of each Gram matrix: (B, K). ``j`` is an int or a (B,) index tensor."""
    if isinstance(j, int):
        return M[:, j]
    B, K, _ = M.shape
    return M.gather(1, j.view(B, 1, 1).expand(B, 1, K)).squeeze(1)


def _pick(x: Tensor, j: Union[int, Tensor]) -> Tensor:
    """x[b, j_b] for x (B, K): (B,)."""
    if isinstance(j, int):
        return x[:, j]
    return x.gather(1, j.view(-1, 1)).squeeze(1)


def _add_at(C_i: Tensor, j: Union[int, Tensor], v: Tensor) -> None:
    """C_i[b, j_b] += v_b in place (C_i a (B, K) view)."""
    if isinstance(j, int):
        C_i[:, j] += v
    else:
        C_i.scatter_add_(1, j.view(-1, 1), v.view(-1, 1))


def _visits(K: int, i: int, order: Optional[Tensor]):
    """The visiting sequence of loss i: ints (fixed order) or (B,) tensors (random)."""
    if order is None:
        return [(j, None) for j in range(K) if j != i]
    return [(order[:, i, t], order[:, i, t] != i) for t in range(K)]


def pcgrad_weights(M: Tensor, order: Optional[Tensor] = None) -> Tensor:
    """PCGrad (Yu et al., NeurIPS 2020, Algorithm 1) in Gram form, per sample.

    For each loss i, ``g'_i`` starts at ``g_i`` and visits the other gradients j in
    ``order[b, i]``; when ``g'_i . g_j < 0`` it is projected onto the normal plane of
    ``g_j``: ``g'_i -= (g'_i . g_j) / |g_j|^2 g_j``. The result is ``sum_i g'_i``.
    Tracking ``g'_i = C_i G`` makes every dot product ``C_i M[:, j]``.

    Args:
        M: (B, K, K) Gram matrices.
        order: (B, K, K) integer; ``order[b, i]`` is a permutation of 0..K-1 (the entry
            equal to i is skipped). ``None`` = fixed order 0..K-1.
    Returns:
        (B, K) weights w with ``out_b = w_b^T G_b``.
    """
    B, K, _ = M.shape
    C = torch.eye(K, dtype=M.dtype, device=M.device).repeat(B, 1, 1)
    diag = M.diagonal(dim1=1, dim2=2)
    for i in range(K):
        C_i = C[:, i]  # view: updates land in C
        for j, valid in _visits(K, i, order):
            dot = (C_i * _row(M, j)).sum(-1)  # g'_i . g_j
            hit = dot < 0
            if valid is not None:
                hit = hit & valid
            coef = torch.where(hit, -_safe_div(dot, _pick(diag, j)), torch.zeros_like(dot))
            _add_at(C_i, j, coef)
    return C.sum(1)


def gradvac_weights(
    M: Tensor, target: Tensor, order: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """GradVac (Wang et al., ICLR 2021) in Gram form, per sample.

    For each loss i and each other loss j (in ``order[b, i]``), with
    ``phi = cos(g'_i, g_j)`` and target ``t = target[i, j]``: if ``phi < t``,
    ``g'_i += |g'_i| (t sqrt(1-phi^2) - phi sqrt(1-t^2)) / (|g_j| sqrt(1-t^2)) g_j``.
    The result is ``sum_i g'_i``. Same algorithm as torchjd's ``GradVacWeighting``
    with ``eps = 0`` (zero norms are guarded instead, so the rule is scale-invariant).

    Args:
        M: (B, K, K) Gram matrices.
        target: (K, K) EMA targets ``phi_hat`` (held fixed for the whole batch).
        order: as in :func:`pcgrad_weights`.
    Returns:
        ``(w, phi)``: (B, K) weights and (B, K, K) the cosines ``phi`` seen at each
        visit (zero on the diagonal), from which the caller updates the EMA.
    """
    B, K, _ = M.shape
    target = target.to(device=M.device, dtype=M.dtype)
    C = torch.eye(K, dtype=M.dtype, device=M.device).repeat(B, 1, 1)
    phi_seen = torch.zeros(B, K, K, dtype=M.dtype, device=M.device)
    diag = M.diagonal(dim1=1, dim2=2)
    for i in range(K):
        C_i = C[:, i]
        cG = torch.einsum("bk,bkj->bj", C_i, M)  # g'_i . g_j for all j
        for j, valid in _visits(K, i, order):
            dot = _pick(cG, j)
            norm_i = (cG * C_i).sum(-1).clamp_min(0).sqrt()
            norm_j = _pick(diag, j).clamp_min(0).sqrt()
            phi = _safe_div(dot, norm_i * norm_j).clamp(-1.0, 1.0)
            tgt = target[i, j] if isinstance(j, int) else target[i].gather(0, j)
            hit = (phi < tgt) & (norm_j > 0) & (norm_i > 0)
            if valid is not None:
                hit = hit & valid
            s_phi = (1 - phi * phi).clamp_min(0).sqrt()
            s_tgt = (1 - tgt * tgt).clamp_min(0).sqrt()
            coef = _safe_div(norm_i * (tgt * s_phi - phi * s_tgt), norm_j * s_tgt)
            coef = torch.where(hit, coef, torch.zeros_like(coef))
            _add_at(C_i, j, coef)
            cG = cG + coef.unsqueeze(1) * _row(M, j)
            if valid is None:
                phi_seen[:, i, j] = phi
            else:
                phi_seen[:, i].scatter_(1, j.view(-1, 1), torch.where(valid, phi, torch.zeros_like(phi)).view(-1, 1))
    return C.sum(1), phi_seen


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v (B, K) onto the probability simplex."""
    K = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ind = torch.arange(1, K + 1, device=v.device, dtype=v.dtype)
    cond = u - css / ind > 0
    rho = cond.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def _normalize_gram(M: Tensor) -> Tensor:
    """Scale each Gram matrix by its mean diagonal (iterative solvers become scale-free)."""
    scale = M.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(M.dtype).tiny)
    return M / scale[:, None, None]


#: Up to this K the simplex solves also try every support exactly (2^K - 1 subsets).
EXACT_SUPPORT_MAX_K = 8


def _supports(K: int, device: torch.device) -> Tensor:
    """All non-empty subsets of 0..K-1 as a (2^K - 1, K) bool mask."""
    idx = torch.arange(1, 2**K, device=device)
    return (idx.unsqueeze(-1) >> torch.arange(K, device=device)) & 1 == 1


def _support_solve(M: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Solve ``M_SS x_S = rhs_S`` (x = 0 off S) for every support S.

    Args:
        M: (B, K, K); rhs: (B, K).
    Returns:
        x (B, S, K), ok (B, S) (the restricted system was non-singular), masks (S, K).
    """
    B, K, _ = M.shape
    S = _supports(K, M.device)  # (S, K)
    m = S.to(M.dtype)
    A = M.unsqueeze(1) * (m.unsqueeze(-1) * m.unsqueeze(-2)) + torch.diag_embed(1 - m)  # (B, S, K, K)
    r = rhs.unsqueeze(1) * m  # (B, S, K)
    x, info = torch.linalg.solve_ex(A, r)
    ok = (info == 0) & torch.isfinite(x).all(-1)
    # reject near-singular restricted systems: relative residual check
    res = (torch.einsum("bskj,bsj->bsk", A, x) - r).abs().amax(-1)
    ok &= res <= 1e-6 * (1 + r.abs().amax(-1))
    return torch.where(ok.unsqueeze(-1), x, 0.0), ok, S


def _min_norm_exact(Mn: Tensor, w_iter: Tensor) -> Tensor:
    """Best of ``w_iter`` and every support's affine-hull min-norm point.

    On a support S the KKT system is bordered: ``[M_SS 1; 1^T 0] [w_S; -lam] = [0; 1]``. It
    is non-singular whenever the g_k (k in S) are affinely independent, also when M_SS is
    singular (e.g. K = 3 gradients in a plane around the origin: the min-norm point is 0).
    """
    B, K, _ = Mn.shape
    S = _supports(K, Mn.device)  # (S, K)
    m = S.to(Mn.dtype)
    nS = m.shape[0]
    A = torch.zeros(B, nS, K + 1, K + 1, dtype=Mn.dtype, device=Mn.device)
    A[..., :K, :K] = Mn.unsqueeze(1) * (m.unsqueeze(-1) * m.unsqueeze(-2)) + torch.diag_embed(1 - m)
    A[..., :K, K] = m
    A[..., K, :K] = m
    r = torch.zeros(B, nS, K + 1, dtype=Mn.dtype, device=Mn.device)
    r[..., K] = 1
    sol, info = torch.linalg.solve_ex(A, r)
    ok = (info == 0) & torch.isfinite(sol).all(-1)
    res = (torch.einsum("bskj,bsj->bsk", A, sol) - r).abs().amax(-1)
    ok &= res <= 1e-6
    w = torch.where(ok.unsqueeze(-1), sol[..., :K], 0.0)
    ok &= (w >= -1e-12).all(-1)
    w = w.clamp_min(0)
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(Mn.dtype).tiny)
    cand = torch.cat([w_iter.unsqueeze(1), w], 1)  # (B, 1 + S, K)
    ok = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=Mn.device), ok], 1)
    obj = torch.einsum("bsk,bkj,bsj->bs", cand, Mn, cand)
    obj = torch.where(ok, obj, torch.inf)
    best = obj.argmin(1)
    return cand[torch.arange(B, device=Mn.device), best]


def _solve_in_float64(fn):
    """Run a small K x K solve in float64 (cheap: B*K*K numbers) and cast back."""

    @functools.wraps(fn)
    def wrapper(M: Tensor, *args, **kwargs) -> Tensor:
        if M.dtype == torch.float64:
            return fn(M, *args, **kwargs)
        return fn(M.to(torch.float64), *args, **kwargs).to(M.dtype)

    return wrapper


@_solve_in_float64
def mgda_weights(M: Tensor, iters: int = 50) -> Tensor:
    """MGDA-UB (Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull.

    ``w = argmin_{w in simplex} w^T M w`` per sample (solved in float64): closed form for K = 2; for K <= 8
    the exact solution among all supports (the affine-hull min-norm point of every
    subset of linearly independent gradients), checked against ``iters`` Frank-Wolfe
    steps with exact line search (also the solver for larger K). The combination is
    ``K * w`` so that it has the scale of a sum of K gradients (``sum`` gives weights 1).

    Args:
        M: (B, K, K) Gram matrices.
    Returns:
        (B, K) weights.
    """
    B, K, _ = M.shape
    Mn = _normalize_gram(M)
    if K == 2:
        a, b, c = Mn[:, 0, 0], Mn[:, 0, 1], Mn[:, 1, 1]
        den = a - 2 * b + c
        gamma = _safe_div(c - b, den).clamp(0, 1)
        gamma = torch.where(den > 0, gamma, torch.full_like(gamma, 0.5))
        return K * torch.stack([gamma, 1 - gamma], -1)
    w = torch.full((B, K), 1.0 / K, dtype=M.dtype, device=M.device)
    eye = torch.eye(K, dtype=M.dtype, device=M.device)
    for _ in range(iters):
        grad = torch.einsum("bkj,bj->bk", Mn, w)
        d = eye[grad.argmin(-1)] - w
        num = -(d * grad).sum(-1)
        den = torch.einsum("bk,bkj,bj->b", d, Mn, d)
        w = w + _safe_div(num, den).clamp(0, 1).unsqueeze(-1) * d
    if K <= EXACT_SUPPORT_MAX_K:
        w = _min_norm_exact(Mn, w)
    return K * w


def _cagrad_objective(w: Tensor, Mg0: Tensor, Mn: Tensor, sqrt_phi: Tensor) -> Tensor:
    """``g_w . g0 + sqrt(phi) |g_w|`` for weights w (B, ..., K)."""
    lin = (w * Mg0.unsqueeze(-2) if w.ndim == 3 else w * Mg0).sum(-1)
    if w.ndim == 3:
        quad = torch.einsum("bsk,bkj,bsj->bs", w, Mn, w)
        return lin + sqrt_phi.unsqueeze(-1) * quad.clamp_min(0).sqrt()
    quad = torch.einsum("bk,bkj,bj->b", w, Mn, w)
    return lin + sqrt_phi * quad.clamp_min(0).sqrt()


def _cagrad_exact(Mn: Tensor, Mg0: Tensor, sqrt_phi: Tensor, w_iter: Tensor) -> Tensor:
    """Best of ``w_iter``, the min-norm point and every support's KKT point.

    On a support S with M_SS non-singular, stationarity ``Mg0_S + c' M_SS w_S / t + lam 1 = 0``
    (t = |g_w|, c' = sqrt(phi)) gives ``w_S = -(t / c') (x + lam y)`` with
    ``x = M_SS^-1 Mg0_S``, ``y = M_SS^-1 1``; ``|g_w| = t`` and ``sum w = 1`` leave a quadratic
    in lam: ``(1.y) lam^2 + 2 (1.x) lam + x.Mg0_S - c'^2 = 0``.
    """
    B, K, _ = Mn.shape
    ones = torch.ones(B, K, dtype=Mn.dtype, device=Mn.device)
    x, okx, S = _support_solve(Mn, Mg0)
    y, oky, _ = _support_solve(Mn, ones)
    m = S.to(Mn.dtype)
    a = y.sum(-1)
    bq = x.sum(-1)
    c2 = sqrt_phi.unsqueeze(-1) ** 2
    cq = (x * Mg0.unsqueeze(1) * m).sum(-1) - c2
    disc = bq * bq - a * cq
    ok = okx & oky & (a.abs() > 0) & (disc >= 0) & (sqrt_phi.unsqueeze(-1) > 0)
    root = disc.clamp_min(0).sqrt()
    cands, oks = [w_iter.unsqueeze(1)], [torch.ones(B, 1, dtype=torch.bool, device=Mn.device)]
    for sgn in (1.0, -1.0):
        lam = (-bq + sgn * root) / torch.where(a != 0, a, 1.0)
        den = bq + lam * a
        nz = den != 0
        t = torch.where(nz, -sqrt_phi.unsqueeze(-1) / torch.where(nz, den, 1.0), 0.0)
        w = -(t / torch.where(sqrt_phi > 0, sqrt_phi, 1.0).unsqueeze(-1)).unsqueeze(-1) * (x + lam.unsqueeze(-1) * y)
        okw = ok & (t > 0) & (w >= -1e-12).all(-1) & ((w.sum(-1) - 1).abs() <= 1e-6)
        w = w.clamp_min(0)
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(Mn.dtype).tiny)
        cands.append(torch.where(okw.unsqueeze(-1), w, 0.0))
        oks.append(okw)
    cands.append(_min_norm_exact(Mn, w_iter).unsqueeze(1))
    oks.append(torch.ones(B, 1, dtype=torch.bool, device=Mn.device))
    cand, okc = torch.cat(cands, 1), torch.cat(oks, 1)
    obj = torch.where(okc, _cagrad_objective(cand, Mg0, Mn, sqrt_phi), torch.inf)
    return cand[torch.arange(B, device=Mn.device), obj.argmin(1)]


@_solve_in_float64
def cagrad_weights(M: Tensor, c: float = 0.4, iters: int = 100, lr: float = 0.5) -> Tensor:
    """CAGrad (Liu et al., NeurIPS 2021) in Gram form, per sample.

    With ``g0 = mean_k g_k`` and ``phi = c^2 |g0|^2``, solve
    ``min_{w in simplex} g_w . g0 + sqrt(phi) |g_w|`` (``g_w = w^T G``), then
    ``d = g0 + sqrt(phi) / |g_w| g_w``. For K <= 8 the solve is exact over all supports
    (closed-form KKT points, the min-norm point for ``g_w = 0``), checked against ``iters``
    projected-gradient steps (the solver for larger K). Returned as the weights of
    ``K d`` so that ``c = 0`` reproduces ``sum``.

    Args:
        M: (B, K, K) Gram matrices.
        c: conflict-averse radius (0.4 as in the paper's multi-task experiments).
    Returns:
        (B, K) weights.
    """
    B, K, _ = M.shape
    Mn = _normalize_gram(M)
    dtype, dev = M.dtype, M.device
    u = torch.full((B, K), 1.0 / K, dtype=dtype, device=dev)  # g0 coefficients
    Mg0 = torch.einsum("bkj,bj->bk", Mn, u)  # g_k . g0
    g0_norm = (Mg0 * u).sum(-1).clamp_min(0).sqrt()
    sqrt_phi = c * g0_norm
    w = u.clone()
    for _ in range(iters):
        Mw = torch.einsum("bkj,bj->bk", Mn, w)
        gw_norm = (Mw * w).sum(-1).clamp_min(0).sqrt()
        grad = Mg0 + sqrt_phi.unsqueeze(-1) * _safe_div(Mw, gw_norm.unsqueeze(-1))
        w = _project_simplex(w - lr * grad)
    if K <= EXACT_SUPPORT_MAX_K:
        w = _cagrad_exact(Mn, Mg0, sqrt_phi, w)
    Mw = torch.einsum("bkj,bj->bk", Mn, w)
    gw_norm = (Mw * w).sum(-1).clamp_min(0).sqrt()
    lam = _safe_div(sqrt_phi, gw_norm)
    return K * (u + lam.unsqueeze(-1) * w)


def solve(
    M: Tensor,
    method: int,
    order: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The tiny per-sample solve of the fused kernels: ``M -> (cos, w, phi)``.

    Args:
        M: (B, K, K) Gram matrices.
        method: 0 = sum, 1 = pcgrad, 2 = gradvac (see ``METHOD_IDS``).
        order: (B, K, K) visiting order for pcgrad/gradvac (``None`` = fixed).
        target: (K, K) GradVac targets (required for method 2).
    Returns:
        cos (B, K, K), w (B, K), phi (B, K, K) for gradvac else ``None``.
    """
    cos = cosine(M)
    if method == 0:
        return cos, sum_weights(M), None
    if method == 1:
        return cos, pcgrad_weights(M, order), None
    if method == 2:
        if target is None:
            raise ValueError("gradvac needs a (K, K) target matrix")
        w, phi = gradvac_weights(M, target, order)
        return cos, w, phi
    raise ValueError(f"unknown method id {method!r}; expected one of {sorted(METHOD_IDS.values())}")


def combine(G: Tensor, w: Tensor, reduction: str = "none") -> Tensor:
    """``out_b = w_b^T G_b``, or its sum over b.

    Args:
        G: (B, K, D) gradients.
        w: (B, K) weights (any float dtype; used in the accumulation dtype).
        reduction: "none" -> (B, D); "sum" -> (D,).
    Returns:
        Output in G's dtype.
    """
    dt = acc_dtype(G.dtype)
    if reduction == "none":
        if G.dtype == dt:
            return torch.bmm(w.to(dt).unsqueeze(1), G).squeeze(1)
        return torch.einsum("bk,bkd->bd", w.to(G.dtype), G)
    if reduction == "sum":
        B, K, D = G.shape
        if G.dtype == dt:
            return (w.to(dt).reshape(1, B * K) @ G.reshape(B * K, D)).reshape(D)
        return torch.einsum("bk,bkd->d", w.to(G.dtype), G)
    raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")


def gram_solve(
    G: Tensor,
    method: int,
    order: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
) -> SolveOutput:
    """The op the solve kernels implement: gram -> per-sample solve (no combine).

    Args:
        G: (B, K, D) gradients.
        method, order, target: as in :func:`solve`.
    Returns:
        :class:`SolveOutput` ``(gram, cos, weights, phi)``.
    """
    M = gram(G)
    cos, w, phi = solve(M, method, order, target)
    return SolveOutput(M, cos, w, phi)


def fused(
    G: Tensor,
    method: int,
    order: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    reduction: str = "none",
) -> FusedOutput:
    """The whole op the fused kernels implement: gram -> solve -> combine.

    Args:
        G: (B, K, D) gradients.
        method, order, target: as in :func:`solve`.
        reduction: "none" or "sum".
    Returns:
        :class:`FusedOutput` ``(out, gram, cos, weights, phi)``: out (B, D) or (D,) in G's
        dtype; gram (B, K, K), cos (B, K, K), weights (B, K), phi (B, K, K) or ``None``.
    """
    M, cos, w, phi = gram_solve(G, method, order, target)
    out = combine(G, w, reduction)
    return FusedOutput(out, M, cos, w, phi)
