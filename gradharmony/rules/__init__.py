"""Rules layer: Gram -> coefficients (sum, pcgrad, gradvac, cagrad, mgda) and the curriculum."""

from .curriculum import ConflictCurriculum, conflict_score
from .rules import MGDA, RULES, CAGrad, GradVac, PCGrad, Rule, Sum, get_rule

__all__ = [
    "Rule", "Sum", "PCGrad", "GradVac", "CAGrad", "MGDA", "RULES", "get_rule",
    "ConflictCurriculum", "conflict_score",
]
