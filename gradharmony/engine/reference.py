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
(:data:`gradharmony.kernels.spec.METHOD_IDS`). The rules
solved in PyTorch between the Gram and combine passes (MGDA, CAGrad, UPGrad) live in their
own modules of :mod:`gradharmony.rules`.
"""

from __future__ import annotations

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
