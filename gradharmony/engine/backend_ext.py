"""The ``cpp`` and ``cuda`` backends: the engine's protocol over the extension's raw ops.

The ops themselves (loading, schemas, fake kernels) are in :mod:`gradharmony.kernels.ext`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import ext
from ..kernels.spec import REDUCTION_IDS
from .reference import FusedOutput, SolveOutput

__all__ = ["CppBackend", "CudaBackend"]


class _ExtBackend:
    """Backend protocol of :mod:`gradharmony.engine.backends` over ``torch.ops.gradharmony``."""

    name = ""
    device_type = ""
    dispatch_key = ""
    dtypes: tuple = ()

    def __init__(self) -> None:
        source = ext.load_ops()
        if not ext.has_kernels(self.dispatch_key):
            raise RuntimeError(
                f"gradharmony extension was built without {self.dispatch_key} kernels (loaded: {source})"
            )

    def supports(self, G: Tensor) -> bool:
        return G.device.type == self.device_type and G.dtype in self.dtypes

    def gram(self, G: Tensor) -> Tensor:
        """(B, K, D) -> (B, K, K) Gram matrices in the accumulation dtype."""
        return torch.ops.gradharmony.gram(G)

    def combine(self, G: Tensor, w: Tensor, reduction: str) -> Tensor:
        """``out_b = w_b^T G_b`` ((B, D)) or its sum over b ((D,)), in G's dtype."""
        return torch.ops.gradharmony.combine(G, w, REDUCTION_IDS[reduction])

    def solve(self, G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor]) -> SolveOutput:
        """gram -> per-sample solve, as ``reference.gram_solve``."""
        M, cos, w, phi = torch.ops.gradharmony.solve(G, method, order, target)
        return SolveOutput(M, cos, w, phi if method == 2 else None)

    def fused(
        self, G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor], reduction: str
    ) -> FusedOutput:
        """gram -> solve -> combine, as ``reference.fused``."""
        out, M, cos, w, phi = torch.ops.gradharmony.fused(G, method, order, target, REDUCTION_IDS[reduction])
        return FusedOutput(out, M, cos, w, phi if method == 2 else None)


class CppBackend(_ExtBackend):
    """C++ CPU kernels (OpenMP over samples / columns); float32, float64, float16, bfloat16."""

    name = "cpp"
    device_type = "cpu"
    dispatch_key = "CPU"
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class CudaBackend(_ExtBackend):
    """CUDA kernels (one launch per sample block for small D, two streaming passes for large D)."""

    name = "cuda"
    device_type = "cuda"
    dispatch_key = "CUDA"
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device available")
        super().__init__()
