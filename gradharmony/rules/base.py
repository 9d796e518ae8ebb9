"""The rule interface shared by every harmonization rule, and the option checks.

A rule maps each sample's Gram matrix ``M_b = G_b G_b^T`` (K x K) to weights ``w_b`` (K,);
the harmonized gradient of sample b is ``w_b^T G_b``. Every rule here returns weights on
the scale of a *sum* of the K gradients (:class:`~gradharmony.rules.sum.Sum` gives
``w = 1``): docs/RULES.md sets them side by side with the peers' conventions.

Rules with a fused kernel (sum, pcgrad, gradvac) set ``method_id``; the others override
:meth:`Rule.solve`, which runs in PyTorch between the Gram and combine passes.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ..engine import reference

__all__ = ["Rule", "OrderedRule", "check_float", "check_max_iter", "solve_float64"]


def check_float(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` as a finite float in [lo, hi], else ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_max_iter(value: Any) -> Optional[int]:
    """``None`` (automatic) or a positive int: the cap on a solver's active-set steps."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_iter must be None or a positive int, got {value!r}")
    return value


def solve_float64(M: Tensor) -> Tensor:
    """The Gram matrices in float64 (the solves are B*K*K numbers: cheap), scaled by their
    mean diagonal so that every tolerance is relative (an all-zero sample stays zero)."""
    M = M.to(torch.float64)
    scale = M.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    return M / scale[:, None, None]


class Rule:
    """Base of all rules. Subclasses set ``name`` and ``method_id`` or override ``solve``.

    The engine and API call, per step: ``order(B, K, device)`` and ``target(K, device)``
    (kernel rules), ``solve(M) -> (w, phi)`` (others), then ``update(cos, phi, mask)``;
    ``state_dict`` / ``load_state_dict`` carry the state through checkpoints.
    """

    name: str = "rule"
    method_id: Optional[int] = None

    def order(self, B: int, K: int, device: torch.device) -> Optional[Tensor]:
        """Visiting order (B, K, K) for the sequential rules, or ``None``."""
        return None

    def target(self, K: int, device: torch.device) -> Optional[Tensor]:
        """GradVac targets (K, K), or ``None``."""
        return None

    def solve(self, M: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Solve ``M (B, K, K) -> (w (B, K) in M's dtype, phi (B, K, K) or None)``."""
        order = self.order(M.shape[0], M.shape[1], M.device)
        target = self.target(M.shape[1], M.device)
        _, w, phi = reference.solve(M, self.method_id, order, target)  # type: ignore[arg-type]
        return w, phi

    def update(self, cos: Tensor, phi: Optional[Tensor], sample_mask: Optional[Tensor]) -> None:
        """Update state after a call (``sample_mask``: samples that took part)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class OrderedRule(Rule):
    """A sequential rule that visits the other losses in a fixed or random order.

    Args:
        order: "random" (a fresh random visiting order per sample and loss) or "fixed"
            (0..K-1). Irrelevant for K = 2.
        seed: seeds the order generator (its state is saved in ``state_dict``).
    """

    def __init__(self, order: str = "random", seed: Optional[int] = None) -> None:
        if order not in ("random", "fixed"):
            raise ValueError(f"order must be 'random' or 'fixed', got {order!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        self.order_mode = order
        self.seed = seed
        self._gen: Optional[torch.Generator] = None
        self._gen_state: Optional[Tensor] = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device.type != device.type:
            self._gen = torch.Generator(device=device)
            if self.seed is not None:
                self._gen.manual_seed(self.seed)
            else:
                self._gen.seed()
            if self._gen_state is not None:
                self._gen.set_state(self._gen_state)
                self._gen_state = None
        return self._gen

    def order(self, B: int, K: int, device: torch.device) -> Optional[Tensor]:
        if self.order_mode == "fixed" or K <= 2:  # with K = 2 every order is the same
            return None
        g = self._generator(device)
        return torch.rand(B, K, K, generator=g, device=device).argsort(-1)

    def state_dict(self) -> dict[str, Any]:
        st: dict[str, Any] = {"order": self.order_mode, "seed": self.seed}
        if self._gen is not None:
            st["generator"] = self._gen.get_state()
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order_mode = state.get("order", self.order_mode)
        self.seed = state.get("seed", self.seed)
        if "generator" in state:
            if self._gen is not None:
                self._gen.set_state(state["generator"])
            else:
                self._gen_state = state["generator"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order_mode!r}, seed={self.seed})"
