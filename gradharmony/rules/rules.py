"""Former home of every rule (one module per rule now); kept so old imports keep working."""

from .base import OrderedRule as _Ordered  # noqa: F401
from .base import Rule
from .cagrad import CAGrad
from .gradvac import GradVac
from .mgda import MGDA
from .pcgrad import PCGrad
from .registry import RULES, get_rule
from .sum import Sum
from .upgrad import UPGrad

__all__ = ["Rule", "Sum", "PCGrad", "GradVac", "CAGrad", "MGDA", "UPGrad", "get_rule", "RULES"]
