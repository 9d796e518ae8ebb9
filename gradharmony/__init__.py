"""gradharmony: per-sample gradient harmonization for multi-loss training.

Layers (each depends only on the ones before it):
kernels (C++/CUDA/Triton) -> engine (one op, backends) -> rules (Gram -> coefficients,
curriculum) -> api (functional op, branch op, optimizer wrapper) -> vatt (reference trainer).
"""

from .api import (
    ConflictStats,
    HarmonizedOptimizer,
    HarmonizeResult,
    Harmonizer,
    conflict_stats,
    harmonize,
)
from .engine import NonFiniteGradientError, available_backends
from .ghost import ParameterHarmonizer
from .rules import (
    MGDA,
    CAGrad,
    ConflictCurriculum,
    GradVac,
    PCGrad,
    Rule,
    Sum,
    UPGrad,
    conflict_score,
    get_rule,
)

__version__ = "0.1.0"

__all__ = [
    "harmonize", "HarmonizeResult", "Harmonizer", "HarmonizedOptimizer",
    "ConflictCurriculum", "ConflictStats", "conflict_stats", "conflict_score",
    "Rule", "Sum", "PCGrad", "GradVac", "CAGrad", "MGDA", "UPGrad", "get_rule",
    "available_backends", "NonFiniteGradientError", "__version__",
    "ParameterHarmonizer",
]
