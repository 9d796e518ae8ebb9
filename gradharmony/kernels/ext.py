"""The C++/CUDA extension: the raw ops ``torch.ops.gradharmony.{gram, combine, solve, fused}``.

The ops (schemas in ``csrc/ops.cpp``, semantics of :mod:`gradharmony.engine.reference`) come
from the prebuilt module ``gradharmony._C`` (``pip install --no-build-isolation .``) or, failing
that, are JIT-compiled once with :func:`torch.utils.cpp_extension.load` (needs a C++ compiler
and ninja) into torch's extension cache, ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); set ``GRADHARMONY_NO_JIT=1`` to forbid that. CUDA sources are
JIT-compiled only when a GPU, a CUDA torch and nvcc are all present. The engine's adapters
over these ops are in ``gradharmony.engine.backend_ext``.

Raw ops (``reduction``: 0 = "none", 1 = "sum"; ``method``: 0 sum, 1 pcgrad, 2 gradvac;
see :mod:`.spec`)::

    M = torch.ops.gradharmony.gram(G)                       # (B, K, K)
    out = torch.ops.gradharmony.combine(G, w, 0)            # (B, D); 1 -> (D,)
    M, cos, w, phi = torch.ops.gradharmony.solve(G, 1, order, None)
    out, M, cos, w, phi = torch.ops.gradharmony.fused(G, 1, order, None, 0)

``phi`` is an empty (0,) tensor unless method is 2 (gradvac).

Example::

    >>> import torch
    >>> from gradharmony.kernels.ext import load_ops
    >>> load_ops()                                          # doctest: +SKIP
    >>> M, cos, w, phi = torch.ops.gradharmony.solve(torch.randn(4, 2, 10), 1, None, None)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shlex
import shutil
import threading
from typing import Optional

import torch
from torch import Tensor

from . import build_flags
from .spec import REDUCTION_IDS, acc_dtype

__all__ = ["load_ops", "ops_source", "ops_path", "source_dir", "has_kernels", "REDUCTION_IDS"]

_OP_NAMES = ("gram", "combine", "solve", "fused")

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

    def solve_outputs(G: Tensor, method: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, K, _ = G.shape
        a = acc_dtype(G.dtype)
        phi = G.new_empty((B, K, K) if method == 2 else (0,), dtype=a)
        return (G.new_empty((B, K, K), dtype=a), G.new_empty((B, K, K), dtype=a),
                G.new_empty((B, K), dtype=a), phi)

    @torch.library.register_fake("gradharmony::gram")
    def _gram_fake(G):
        B, K, _ = G.shape
        return G.new_empty((B, K, K), dtype=acc_dtype(G.dtype))

    @torch.library.register_fake("gradharmony::combine")
    def _combine_fake(G, w, reduction):
        B, K, D = G.shape
        return G.new_empty((B, D) if reduction == 0 else (D,))

    @torch.library.register_fake("gradharmony::solve")
    def _solve_fake(G, method, order, target):
        return solve_outputs(G, method)

    @torch.library.register_fake("gradharmony::fused")
    def _fused_fake(G, method, order, target, reduction):
        B, K, D = G.shape
        out = G.new_empty((B, D) if reduction == 0 else (D,))
        return (out, *solve_outputs(G, method))


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
        kwargs["extra_cuda_cflags"] = list(build_flags.NVCC_FLAGS)
    ce.load(
        name=name,
        sources=sources,
        extra_cflags=list(build_flags.CXX_FLAGS),
        extra_ldflags=list(build_flags.LD_FLAGS),
        extra_include_paths=[src],
        is_python_module=False,
        verbose=os.environ.get("GRADHARMONY_VERBOSE_BUILD", "") == "1",
        **kwargs,
    )
    _state["path"] = next(
        (p for p in torch.ops.loaded_libraries if os.path.basename(p).startswith(name)), None
    )
    return "jit" + ("+cuda" if with_cuda else "")


def _import_prebuilt() -> str:
    """Import ``gradharmony._C`` (registers the ops); returns its path.

    Only a module next to this package's sources counts: an editable install of another
    checkout can make ``gradharmony._C`` resolve to that checkout's build, whose ops would
    not match these sources (and, once loaded, would block the JIT build of these).
    """
    import importlib
    import importlib.util

    spec = importlib.util.find_spec("gradharmony._C")
    if spec is None or spec.origin is None:
        raise ImportError("no module named 'gradharmony._C'")
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.dirname(os.path.abspath(spec.origin)) != pkg:
        raise ImportError(f"gradharmony._C at {spec.origin} belongs to another source tree than {pkg}")
    return importlib.import_module("gradharmony._C").__file__


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
            _state["path"] = _import_prebuilt()
            _state["source"] = "prebuilt"
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


def has_kernels(dispatch_key: str) -> bool:
    """True when the loaded ops have kernels for ``dispatch_key`` ("CPU", "CUDA")."""
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"gradharmony::{op}", dispatch_key)
        for op in _OP_NAMES
    )
