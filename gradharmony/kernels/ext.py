"""The C++/CUDA extension: ``torch.ops.gradharmony.{gram, combine, fused}`` and its backends.

The ops (schemas in ``csrc/ops.cpp``, semantics of :mod:`gradharmony.engine.reference`) come
from the prebuilt module ``gradharmony._C`` (``pip install --no-build-isolation .``) or, failing
that, are JIT-compiled once with :func:`torch.utils.cpp_extension.load` (needs a C++ compiler
and ninja) into torch's extension cache, ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); set ``GRADHARMONY_NO_JIT=1`` to forbid that. CUDA sources are
JIT-compiled only when a GPU, a CUDA torch and nvcc are all present.

Raw ops (``reduction``: 0 = "none", 1 = "sum"; ``method``: 0 sum, 1 pcgrad, 2 gradvac)::

    M = torch.ops.gradharmony.gram(G)                       # (B, K, K)
    out = torch.ops.gradharmony.combine(G, w, 0)            # (B, D); 1 -> (D,)
    out, M, cos, w, phi = torch.ops.gradharmony.fused(G, 1, order, None, None, 0)

Example::

    >>> import torch
    >>> from gradharmony.kernels.ext import CppBackend
    >>> be = CppBackend()                                   # doctest: +SKIP
    >>> out, M, cos, w, phi = be.fused(torch.randn(4, 2, 10), 1, None, None, None, "none")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shlex
import shutil
import threading
from typing import Optional

import torch
from torch import Tensor

__all__ = ["load_ops", "ops_source", "ops_path", "source_dir", "CppBackend", "CudaBackend", "REDUCTION_IDS"]

REDUCTION_IDS = {"none": 0, "sum": 1}
_OP_NAMES = ("gram", "combine", "fused")

_lock = threading.Lock()
_state: dict = {"source": None, "error": None, "path": None}


def source_dir() -> Optional[str]:
    """Folder of the C++/CUDA sources: ``gradharmony/_csrc`` (installed) or ``csrc/`` (checkout)."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (os.path.join(pkg, "_csrc"), os.path.join(os.path.dirname(pkg), "csrc")):
        if os.path.isfile(os.path.join(cand, "ops.cpp")):
            return cand
    return None


def _register_fakes() -> None:
    """Shape-only (fake / meta) versions of the ops, so that they trace under torch.compile."""

    def acc(G: Tensor) -> torch.dtype:
        return torch.float64 if G.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("gradharmony::gram")
    def _gram_fake(G):
        B, K, _ = G.shape
        return G.new_empty((B, K, K), dtype=acc(G))

    @torch.library.register_fake("gradharmony::combine")
    def _combine_fake(G, w, reduction):
        B, K, D = G.shape
        return G.new_empty((B, D) if reduction == 0 else (D,))

    @torch.library.register_fake("gradharmony::fused")
    def _fused_fake(G, method, order, target, sample_weight, reduction):
        B, K, D = G.shape
        a = acc(G)
        out = G.new_empty((B, D) if reduction == 0 else (D,))
        phi = G.new_empty((B, K, K) if method == 2 else (0,), dtype=a)
        return (out, G.new_empty((B, K, K), dtype=a), G.new_empty((B, K, K), dtype=a),
                G.new_empty((B, K), dtype=a), phi)


