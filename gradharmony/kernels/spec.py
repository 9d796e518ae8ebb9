"""Facts every kernel and the engine share, written once.

- :data:`FUSED_MAX_K`: the largest K of the fused and solve kernels (C++/CUDA: ``kMaxFusedK``
  in ``csrc/harmonize_solve.h``; a test checks that the two agree). Larger K runs gram ->
  the reference solve -> combine.
- :data:`METHOD_IDS`, :data:`REDUCTION_IDS`: the integer ids of the raw ops' ``method`` and
  ``reduction`` arguments (``csrc/harmonize_solve.h``: ``Method``, ``Reduction``).
- :func:`acc_dtype`: the accumulation dtype (C++/CUDA: ``acc_type`` / ``acc_of`` in
  ``csrc/harmonize_common.h``).
"""

from __future__ import annotations

import torch

__all__ = ["FUSED_MAX_K", "METHOD_IDS", "REDUCTION_IDS", "acc_dtype"]

#: Largest K of the fused / solve kernels (``kMaxFusedK`` in csrc/harmonize_solve.h).
FUSED_MAX_K = 8

#: Method ids of the solve: 0 = sum, 1 = pcgrad, 2 = gradvac.
METHOD_IDS = {"sum": 0, "pcgrad": 1, "gradvac": 2}

#: Reduction ids of combine / fused: 0 = "none" ((B, D) output), 1 = "sum" ((D,) output).
REDUCTION_IDS = {"none": 0, "sum": 1}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for gradients of ``dtype``: float64 stays float64, every other
    floating dtype (float32, float16, bfloat16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
