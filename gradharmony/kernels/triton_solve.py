"""Triton ``solve``: gram -> per-sample solve (sum / PCGrad / GradVac), no combine.

:func:`_solve_sample` is the solve on one sample's (KP, KP) Gram matrix in registers (shared
with the one-launch fused kernel); :func:`_solve_kernel` (grid B) sums a sample's partial Gram
matrices in a fixed order and runs it. Divisions and square roots are IEEE-rounded
(``div_rn`` / ``sqrt_rn``) like PyTorch's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_gram
from . import triton_launch as L
from .spec import METHOD_IDS
from .triton_launch import _check_G, _chunks, _gram_cfg, _kp, _on_G_device, tl, triton

__all__ = ["solve_forward"]

if triton is not None:

    @triton.jit
    def _safe_div(num, den):
        """num / den where den > 0, else 0 (IEEE division)."""
        pos = den > 0
        return tl.where(pos, tl.div_rn(num, tl.where(pos, den, 1.0)), 0.0)

    @triton.jit
    def _solve_inputs(
        b,
        order_ptr,
        target_ptr,
        K: tl.constexpr,
        KP: tl.constexpr,
        METHOD: tl.constexpr,
        HAS_ORDER: tl.constexpr,
    ):
        """Sample b's visiting order (KP, KP) int32 and the targets (KP, KP) float32: loaded
        once, up front (issued before the Gram loads, their latency overlaps), instead of
        one dependent scalar load per visit."""
        rk = tl.arange(0, KP)
        rows = rk[:, None]
        cols = rk[None, :]
        kk = (rows < K) & (cols < K)
        ordm = tl.zeros([KP, KP], dtype=tl.int32)
        if HAS_ORDER:
            ordm = tl.load(order_ptr + b.to(tl.int64) * K * K + rows * K + cols, mask=kk, other=0).to(tl.int32)
        tgtm = tl.zeros([KP, KP], dtype=tl.float32)
        if METHOD == 2:
            tgtm = tl.load(target_ptr + rows * K + cols, mask=kk, other=0.0)
        return ordm, tgtm

    @triton.jit
    def _solve_sample(
        M,
        b,
        M_ptr,
        cos_ptr,
        w_ptr,
        phi_ptr,
        ordm,
        tgtm,
        K: tl.constexpr,
        KP: tl.constexpr,
        METHOD: tl.constexpr,
        HAS_ORDER: tl.constexpr,
    ):
        """Per-sample solve on the (KP, KP) float32 Gram matrix ``M`` (zero padded), with
        the order / targets of :func:`_solve_inputs`.

        Stores M, cos (B, K, K), phi (gradvac) and returns w (KP,) float32 (zero in the
        padding).
        """
        rk = tl.arange(0, KP)
        rows = rk[:, None]
        cols = rk[None, :]
        kk = (rows < K) & (cols < K)
        b64 = b.to(tl.int64)
        tl.store(M_ptr + b64 * K * K + rows * K + cols, M, mask=kk)
        if METHOD >= 0:
            diag = tl.where(rows == cols, M, 0.0)
            d_r = tl.sqrt_rn(tl.maximum(tl.sum(diag, axis=1), 0.0))  # indexed by row
            d_c = tl.sqrt_rn(tl.maximum(tl.sum(diag, axis=0), 0.0))  # indexed by column
            cos = _safe_div(M, d_r[:, None] * d_c[None, :])
            cos = tl.minimum(tl.maximum(cos, -1.0), 1.0)
            tl.store(cos_ptr + b64 * K * K + rows * K + cols, cos, mask=kk)

        w = tl.where(rk < K, 1.0, 0.0)
        if METHOD == 1:  # PCGrad: g'_i visits g_j in order[b, i]; projects when g'_i . g_j < 0
            w = tl.zeros([KP], dtype=tl.float32)
            for i in range(K):
                ci = tl.where(rk == i, 1.0, 0.0)  # coefficients of g'_i
                for t in range(K):
                    if HAS_ORDER:
                        j = tl.sum(tl.where((rows == i) & (cols == t), ordm, 0))
                    else:
                        j = tl.zeros([], dtype=tl.int32) + t
                    Mj = tl.sum(tl.where(rows == j, M, 0.0), axis=0)  # g_j . g_k, all k
                    dot = tl.sum(ci * Mj)  # g'_i . g_j
                    Mjj = tl.sum(tl.where(rk == j, Mj, 0.0))
                    hit = (j != i) & (dot < 0) & (Mjj > 0)
                    coef = tl.where(hit, -_safe_div(dot, Mjj), 0.0)
                    ci = ci + tl.where(rk == j, coef, 0.0)
                w = w + ci
        if METHOD == 2:  # GradVac: pull cos(g'_i, g_j) up to target[i, j]
            w = tl.zeros([KP], dtype=tl.float32)
            for i in range(K):
                ci = tl.where(rk == i, 1.0, 0.0)
                cG = tl.sum(tl.where(rows == i, M, 0.0), axis=0)  # g'_i . g_k, all k
                phi_row = tl.zeros([KP], dtype=tl.float32)
                for t in range(K):
                    if HAS_ORDER:
                        j = tl.sum(tl.where((rows == i) & (cols == t), ordm, 0))
                    else:
                        j = tl.zeros([], dtype=tl.int32) + t
                    valid = j != i
                    sel = rk == j
                    dot = tl.sum(tl.where(sel, cG, 0.0))
                    norm_i = tl.sqrt_rn(tl.maximum(tl.sum(cG * ci), 0.0))
                    Mj = tl.sum(tl.where(rows == j, M, 0.0), axis=0)
                    norm_j = tl.sqrt_rn(tl.maximum(tl.sum(tl.where(sel, Mj, 0.0)), 0.0))
                    phi = _safe_div(dot, norm_i * norm_j)
                    phi = tl.minimum(tl.maximum(phi, -1.0), 1.0)
                    tgt = tl.sum(tl.where((rows == i) & (cols == j), tgtm, 0.0))
                    hit = valid & (phi < tgt) & (norm_j > 0) & (norm_i > 0)
                    s_phi = tl.sqrt_rn(tl.maximum(1.0 - phi * phi, 0.0))
                    s_tgt = tl.sqrt_rn(tl.maximum(1.0 - tgt * tgt, 0.0))
                    coef = _safe_div(norm_i * (tgt * s_phi - phi * s_tgt), norm_j * s_tgt)
                    coef = tl.where(hit, coef, 0.0)
                    ci = ci + tl.where(sel, coef, 0.0)
                    cG = cG + coef * Mj
                    phi_row = tl.where(sel & valid, phi, phi_row)
                tl.store(phi_ptr + b64 * K * K + i * K + rk, phi_row, mask=rk < K)
                w = w + ci
        if METHOD >= 0:
            tl.store(w_ptr + b64 * K + rk, w, mask=rk < K)
        return w

    @triton.jit
    def _solve_kernel(
        part_ptr,
        M_ptr,
        cos_ptr,
        w_ptr,
        phi_ptr,
        order_ptr,
        target_ptr,
        NC,
        K: tl.constexpr,
        KP: tl.constexpr,
        METHOD: tl.constexpr,
        HAS_ORDER: tl.constexpr,
        CB: tl.constexpr,
    ):
        """Program b: M_b = sum_c part[b, c] (fixed order), then the solve (METHOD -1:
        store M only)."""
        b = tl.program_id(0)
        rk = tl.arange(0, KP)
        rc = tl.arange(0, CB)[:, None, None]
        rows = rk[None, :, None]
        cols = rk[None, None, :]
        kk = (rows < K) & (cols < K)
        base = part_ptr + b.to(tl.int64) * NC * K * K + rows * K + cols
        ordm, tgtm = _solve_inputs(b, order_ptr, target_ptr, K, KP, METHOD, HAS_ORDER)
        acc = tl.zeros([CB, KP, KP], dtype=tl.float32)
        for c0 in range(0, NC, CB):  # CB partials per load, summed in a fixed order
            acc += tl.load(base + (c0 + rc) * (K * K), mask=kk & (c0 + rc < NC), other=0.0)
        M = tl.sum(acc, axis=0)
        _solve_sample(
            M, b, M_ptr, cos_ptr, w_ptr, phi_ptr, ordm, tgtm,
            K, KP, METHOD, HAS_ORDER,
        )


def _solve_args(G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor]):
    """Checked, converted solve inputs and fresh outputs: ``(order, target, M, cos, w, phi)``
    (``order`` None without one, ``phi`` None unless method 2)."""
    _check_G(G)
    if method not in METHOD_IDS.values():
        raise ValueError(f"unknown method id {method!r}; expected one of {sorted(METHOD_IDS.values())}")
    B, K, D = G.shape
    f32 = dict(dtype=torch.float32, device=G.device)
    if method == 2:
        if target is None:
            raise ValueError("gradvac needs a (K, K) target matrix")
        if tuple(target.shape) != (K, K):
            raise ValueError(f"target must be (K, K) = {(K, K)}, got {tuple(target.shape)}")
        target = target.to(**f32).contiguous()
    else:
        target = None
    if method in (1, 2) and order is not None:
        if tuple(order.shape) != (B, K, K):
            raise ValueError(f"order must be (B, K, K) = {(B, K, K)}, got {tuple(order.shape)}")
        order = order.to(device=G.device, dtype=torch.int64).contiguous()
    else:
        order = None
    M = torch.empty(B, K, K, **f32)
    cos = torch.empty(B, K, K, **f32)
    w = torch.empty(B, K, **f32)
    phi = torch.empty(B, K, K, **f32) if method == 2 else None  # every entry written
    return order, target, M, cos, w, phi


def _gram_solve(G: Tensor, method: int, order, target, M, cos, w, phi) -> None:
    """The streaming Gram pass (partials over (sample, D-chunk) programs) and the solve
    kernel (grid B), writing M, cos, w, phi. D = 0: the solve runs on zero Gram matrices."""
    B, K, D = G.shape
    KP = _kp(K)
    if D == 0:
        TILES, NC, nw = 1, 1, 1
        part = torch.zeros(B, 1, K, K, dtype=torch.float32, device=G.device)
    else:
        BLOCK_D, nw = _gram_cfg(KP, D, G.element_size())
        TILES, NC = _chunks(B, D, BLOCK_D, L._CHUNK)
        part = torch.empty(B, NC, K, K, dtype=torch.float32, device=G.device)
        triton_gram._gram_kernel[(B * NC,)](
            G, part, D, NC, K=K, KP=KP, BLOCK_D=BLOCK_D, TILES=TILES, num_warps=nw,
        )
    dummy = M  # stands for absent optional pointers (never dereferenced)
    _solve_kernel[(B,)](
        part, M, cos, w, phi if phi is not None else dummy, order if order is not None else dummy,
        target if target is not None else dummy, NC,
        K=K, KP=KP, METHOD=method, HAS_ORDER=order is not None, CB=L._CB, num_warps=1,
    )


@_on_G_device
def solve_forward(
    G: Tensor,
    method: int,
    order: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """gram -> per-sample solve, no combine (``reference.solve(reference.gram(G), ...)``).

    Two launches: the streaming Gram pass and the solve kernel; G is read once.

    Args:
        G: (B, K, D) float32/float16/bfloat16, K <= MAX_K.
        method, order, target: as in :func:`fused_forward`.
    Returns:
        ``(M, cos, w, phi)``: M, cos (B, K, K), w (B, K), phi (B, K, K) (method 2, else
        ``None``), all float32.
    """
    order, target, M, cos, w, phi = _solve_args(G, method, order, target)
    G = G.contiguous()
    if G.shape[0] > 0:
        _gram_solve(G, method, order, target, M, cos, w, phi)
    return M, cos, w, phi