def _jit_load() -> str:
    from torch.utils import cpp_extension as ce

    src = source_dir()
    if src is None:
        raise RuntimeError("gradharmony: C++ sources not found (neither gradharmony/_csrc nor csrc/)")
    # a missing compiler: say so, rather than torch's "compiler not compatible" log + ninja output
    cxx = (shlex.split(os.environ.get("CXX", "")) or ["c++"])[0]
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} not found (install g++ or set CXX)")
    sources = [os.path.join(src, "ops.cpp"), os.path.join(src, "harmonize_cpu.cpp")]
    cu = os.path.join(src, "harmonize_cuda.cu")
    with_cuda = (
        torch.cuda.is_available() and bool(torch.version.cuda) and ce.CUDA_HOME is not None
        and os.path.isfile(cu)
    )
    name = "gradharmony_C"
    kwargs = {}
    if with_cuda:
        sources.append(cu)
        name += "_cuda"
        kwargs["extra_cuda_cflags"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    ce.load(
        name=name,
        sources=sources,
        extra_cflags=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[src],
        is_python_module=False,
        verbose=os.environ.get("GRADHARMONY_VERBOSE_BUILD", "") == "1",
        **kwargs,
    )
    _state["path"] = next(
        (p for p in torch.ops.loaded_libraries if os.path.basename(p).startswith(name)), None
    )
    return "jit" + ("+cuda" if with_cuda else "")


def load_ops() -> str:
    """Make ``torch.ops.gradharmony.*`` available; returns how ("prebuilt", "jit", "jit+cuda").

    Raises ``RuntimeError`` with the reason when neither the prebuilt module nor the JIT
    build is usable. The outcome (success or failure) is cached for the process.
    """
    with _lock:
        if _state["source"] is not None:
            return _state["source"]
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        reasons = []
        try:
            from .. import _C  # noqa: F401  (registers the ops)

            _state["source"], _state["path"] = "prebuilt", _C.__file__
        except ImportError as exc:
            reasons.append(f"prebuilt gradharmony._C not importable ({exc})")
        if _state["source"] is None:
            if os.environ.get("GRADHARMONY_NO_JIT", "") not in ("", "0"):
                reasons.append("JIT compilation disabled by GRADHARMONY_NO_JIT")
            else:
                try:
                    _state["source"] = _jit_load()
                except Exception as exc:  # no compiler, no ninja, compile error, ...
                    reasons.append(f"JIT build failed ({type(exc).__name__}: {exc})")
        if _state["source"] is None:
            _state["error"] = "gradharmony C++/CUDA ops unavailable: " + "; ".join(reasons)
            raise RuntimeError(_state["error"])
        _register_fakes()
        return _state["source"]


def ops_source() -> Optional[str]:
    """How the ops were loaded (``None`` if :func:`load_ops` has not succeeded)."""
    return _state["source"]


def ops_path() -> Optional[str]:
    """The loaded library: ``gradharmony/_C*.so`` or the JIT build in torch's extension cache
    (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)."""
    return _state["path"]


class _ExtBackend:
    """Backend protocol of :mod:`gradharmony.engine.backends` over the extension's ops."""

    name = ""
    device_type = ""
    dispatch_key = ""
    dtypes: tuple = ()

    def __init__(self) -> None:
        load_ops()
        if not torch._C._dispatch_has_kernel_for_dispatch_key("gradharmony::fused", self.dispatch_key):
            raise RuntimeError(
                f"gradharmony extension was built without {self.dispatch_key} kernels "
                f"(loaded: {_state['source']})"
            )

    def supports(self, G: Tensor) -> bool:
        return G.device.type == self.device_type and G.dtype in self.dtypes

    def gram(self, G: Tensor) -> Tensor:
        """(B, K, D) -> (B, K, K) Gram matrices in the accumulation dtype."""
        return torch.ops.gradharmony.gram(G)

    def combine(self, G: Tensor, w: Tensor, reduction: str) -> Tensor:
        """``out_b = w_b^T G_b`` ((B, D)) or its sum over b ((D,)), in G's dtype."""
        return torch.ops.gradharmony.combine(G, w, REDUCTION_IDS[reduction])

    def fused(
        self,
        G: Tensor,
        method: int,
        order: Optional[Tensor],
        target: Optional[Tensor],
        sample_weight: Optional[Tensor],
        reduction: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
        """gram -> solve -> combine; ``(out, M, cos, w, phi)`` as in ``reference.fused``."""
        out, M, cos, w, phi = torch.ops.gradharmony.fused(
            G, method, order, target, sample_weight, REDUCTION_IDS[reduction]
        )
        return out, M, cos, w, (phi if method == 2 else None)


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
