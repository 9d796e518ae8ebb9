"""Triton ``fused``: gram -> per-sample solve -> combine.

Small, launch-bound inputs (``K * D * itemsize <= SMALL_BYTES``): ONE launch,
:func:`_fused_small_kernel`, one program per sample (several for an atomic "sum"); large
inputs: the two passes of :func:`gradharmony.kernels.triton_solve.solve_forward`, then the
combine pass of :mod:`.triton_combine`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_combine, triton_solve
from . import triton_launch as L
from .spec import REDUCTION_IDS
from .triton_gram import _tile_gram  # noqa: F401  (called inside the kernel)
from .triton_launch import _kp, _on_G_device, _path, _small_cfg, tl, triton
from .triton_solve import _solve_args
from .triton_solve import _solve_inputs, _solve_sample  # noqa: F401  (called inside the kernel)

__all__ = ["fused_forward"]

if triton is not None:

    @triton.jit
    def _fused_small_kernel(
        G_ptr,
        out_ptr,
        M_ptr,
        cos_ptr,
        w_ptr,
        phi_ptr,
        order_ptr,
        target_ptr,
        B,
        D,
        K: tl.constexpr,
        KP: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ONE_TILE: tl.constexpr,
        METHOD: tl.constexpr,
        HAS_ORDER: tl.constexpr,
        ATOMIC_SUM: tl.constexpr,
        SPP: tl.constexpr,
    ):
        """Gram, solve and combine of one sample per program (SPP samples when ONE_TILE).

        ``out`` is (B, D) (G's dtype, or float32 rows to be summed) or, with ATOMIC_SUM, a
        zeroed float32 (D,) that each program adds its samples' sum to (one atomic add per
        element and program)."""
        b = tl.program_id(0)
        rk = tl.arange(0, KP)
        rk3 = rk[:, None, None]
        rd = tl.arange(0, BLOCK_D)
        if ONE_TILE:  # the whole sample in registers: G is read once
            offs3 = rd[None, None, :]
            mask3 = (rk3 < K) & (offs3 < D)
            roff3 = rk3.to(tl.int64) * D + offs3
            o_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
            for i in range(SPP):
                bi = b * SPP + i
                if bi < B:
                    bi64 = bi.to(tl.int64)
                    ordm, tgtm = _solve_inputs(bi, order_ptr, target_ptr, K, KP, METHOD, HAS_ORDER)
                    ga = tl.load(G_ptr + bi64 * K * D + roff3, mask=mask3, other=0.0).to(tl.float32)
                    M = tl.sum(_tile_gram(ga), axis=2)
                    w = _solve_sample(
                        M, bi, M_ptr, cos_ptr, w_ptr, phi_ptr, ordm, tgtm,
                        K, KP, METHOD, HAS_ORDER,
                    )
                    o = tl.sum(tl.sum(w[:, None, None] * ga, axis=0), axis=0)
                    if ATOMIC_SUM:
                        o_sum += o
                    else:
                        tl.store(out_ptr + bi64 * D + rd, o.to(out_ptr.dtype.element_ty), mask=rd < D)
            if ATOMIC_SUM:
                tl.atomic_add(out_ptr + rd, o_sum, mask=rd < D)
        else:  # one sample per program, two loops over D
            b64 = b.to(tl.int64)
            g_base = G_ptr + b64 * K * D + rk[:, None].to(tl.int64) * D
            g_base3 = G_ptr + b64 * K * D + rk3.to(tl.int64) * D
            if ATOMIC_SUM:
                o_base = out_ptr
            else:
                o_base = out_ptr + b64 * D
            ordm, tgtm = _solve_inputs(b, order_ptr, target_ptr, K, KP, METHOD, HAS_ORDER)
            acc = tl.zeros([KP, KP, BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs3 = d0 + rd[None, None, :]
                ga = tl.load(g_base3 + offs3, mask=(rk3 < K) & (offs3 < D), other=0.0)
                acc += _tile_gram(ga.to(tl.float32))
            M = tl.sum(acc, axis=2)
            w = _solve_sample(
                M, b, M_ptr, cos_ptr, w_ptr, phi_ptr, ordm, tgtm,
                K, KP, METHOD, HAS_ORDER,
            )
            for d0 in range(0, D, BLOCK_D):
                offs = d0 + rd
                mask = (rk[:, None] < K) & (offs[None, :] < D)
                g = tl.load(g_base + offs[None, :], mask=mask, other=0.0).to(tl.float32)
                o = tl.sum(w[:, None] * g, axis=0)
                if ATOMIC_SUM:
                    tl.atomic_add(o_base + offs, o, mask=offs < D)
                else:
                    tl.store(o_base + offs, o.to(out_ptr.dtype.element_ty), mask=offs < D)


@_on_G_device
def fused_forward(
    G: Tensor,
    method: int,
    order: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    reduction: str = "none",
    path: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """gram -> per-sample solve -> combine, as :func:`gradharmony.engine.reference.fused`.

    Args:
        G: (B, K, D) float32/float16/bfloat16, K <= MAX_K.
        method: 0 = sum, 1 = pcgrad, 2 = gradvac.
        order: (B, K, K) integer visiting order (``None`` = 0..K-1).
        target: (K, K) GradVac targets (method 2).
        reduction: "none" -> out (B, D); "sum" -> out (D,).
        path: "auto", "small" (one launch per call) or "large" (gram / solve / combine
            streaming passes); "auto" picks "small" when ``K * D * itemsize <=
            SMALL_BYTES``.
    Returns:
        ``(out, M, cos, w, phi)``: out in G's dtype; M, cos (B, K, K), w (B, K) and phi
        (B, K, K) (method 2, else ``None``) float32.
    """
    if reduction not in REDUCTION_IDS:
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    order, target, M, cos, w, phi = _solve_args(G, method, order, target)
    G = G.contiguous()
    B, K, D = G.shape
    dev = G.device
    f32 = dict(dtype=torch.float32, device=dev)
    KP = _kp(K)
    if B == 0 or D == 0:  # nothing to stream: gram + solve on zero Gram matrices, zero output
        if B > 0:
            triton_solve._gram_solve(G, method, order, target, M, cos, w, phi)
        out = torch.zeros((B, D) if reduction == "none" else (D,), dtype=G.dtype, device=dev)
        return out, M, cos, w, phi

    dummy = M  # stands for absent optional pointers (never dereferenced)
    order_arg = order if order is not None else dummy
    target_arg = target if target is not None else dummy
    phi_arg = phi if phi is not None else dummy

    if _path(G, path) == "small":
        BLOCK_D, one_tile, nw = _small_cfg(KP, D, G.element_size())
        deterministic = torch.are_deterministic_algorithms_enabled()
        if reduction == "none":
            out = torch.empty(B, D, dtype=G.dtype, device=dev)
            atomic = False
        elif deterministic:
            out = torch.empty(B, D, **f32)  # per-sample rows, summed below in fixed order
            atomic = False
        else:
            out = torch.zeros(D, **f32)
            atomic = True
        # atomic sum of whole-sample tiles: several samples per program, fewer atomics
        spp = max(1, min(L._MAX_SPP, B // L._MIN_SUM_PROGRAMS)) if (atomic and one_tile) else 1
        _fused_small_kernel[(triton.cdiv(B, spp),)](
            G, out, M, cos, w, phi_arg, order_arg, target_arg, B, D,
            K=K, KP=KP, BLOCK_D=BLOCK_D, ONE_TILE=one_tile, METHOD=method,
            HAS_ORDER=order is not None, ATOMIC_SUM=atomic, SPP=spp,
            num_warps=nw,
        )
        if reduction == "sum":
            if not atomic:
                out = out.sum(0)
            out = out.to(G.dtype)
        return out, M, cos, w, phi

    # large: gram pass (partials) -> solve (grid B) -> combine pass
    triton_solve._gram_solve(G, method, order, target, M, cos, w, phi)
    out = triton_combine._combine(G, w, reduction)
    return out, M, cos, w, phi
