"""Rules layer: Gram -> coefficients, one module per rule, and the curriculum.

=========  ==================================================================  ============
name       update (per sample, gradients g_1..g_K), sum scale                  source
=========  ==================================================================  ============
sum        sum_k g_k (no surgery)                                              --
pcgrad     g'_i = g_i projected off each g_j (j != i) with g'_i.g_j < 0        Yu+ 2020
gradvac    g'_i pulled towards EMA target cosine phi_ij with g_j               Wang+ 2021
cagrad     K (g0 + c|g0| g_w / |g_w|), g_w worst-case simplex mix              Liu+ 2021
mgda       K x the min-norm point of conv{g_k}                                 Sener+ 2018
upgrad     sum_i projection of g_i onto the dual cone {d: g_k.d >= 0}          Quinton+ 2024
=========  ==================================================================  ============

Conventions next to the peers' (torchjd, LibMTL, Pytorch-PCGrad, official CAGrad):
docs/RULES.md. The registry (:data:`RULES`, :func:`get_rule`) is in :mod:`.registry`.
"""

from .base import OrderedRule, Rule
from .cagrad import CAGrad
from .curriculum import ConflictCurriculum, conflict_score
from .gradvac import GradVac
from .mgda import MGDA
from .pcgrad import PCGrad
from .registry import NONFINITE_POLICIES, RULE_NAMES, RULES, get_rule
from .sum import Sum
from .upgrad import UPGrad

__all__ = [
    "Rule", "OrderedRule", "Sum", "PCGrad", "GradVac", "CAGrad", "MGDA", "UPGrad",
    "RULES", "RULE_NAMES", "NONFINITE_POLICIES", "get_rule",
    "ConflictCurriculum", "conflict_score",
]
