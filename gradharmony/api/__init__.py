"""Public API layer: functional op, autograd branch op, optimizer wrapper, statistics."""

from . import pipeline
from .branch import Harmonizer
from .functional import HarmonizeResult, as_per_sample_grads, harmonize
from .optimizer import HarmonizedOptimizer
from .stats import ConflictStats, conflict_stats

__all__ = [
    "harmonize", "HarmonizeResult", "as_per_sample_grads", "Harmonizer",
    "HarmonizedOptimizer", "ConflictStats", "conflict_stats", "pipeline",
]
