"""Triton ``combine``: ``out_b = w_b^T G_b`` (reduction "none") or its sum over b ("sum").

"none": (sample, D-chunk) programs; "sum": D-tile programs that loop over the samples and
write their tile once (split into sample groups with float32 partials summed by torch only
when D has too few tiles to fill the GPU). Accumulation in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton_launch as L
from .triton_launch import _check_G, _chunks, _combine_cfg, _kp, _on_G_device, tl, triton

__all__ = ["combine_forward"]

if triton is not None:

    @triton.jit
    def _combine_kernel(
        G_ptr,
        w_ptr,
        out_ptr,
        B,
        D,
        NC,
        B_PER,
        K: tl.constexpr,
        KP: tl.constexpr,
        BLOCK_D: tl.constexpr,
        TILES: tl.constexpr,
        REDUCE_SUM: tl.constexpr,
    ):
        """``out_b = w_b^T G_b``.

        REDUCE_SUM False: flat grid B * NC, program (b, c) writes out[b, chunk c]
        (TILES tiles of BLOCK_D). REDUCE_SUM True: flat grid NC * S, program (c, s) sums
        samples [s * B_PER, (s + 1) * B_PER) of one BLOCK_D tile c into out[s, tile c]
        (float32 partials when S > 1, else the (D,) output itself).
        """
        pid = tl.program_id(0)
        rk = tl.arange(0, KP)
        rd = tl.arange(0, BLOCK_D)
        kmask = rk < K
        roff = rk[:, None].to(tl.int64) * D
        if REDUCE_SUM:
            s = pid // NC
            c = pid - s * NC
            offs = c.to(tl.int64) * BLOCK_D + rd
            dmask = offs < D
            mask = kmask[:, None] & dmask[None, :]
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            b_lo = s * B_PER
            n_b = tl.minimum(b_lo + B_PER, B) - b_lo
            w_p = w_ptr + b_lo.to(tl.int64) * K + rk
            g_p = G_ptr + b_lo.to(tl.int64) * K * D + roff + offs[None, :]
            for _ in range(n_b):  # pointers advance one sample per step (64-bit safe)
                w = tl.load(w_p, mask=kmask, other=0.0)
                g = tl.load(g_p, mask=mask, other=0.0)
                acc += tl.sum(w[:, None] * g.to(tl.float32), axis=0)
                w_p += K
                g_p += K * D
            tl.store(out_ptr + s.to(tl.int64) * D + offs, acc.to(out_ptr.dtype.element_ty), mask=dmask)
        else:
            b = pid // NC
            c = pid - b * NC
            b64 = b.to(tl.int64)
            w = tl.load(w_ptr + b64 * K + rk, mask=kmask, other=0.0)
            g_base = G_ptr + b64 * K * D + roff
            start = c.to(tl.int64) * (BLOCK_D * TILES)
            for t in range(TILES):
                offs = start + t * BLOCK_D + rd
                dmask = offs < D
                g = tl.load(g_base + offs[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
                o = tl.sum(w[:, None] * g.to(tl.float32), axis=0)
                tl.store(out_ptr + b64 * D + offs, o.to(out_ptr.dtype.element_ty), mask=dmask)


def _combine(G: Tensor, w: Tensor, reduction: str) -> Tensor:
    """Launch :func:`_combine_kernel`; G contiguous (B, K, D), w contiguous (B, K) float32."""
    B, K, D = G.shape
    KP = _kp(K)
    if reduction == "none":
        out = torch.empty(B, D, dtype=G.dtype, device=G.device)
        if B == 0 or D == 0:
            return out
        BLOCK_D, nw = _combine_cfg(KP, D, G.element_size())
        TILES, NC = _chunks(B, D, BLOCK_D, L._CHUNK // 2)
        _combine_kernel[(B * NC,)](
            G, w, out, B, D, NC, 1,
            K=K, KP=KP, BLOCK_D=BLOCK_D, TILES=TILES, REDUCE_SUM=False, num_warps=nw,
        )
        return out
    if reduction == "sum":
        if B == 0 or D == 0:
            return torch.zeros(D, dtype=G.dtype, device=G.device)
        BLOCK_D, nw = _combine_cfg(KP, D, G.element_size())
        NC = triton.cdiv(D, BLOCK_D)
        # split the samples when there are too few D tiles to fill the GPU
        S = max(1, min(B, L._MIN_PROGRAMS // NC, triton.cdiv(B, 4)))
        B_PER = triton.cdiv(B, S)
        S = triton.cdiv(B, B_PER)
        if S == 1:
            out = torch.empty(D, dtype=G.dtype, device=G.device)
        else:
            out = torch.empty(S, D, dtype=torch.float32, device=G.device)
        _combine_kernel[(NC * S,)](
            G, w, out, B, D, NC, B_PER,
            K=K, KP=KP, BLOCK_D=BLOCK_D, TILES=1, REDUCE_SUM=True, num_warps=nw,
        )
        if S == 1:
            return out
        return out.sum(0).to(G.dtype)
    raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")


@_on_G_device
def combine_forward(G: Tensor, w: Tensor, reduction: str = "none") -> Tensor:
    """``out_b = w_b^T G_b`` (reduction "none", (B, D)) or its sum over b ("sum", (D,)).

    G (B, K, D) float32/float16/bfloat16, w (B, K) any float dtype (used in float32);
    output in G's dtype, accumulated in float32.
    """
    _check_G(G)
    B, K, D = G.shape
    if tuple(w.shape) != (B, K):
        raise ValueError(f"w must be (B, K) = {(B, K)}, got {tuple(w.shape)}")
    return _combine(G.contiguous(), w.to(device=G.device, dtype=torch.float32).contiguous(), reduction)
