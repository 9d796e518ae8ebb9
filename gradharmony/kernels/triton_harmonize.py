"""Triton kernels of the harmonization engine: Gram -> per-sample solve -> combine.

Same semantics as :mod:`gradharmony.engine.reference` (``gram``, ``combine``, gram +
``solve``, ``fused``); the layout follows Liger-Kernel: ``_x_kernel`` (``triton.jit``) ->
``x_forward`` launchers (the engine's adapter is ``gradharmony.engine.backend_triton``).

Two paths (DESIGN.md, "Gram -> coefficients -> combine"):

- small, launch-bound inputs (``K * D * itemsize <= SMALL_BYTES``, 64 KiB: 256 x 3 x
  1024 and 1024 x 2 x 4096 float32): ONE launch, :func:`_fused_small_kernel`, one
  program per sample: the Gram matrix in float32, the tiny solve in registers, then
  ``out_b = w_b^T G_b``. When the padded (KP, D) tile has at most 8192 elements the
  sample stays in registers and G is read once; otherwise the program loops over D
  twice (the second read mostly hits L2). ``reduction="sum"``: each program adds the
  sum of its samples (several per program when B is large) atomically into a zeroed
  float32 (D,) buffer; under ``torch.use_deterministic_algorithms(True)`` it writes
  per-sample float32 rows that torch sums instead;
- large inputs: two streaming passes. :func:`_gram_kernel` over a (sample, D-chunk)
  grid writes partial Gram matrices (B, NC, K, K) (no atomics: deterministic);
  :func:`_solve_kernel` (grid B) sums them in a fixed order and runs the solve, writing
  M, cos, w, phi (these two passes alone are :func:`solve_forward`);
  :func:`_combine_kernel` streams G once more: (sample, D-chunk)
  programs for ``reduction="none"``; for ``"sum"``, D-tile programs that loop over the
  samples and write their tile once (split into sample groups with float32 partials
  summed by torch only when D has too few tiles to fill the GPU).

Gram tiles are loaded as (KP, 1, BLOCK_D) and multiplied by their ``tl.permute``: a
register relabeling, where ``g[:, None, :] * g[None, :, :]`` of a 2-D tile makes the
compiler move every tile through shared memory (checked in the PTX for sm_90).

All accumulation is float32 (inputs float32 / float16 / bfloat16); divisions and square
roots of the solve are IEEE-rounded (``div_rn`` / ``sqrt_rn``) like PyTorch's.

Shapes: ``G: (B, K, D)`` contiguous, ``K <= MAX_K`` (8); ``M, cos, phi: (B, K, K)`` float32;
``w: (B, K)`` float32; ``out: (B, D)`` or ``(D,)`` in G's dtype.

Example (CPU, under the interpreter)::

    import os; os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from gradharmony.kernels.triton_harmonize import fused_forward, solve_forward
    G = torch.randn(4, 2, 100)
    out, M, cos, w, phi = fused_forward(G, 1, None, None, "none")
    M, cos, w, phi = solve_forward(G, 1)
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from .spec import FUSED_MAX_K, METHOD_IDS, REDUCTION_IDS

try:  # the module must import (and say why it cannot run) without triton
    import triton
    import triton.language as tl

    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - exercised only without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = [
    "gram_forward",
    "solve_forward",
    "combine_forward",
    "fused_forward",
    "SUPPORTED_DTYPES",
    "MAX_K",
    "SMALL_BYTES",
]

#: Input dtypes the kernels take (float64 falls back to another backend).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Largest number of losses K per sample.
MAX_K = FUSED_MAX_K
#: One-launch path when one sample's K rows take at most this many bytes
#: (env ``GRADHARMONY_TRITON_SMALL_BYTES``; 64 KiB: 1024 x 2 x 4096 float32 is "small").
SMALL_BYTES = int(os.environ.get("GRADHARMONY_TRITON_SMALL_BYTES", 64 * 1024))

_METHOD_NONE = -1  # _solve_kernel: only reduce the partial Gram matrices


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _safe_div(num, den):
        """num / den where den > 0, else 0 (IEEE division)."""
        pos = den > 0
        return tl.where(pos, tl.div_rn(num, tl.where(pos, den, 1.0)), 0.0)

    @triton.jit
    def _tile_gram(ga):
        """(KP, KP, BLOCK) products ``g_i[d] g_j[d]`` of a (KP, 1, BLOCK) float32 tile.

        The tile is loaded 3-D and transposed with ``tl.permute`` (a register relabeling):
        building the operands from a 2-D tile with ``g[:, None, :]`` / ``g[None, :, :]``
        makes the compiler route every tile through shared memory.
        """
        return ga * tl.permute(ga, (1, 0, 2))

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


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------

#: The small path keeps the whole sample in registers (G read once) when the padded
#: (KP, next_pow2(D)) tile has at most this many elements.
_ONE_TILE_ELEMS = 8192
#: Test hook: every BLOCK_D becomes at most this, so the looping code runs on tiny D.
_BLOCK_OVERRIDE: Optional[int] = None
#: Elements each Gram / combine program streams per row (chunk of D).
_CHUNK = 32768
#: Aim for at least this many programs per streaming grid (H100: 132 SMs).
_MIN_PROGRAMS = 512
#: Partial Gram matrices the solve kernel loads per step.
_CB = 16
#: Small path, reduction "sum": samples per program (at most _MAX_SPP) so that about
#: _MIN_SUM_PROGRAMS programs each make one atomic add per element.
_MIN_SUM_PROGRAMS = 264
_MAX_SPP = 8


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _kp(K: int) -> int:
    return max(2, _next_pow2(K))


def _fit(block: int, warps: int, D: int) -> tuple[int, int]:
    """Shrink a (BLOCK_D, num_warps) config for short rows, keeping elements per thread."""
    np2 = max(16, _next_pow2(D))
    while block > np2:
        block //= 2
        warps = max(1, warps // 2)
    return block, warps


def _gram_cfg(KP: int, D: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) of a Gram tile loop.

    Each thread owns ``e = BLOCK_D / (32 num_warps)`` consecutive elements of every row
    (16-byte vector loads; e >= 8 for 2-byte dtypes, else the compiler relayouts the
    tile through shared memory) and a ``KP * KP * e`` float32 accumulator: 32 registers
    for KP = 2, 64 or 128 for KP = 4, 64 for KP = 8 (e = 1).
    """
    if _BLOCK_OVERRIDE:
        return min(_BLOCK_OVERRIDE, max(16, _next_pow2(D))), 1
    if KP == 2:
        block, warps = 2048, 8  # e = 8
    elif KP == 4:
        block, warps = (512 if itemsize >= 4 else 1024), 4  # e = 4 / 8
    else:
        block, warps = 128, 4  # e = 1
    return _fit(block, warps, D)


