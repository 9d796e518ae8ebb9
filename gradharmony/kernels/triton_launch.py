"""Launch configuration of the Triton kernels: the triton import, the limits, block sizes,
grid shapes and path choice shared by the op modules (``triton_gram``, ``triton_solve``,
``triton_combine``, ``triton_fused``).

The module-level numbers prefixed ``_`` are read at every launch (tests shrink them to run
the looping code on tiny inputs).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from .spec import FUSED_MAX_K

try:  # the kernels' modules must import (and say why they cannot run) without triton
    import triton
    import triton.language as tl

    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - exercised only without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

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


def _path(G: Tensor, path: str) -> str:
    if path != "auto":
        if path not in ("small", "large"):
            raise ValueError(f"path must be 'auto', 'small' or 'large', got {path!r}")
        return path
    B, K, D = G.shape
    return "small" if K * D * G.element_size() <= SMALL_BYTES else "large"
