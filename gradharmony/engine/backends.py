"""Backends of the harmonization engine and the dispatch between them.

A backend implements four ops on per-sample gradients ``G: (B, K, D)``
(contiguous, floating):

- ``gram(G) -> M (B, K, K)`` in the accumulation dtype
  (:func:`gradharmony.kernels.spec.acc_dtype`);
- ``combine(G, w, reduction) -> out``: ``out_b = w_b^T G_b`` (reduction "none", (B, D))
  or its sum over b ("sum", (D,)), in G's dtype;
- ``solve(G, method, order, target) -> SolveOutput(gram, cos, weights, phi)``: gram ->
  per-sample solve (method 0 = sum, 1 = pcgrad, 2 = gradvac), no combine, with exactly the
  semantics of :func:`gradharmony.engine.reference.gram_solve`; K <= :data:`FUSED_MAX_K`;
- ``fused(G, method, order, target, reduction) -> FusedOutput(out, gram, cos, weights,
  phi)``: solve, then combine (:func:`gradharmony.engine.reference.fused`);
  K <= :data:`FUSED_MAX_K`.

``torch`` (the pure-PyTorch reference) is always available. Compiled backends
(``cpp`` on CPU, ``cuda`` and ``triton`` on CUDA GPUs; adapters in
:mod:`.backend_ext` and :mod:`.backend_triton` over the raw ops of
:mod:`gradharmony.kernels`) are loaded here lazily; :func:`available_backends` reports which are live and why
the others are not. ``backend="auto"`` picks, per device, the first live backend in
:data:`PREFERENCE`; the environment variable ``GRADHARMONY_BACKEND`` forces one.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from torch import Tensor

from ..kernels.spec import FUSED_MAX_K
from . import reference
from .reference import FusedOutput, SolveOutput

__all__ = [
    "Backend",
    "TorchBackend",
    "SolveOutput",
    "FusedOutput",
    "PREFERENCE",
    "FUSED_MAX_K",
    "register_backend",
    "get_backend",
    "select_backend",
    "available_backends",
]

#: Per device type, the backend with the best measured speed first (bench/results/): on
#: CUDA the extension (timed and tested on an H100) ahead of Triton (tested under the
#: interpreter and compiled for sm_90, not yet timed on a GPU).
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpp", "torch"),
}


class Backend(Protocol):
    name: str

    def supports(self, G: Tensor) -> bool: ...

    def gram(self, G: Tensor) -> Tensor: ...

    def combine(self, G: Tensor, w: Tensor, reduction: str) -> Tensor: ...

    def solve(
        self, G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor]
    ) -> SolveOutput: ...

    def fused(
        self,
        G: Tensor,
        method: int,
        order: Optional[Tensor],
        target: Optional[Tensor],
        reduction: str,
    ) -> FusedOutput: ...


class TorchBackend:
    """The pure-PyTorch reference; runs on every device and dtype."""

    name = "torch"

    def supports(self, G: Tensor) -> bool:
        return True

    def gram(self, G: Tensor) -> Tensor:
        return reference.gram(G)

    def combine(self, G: Tensor, w: Tensor, reduction: str) -> Tensor:
        return reference.combine(G, w, reduction)

    def solve(self, G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor]) -> SolveOutput:
        return reference.gram_solve(G, method, order, target)

    def fused(
        self, G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor], reduction: str
    ) -> FusedOutput:
        return reference.fused(G, method, order, target, reduction)


@dataclass
class _Entry:
    loader: Callable[[], Backend]
    backend: Optional[Backend] = None
    error: Optional[str] = None
    tried: bool = False


def _load_cpp() -> Backend:
    from .backend_ext import CppBackend

    return CppBackend()


def _load_cuda() -> Backend:
    from .backend_ext import CudaBackend

    return CudaBackend()


def _load_triton() -> Backend:
    from .backend_triton import TritonBackend

    return TritonBackend()


_REGISTRY: dict[str, _Entry] = {
    # the reference needs no load: live from the start (no lock to take under torch.compile)
    "torch": _Entry(loader=TorchBackend, backend=TorchBackend(), tried=True),
    "cpp": _Entry(loader=_load_cpp),
    "cuda": _Entry(loader=_load_cuda),
    "triton": _Entry(loader=_load_triton),
}
_WARNED: set[str] = set()
# One lock for every lazy load: a compiled backend builds or loads its extension on first
# use; a second thread must wait for that load, not see a half-done entry and mark the
# backend unavailable.
_LOAD_LOCK = threading.RLock()


def register_backend(name: str, loader: Callable[[], Backend]) -> None:
    """Register a lazily loaded backend. ``loader`` raises if the backend cannot run."""
    _REGISTRY[name] = _Entry(loader=loader)


def _load(name: str) -> Optional[Backend]:
    entry = _REGISTRY.get(name)
    if entry is None:
        return None
    if entry.tried:  # set only after the load finished (under the lock)
        return entry.backend
    with _LOAD_LOCK:
        if not entry.tried:
            try:
                entry.backend = entry.loader()
            except Exception as exc:  # a missing toolchain is not an error of the caller
                entry.error = f"{type(exc).__name__}: {exc}"
            entry.tried = True
    return entry.backend


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises ``RuntimeError`` saying why it is not live."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_REGISTRY)}")
    be = _load(name)
    if be is None:
        raise RuntimeError(f"backend {name!r} is not available: {_REGISTRY[name].error}")
    return be


def available_backends() -> dict[str, str]:
    """Map every known backend to ``"available"`` or the reason it is not."""
    out = {}
    for name in _REGISTRY:
        be = _load(name)
        out[name] = "available" if be is not None else f"unavailable ({_REGISTRY[name].error})"
    return out


def _why_not(be: Backend, G: Tensor) -> str:
    """What about G (B, K, D) a backend that does not support it rejects: K, dtype or device."""
    what = f"per-sample gradients of shape {tuple(G.shape)} ({G.dtype} on {G.device})"
    if G.dim() == 3 and G.shape[1] > FUSED_MAX_K and be.supports(G[:, :FUSED_MAX_K]):
        return f"{what}: K={G.shape[1]} losses, more than its limit of {FUSED_MAX_K}"
    return f"{what}: it does not run on {G.dtype} on {G.device.type}"


def select_backend(backend: str, G: Tensor) -> Backend:
    """Resolve ``backend`` ("auto" or a name) for the tensor ``G``.

    ``GRADHARMONY_BACKEND`` overrides "auto". A forced backend that cannot handle G's
    device raises ``ValueError``; under "auto", a missing compiled backend falls back to
    the next one, warning once with the reason.
    """
    source = ""
    if backend == "auto":
        backend = os.environ.get("GRADHARMONY_BACKEND", "auto") or "auto"
        source = " (set by the environment variable GRADHARMONY_BACKEND)"
    if backend != "auto":
        try:
            be = get_backend(backend)
        except (ValueError, RuntimeError) as e:
            if not source:
                raise
            raise type(e)(f"{e}{source}") from None
        if not be.supports(G):
            raise ValueError(f"backend {backend!r}{source} cannot take {_why_not(be, G)}")
        return be
    missing = []  # (name, reason) of preferred backends that failed to load
    chosen: Optional[Backend] = None
    for name in PREFERENCE.get(G.device.type, ("torch",)):
        if name not in _REGISTRY:
            continue
        be = _load(name)
        if be is None:
            missing.append((name, _REGISTRY[name].error))
            continue
        if be.supports(G):
            chosen = be
            break
    if chosen is None:
        chosen = _load("torch")
    if missing and G.device.type not in _WARNED:  # one warning per device type
        _WARNED.add(G.device.type)
        why = "; ".join(f"{n!r}: {e}" for n, e in missing)
        warnings.warn(
            f"gradharmony: using backend {chosen.name!r} on {G.device.type}, faster ones are "
            f"unavailable ({why})",
            RuntimeWarning,
            stacklevel=3,
        )
    return chosen  # type: ignore[return-value]
