"""Sum: no surgery, ``w = 1`` (the plain summed gradient ``sum_k g_k``).

Conventions: the scale every other rule here is expressed in (torchjd's ``Sum`` is the same;
its ``Mean`` is this divided by K).
"""

from __future__ import annotations

from .base import Rule

__all__ = ["Sum"]


class Sum(Rule):
    """No surgery: the plain sum of the K gradients (``w = 1``; fused kernel method 0)."""

    name = "sum"
    method_id = 0
