"""Triton ``gram``: per-sample Gram matrices ``M_b = G_b G_b^T`` (float32).

:func:`_gram_kernel` writes partial Gram matrices over (sample, D-chunk) programs (no atomics:
deterministic); :func:`gram_forward` sums them in a fixed order with the solve kernel's
reduction (``METHOD = -1``) when a row has several chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton_launch as L
from .triton_launch import _check_G, _chunks, _gram_cfg, _kp, _on_G_device, tl, triton

__all__ = ["gram_forward"]

if triton is not None:

    @triton.jit
    def _tile_gram(ga):
        """(KP, KP, BLOCK) products ``g_i[d] g_j[d]`` of a (KP, 1, BLOCK) float32 tile.

        The tile is loaded 3-D and transposed with ``tl.permute`` (a register relabeling):
        building the operands from a 2-D tile with ``g[:, None, :]`` / ``g[None, :, :]``
        makes the compiler route every tile through shared memory.
        """
        return ga * tl.permute(ga, (1, 0, 2))

    @triton.jit
    def _gram_kernel(
        G_ptr,
        part_ptr,
        D,
        NC,
        K: tl.constexpr,
        KP: tl.constexpr,
        BLOCK_D: tl.constexpr,
        TILES: tl.constexpr,
    ):
        """Program (b, c) of a flat grid B * NC: the Gram matrix of G[b, :, chunk c]
        (TILES tiles of BLOCK_D) -> part[b, c] (B, NC, K, K) float32."""
        pid = tl.program_id(0)
        b = pid // NC
        c = pid - b * NC
        rk = tl.arange(0, KP)
        rk3 = rk[:, None, None]
        rd3 = tl.arange(0, BLOCK_D)[None, None, :]
        g_base3 = G_ptr + b.to(tl.int64) * K * D + rk3.to(tl.int64) * D
        start = c.to(tl.int64) * (BLOCK_D * TILES)
        acc = tl.zeros([KP, KP, BLOCK_D], dtype=tl.float32)
        for t in range(TILES):
            offs3 = start + t * BLOCK_D + rd3
            ga = tl.load(g_base3 + offs3, mask=(rk3 < K) & (offs3 < D), other=0.0)
            acc += _tile_gram(ga.to(tl.float32))
        M = tl.sum(acc, axis=2)
        rows = rk[:, None]
        cols = rk[None, :]
        tl.store(
            part_ptr + pid.to(tl.int64) * K * K + rows * K + cols,
            M,
            mask=(rows < K) & (cols < K),
        )


@_on_G_device
def gram_forward(G: Tensor) -> Tensor:
    """Per-sample Gram matrices ``M_b = G_b G_b^T`` of G (B, K, D) -> (B, K, K) float32.

    Partial Gram matrices over (sample, D-chunk) programs, then (when a row has several
    chunks) a fixed-order sum: deterministic, one or two launches.
    """
    _check_G(G)
    G = G.contiguous()
    B, K, D = G.shape
    if B == 0 or D == 0:
        return torch.zeros(B, K, K, dtype=torch.float32, device=G.device)
    KP = _kp(K)
    BLOCK_D, nw = _gram_cfg(KP, D, G.element_size())
    TILES, NC = _chunks(B, D, BLOCK_D, L._CHUNK)
    part = torch.empty(B, NC, K, K, dtype=torch.float32, device=G.device)
    _gram_kernel[(B * NC,)](G, part, D, NC, K=K, KP=KP, BLOCK_D=BLOCK_D, TILES=TILES, num_warps=nw)
    if NC == 1:
        return part.view(B, K, K)
    M = torch.empty(B, K, K, dtype=torch.float32, device=G.device)
    from . import triton_solve  # the fixed-order sum of the partials (no import cycle)

    triton_solve._solve_kernel[(B,)](
        part, M, M, M, M, M, M, NC,
        K=K, KP=KP, METHOD=L._METHOD_NONE, HAS_ORDER=False, CB=L._CB, num_warps=1,
    )
    return M
