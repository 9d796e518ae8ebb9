"""The rule registry: rule names -> classes, and :func:`get_rule`.

Adding a rule is one new module in this package (a :class:`~gradharmony.rules.base.Rule`
subclass with a ``name``) and its line in :data:`RULES` below.
"""

from __future__ import annotations

from typing import Any, Union

from ..engine import NONFINITE_POLICIES
from .base import Rule
from .cagrad import CAGrad
from .gradvac import GradVac
from .mgda import MGDA
from .pcgrad import PCGrad
from .sum import Sum
from .upgrad import UPGrad

__all__ = ["RULES", "RULE_NAMES", "NONFINITE_POLICIES", "get_rule"]

RULES: dict[str, type[Rule]] = {
    rule.name: rule for rule in (Sum, PCGrad, GradVac, CAGrad, MGDA, UPGrad)
}

#: The rule names, in registry order (what a config's ``method`` may say).
RULE_NAMES: tuple[str, ...] = tuple(RULES)


def get_rule(method: Union[str, Rule], **kwargs: Any) -> Rule:
    """A rule from its name (``kwargs`` go to its constructor) or a rule instance."""
    if isinstance(method, Rule):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} given with a rule instance {method!r}")
        return method
    if not isinstance(method, str) or method not in RULES:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(RULES)} or a Rule")
    try:
        return RULES[method](**kwargs)
    except TypeError as exc:
        raise TypeError(f"bad options for method {method!r}: {exc}") from None
