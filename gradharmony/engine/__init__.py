"""Engine layer: the harmonization op over backends (reference, C++, CUDA, Triton)."""

from . import reference
from .backends import available_backends, get_backend, select_backend
from .core import NONFINITE_POLICIES, EngineOutput, NonFiniteGradientError, run

__all__ = [
    "reference",
    "available_backends",
    "get_backend",
    "select_backend",
    "run",
    "EngineOutput",
    "NonFiniteGradientError",
    "NONFINITE_POLICIES",
]
