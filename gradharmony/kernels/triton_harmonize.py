"""Triton kernels of the harmonization engine: Gram -> per-sample solve -> combine.

One module per op, :mod:`.triton_gram`, :mod:`.triton_solve`, :mod:`.triton_combine`,
:mod:`.triton_fused`, and the launch configuration :mod:`.triton_launch`; this module gathers
their launchers.

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

from .triton_combine import combine_forward
from .triton_fused import fused_forward
from .triton_gram import gram_forward
from .triton_launch import (  # noqa: F401  (read by tests and bench/triton_aot.py)
    _TRITON_ERROR,
    MAX_K,
    SMALL_BYTES,
    SUPPORTED_DTYPES,
    _chunks,
    _gram_cfg,
    _interpret,
    _path,
    _small_cfg,
    triton,
)
from .triton_solve import solve_forward

__all__ = [
    "gram_forward",
    "solve_forward",
    "combine_forward",
    "fused_forward",
    "SUPPORTED_DTYPES",
    "MAX_K",
    "SMALL_BYTES",
]

#: kernel name -> the op module that launches it (bench/triton_aot.py wraps them there)
KERNEL_MODULES = {
    "_gram_kernel": "triton_gram",
    "_solve_kernel": "triton_solve",
    "_combine_kernel": "triton_combine",
    "_fused_small_kernel": "triton_fused",
}