def _combine_cfg(KP: int, D: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) of a combine tile: KP * BLOCK_D = 4096 values, 4 warps
    (at least 8 elements per thread for 2-byte dtypes: 16-byte loads)."""
    if _BLOCK_OVERRIDE:
        return min(_BLOCK_OVERRIDE, max(16, _next_pow2(D))), 1
    block = 4096 // KP if itemsize >= 4 else max(1024, 4096 // KP)
    return _fit(block, 4, D)


def _chunks(B: int, D: int, block: int, chunk: int) -> tuple[int, int]:
    """(TILES, NC): each (sample, chunk) program streams TILES tiles of ``block``
    (at most ``chunk`` elements per row), with chunks small enough for about
    _MIN_PROGRAMS programs when B is small."""
    tiles_per_row = triton.cdiv(D, block)
    tiles = max(1, min(chunk // block, tiles_per_row, (B * tiles_per_row) // _MIN_PROGRAMS))
    return tiles, triton.cdiv(D, block * tiles)


def _small_cfg(KP: int, D: int, itemsize: int) -> tuple[int, bool, int]:
    """(BLOCK_D, ONE_TILE, num_warps) of the one-launch kernel."""
    np2 = max(16, _next_pow2(D))
    if _BLOCK_OVERRIDE:
        block = min(_BLOCK_OVERRIDE, np2)
        return block, D <= block, 1
    if KP * np2 <= _ONE_TILE_ELEMS:
        return np2, True, max(1, min(8, np2 // 256))  # e = 8 (16 for D = 4096, K = 2)
    block, warps = _gram_cfg(KP, D, itemsize)
    return block, False, warps


def _on_G_device(fn):
    """Run ``fn(G, ...)`` with G's CUDA device current (triton launches on the current
    device)."""

    @functools.wraps(fn)
    def wrapper(G: Tensor, *args, **kwargs):
        if G.is_cuda and G.device.index != torch.cuda.current_device():
            with torch.cuda.device(G.device):
                return fn(G, *args, **kwargs)
        return fn(G, *args, **kwargs)

    return wrapper


def _check_G(G: Tensor) -> None:
    if G.dim() != 3:
        raise ValueError(f"G must be (B, K, D), got shape {tuple(G.shape)}")
    if G.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton kernels take {SUPPORTED_DTYPES}, got {G.dtype}")
    if G.shape[1] > MAX_K:
        raise ValueError(f"triton kernels take K <= {MAX_K}, got K = {G.shape[1]}")


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
    TILES, NC = _chunks(B, D, BLOCK_D, _CHUNK)
    part = torch.empty(B, NC, K, K, dtype=torch.float32, device=G.device)
    _gram_kernel[(B * NC,)](G, part, D, NC, K=K, KP=KP, BLOCK_D=BLOCK_D, TILES=TILES, num_warps=nw)
    if NC == 1:
        return part.view(B, K, K)
    M = torch.empty(B, K, K, dtype=torch.float32, device=G.device)
    _solve_kernel[(B,)](
        part, M, M, M, M, M, M, NC,
        K=K, KP=KP, METHOD=_METHOD_NONE, HAS_ORDER=False, CB=_CB, num_warps=1,
    )
    return M


def _combine(G: Tensor, w: Tensor, reduction: str) -> Tensor:
    """Launch :func:`_combine_kernel`; G contiguous (B, K, D), w contiguous (B, K) float32."""
    B, K, D = G.shape
    KP = _kp(K)
    if reduction == "none":
        out = torch.empty(B, D, dtype=G.dtype, device=G.device)
        if B == 0 or D == 0:
            return out
        BLOCK_D, nw = _combine_cfg(KP, D, G.element_size())
        TILES, NC = _chunks(B, D, BLOCK_D, _CHUNK // 2)
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
        S = max(1, min(B, _MIN_PROGRAMS // NC, triton.cdiv(B, 4)))
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


def _path(G: Tensor, path: str) -> str:
    if path != "auto":
        if path not in ("small", "large"):
            raise ValueError(f"path must be 'auto', 'small' or 'large', got {path!r}")
        return path
    B, K, D = G.shape
    return "small" if K * D * G.element_size() <= SMALL_BYTES else "large"


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
        TILES, NC = _chunks(B, D, BLOCK_D, _CHUNK)
        part = torch.empty(B, NC, K, K, dtype=torch.float32, device=G.device)
        _gram_kernel[(B * NC,)](
            G, part, D, NC, K=K, KP=KP, BLOCK_D=BLOCK_D, TILES=TILES, num_warps=nw,
        )
    dummy = M  # stands for absent optional pointers (never dereferenced)
    _solve_kernel[(B,)](
        part, M, cos, w, phi if phi is not None else dummy, order if order is not None else dummy,
        target if target is not None else dummy, NC,
        K=K, KP=KP, METHOD=method, HAS_ORDER=order is not None, CB=_CB, num_warps=1,
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
            _gram_solve(G, method, order, target, M, cos, w, phi)
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
        spp = max(1, min(_MAX_SPP, B // _MIN_SUM_PROGRAMS)) if (atomic and one_tile) else 1
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
    _gram_solve(G, method, order, target, M, cos, w, phi)
    out = _combine(G, w, reduction)
    return out, M, cos, w, phi
