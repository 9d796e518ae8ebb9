"""The ``triton`` backend: the engine's protocol over the Triton launchers.

The kernels and launchers are in :mod:`gradharmony.kernels.triton_harmonize`. Runs on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import FusedOutput, SolveOutput

__all__ = ["TritonBackend"]


class TritonBackend:
    """The Triton backend of the engine (``name = "triton"``).

    Takes float32 / float16 / bfloat16 and K <= ``FUSED_MAX_K``; anything else is left to
    the next backend (``supports`` returns False).
    """

    name = "triton"

    def __init__(self) -> None:
        from ..kernels import triton_harmonize as th

        if th.triton is None:
            raise RuntimeError(f"triton is not importable ({th._TRITON_ERROR})")
        self._th = th
        self.interpret = th._interpret()
        if not self.interpret and not torch.cuda.is_available():
            raise RuntimeError(
                "triton backend needs a CUDA GPU (torch.cuda.is_available() is False); "
                "set TRITON_INTERPRET=1 before importing it to run the kernels on CPU"
            )

    def supports(self, G: Tensor) -> bool:
        th = self._th
        if G.dim() != 3 or G.dtype not in th.SUPPORTED_DTYPES or G.shape[1] > th.MAX_K:
            return False
        if G.device.type == "cuda":
            return True
        return self.interpret and G.device.type == "cpu"

    def gram(self, G: Tensor) -> Tensor:
        return self._th.gram_forward(G)

    def combine(self, G: Tensor, w: Tensor, reduction: str) -> Tensor:
        return self._th.combine_forward(G, w, reduction)

    def solve(self, G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor]) -> SolveOutput:
        return SolveOutput(*self._th.solve_forward(G, method, order, target))

    def fused(
        self, G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor], reduction: str
    ) -> FusedOutput:
        return FusedOutput(*self._th.fused_forward(G, method, order, target, reduction))
