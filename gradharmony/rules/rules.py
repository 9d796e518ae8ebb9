"""Harmonization rules: Gram matrices -> combination coefficients.

Every rule maps the per-sample Gram matrix ``M_b = G_b G_b^T`` (K x K) to weights
``w_b`` (K,) so that the harmonized gradient of sample b is ``w_b^T G_b``. Rules with a
fused kernel (sum, pcgrad, gradvac) expose ``method_id``; the others run their solve in
PyTorch between the Gram and combine passes. The math lives in
:mod:`gradharmony.engine.reference`; a rule adds options and state (visiting orders,
the GradVac EMA).

=========  =================================================================  ==========
name       update (per sample, gradients g_1..g_K)                            source
=========  =================================================================  ==========
sum        sum_k g_k (no surgery)                                             --
pcgrad     g'_i = g_i projected off each g_j with g'_i.g_j < 0; sum_i g'_i     Yu+ 2020
gradvac    g'_i pulled towards EMA target cosine phi_ij with g_j; sum_i g'_i  Wang+ 2021
cagrad     g0 + sqrt(c^2 |g0|^2)/|g_w| g_w, g_w worst-case simplex mix (x K)  Liu+ 2021
mgda       min-norm point of conv{g_k} (x K)                                  Sener+ 2018
=========  =================================================================  ==========
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..engine import reference

__all__ = ["Rule", "Sum", "PCGrad", "GradVac", "CAGrad", "MGDA", "get_rule", "RULES"]


class Rule:
    """Base of all rules. Subclasses set ``name`` and ``method_id`` or override ``solve``."""

    name: str = "rule"
    method_id: Optional[int] = None

    def order(self, B: int, K: int, device: torch.device) -> Optional[Tensor]:
        """Visiting order (B, K, K) for the sequential rules, or ``None``."""
        return None

    def target(self, K: int, device: torch.device) -> Optional[Tensor]:
        """GradVac targets (K, K), or ``None``."""
        return None

    def solve(self, M: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Reference solve ``M (B, K, K) -> (w (B, K), phi or None)``."""
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


class Sum(Rule):
    """No surgery: the plain sum of the K gradients (``w = 1``)."""

    name = "sum"
    method_id = 0


class _Ordered(Rule):
    """A sequential rule that visits the other losses in a fixed or random order."""

    def __init__(self, order: str = "random", seed: Optional[int] = None) -> None:
        if order not in ("random", "fixed"):
            raise ValueError(f"order must be 'random' or 'fixed', got {order!r}")
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


class PCGrad(_Ordered):
    """PCGrad per sample (Yu et al., "Gradient Surgery for Multi-Task Learning", 2020).

    Args:
        order: "random" (a fresh random visiting order per sample and loss, as in the
            paper's Algorithm 1) or "fixed" (0..K-1). Irrelevant for K = 2.
        seed: seeds the order generator (the state is saved in ``state_dict``).
    """

    name = "pcgrad"
    method_id = 1


class GradVac(_Ordered):
    """GradVac per sample (Wang et al., "Gradient Vaccine", ICLR 2021).

    Keeps an EMA target cosine ``phi_hat[i, j]`` per loss pair; a sample whose cosine
    ``phi`` with ``g_j`` is below it gets ``g_j`` added to ``g'_i`` until ``phi = phi_hat``.
    After each call ``phi_hat <- (1 - beta) phi_hat + beta * mean_b phi_b`` over the
    samples that took part (with B = 1 this is torchjd's ``GradVacWeighting``).

    Args:
        beta: EMA rate (the paper uses 1e-2).
        order, seed: as in :class:`PCGrad`.
    """

    name = "gradvac"
    method_id = 2

    def __init__(self, beta: float = 0.01, order: str = "random", seed: Optional[int] = None):
        super().__init__(order, seed)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        self.beta = beta
        self.phi_hat: Optional[Tensor] = None

    def target(self, K: int, device: torch.device) -> Tensor:
        if self.phi_hat is None or self.phi_hat.shape != (K, K):
            if self.phi_hat is not None:
                raise ValueError(
                    f"GradVac state is for K={self.phi_hat.shape[0]} losses but got K={K}; "
                    "call reset() to start over"
                )
            self.phi_hat = torch.zeros(K, K, dtype=torch.float64, device=device)
        if self.phi_hat.device != device:  # the state follows the gradients' device
            self.phi_hat = self.phi_hat.to(device)
        return self.phi_hat

    def update(self, cos: Tensor, phi: Optional[Tensor], sample_mask: Optional[Tensor]) -> None:
        """EMA step on the device of ``phi``, without a host sync (masked mean)."""
        if phi is None or phi.shape[0] == 0:
            return
        assert self.phi_hat is not None
        phi = phi.to(torch.float64)
        if sample_mask is None:
            mask = torch.ones(phi.shape[0], dtype=torch.float64, device=phi.device)
        else:
            mask = sample_mask.to(device=phi.device, dtype=torch.float64)
        count = mask.sum()
        mean_phi = (phi * mask[:, None, None]).sum(0) / count.clamp_min(1)
        hat = self.phi_hat.to(phi.device)
        eye = torch.eye(hat.shape[0], dtype=torch.bool, device=phi.device)
        new = (1 - self.beta) * hat + self.beta * mean_phi
        # no sample took part: keep the target as it was
        self.phi_hat = torch.where(eye | (count == 0), hat, new)

    def reset(self) -> None:
        self.phi_hat = None

    def state_dict(self) -> dict[str, Any]:
        st = super().state_dict()
        st.update(beta=self.beta, phi_hat=None if self.phi_hat is None else self.phi_hat.cpu())
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.beta = state.get("beta", self.beta)
        self.phi_hat = state.get("phi_hat")

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, order={self.order_mode!r}, seed={self.seed})"


class CAGrad(Rule):
    """CAGrad per sample (Liu et al., "Conflict-Averse Gradient Descent", NeurIPS 2021).

    Args:
        c: radius of the conflict-averse ball around the mean gradient (paper: 0.4).
        iters: projected-gradient iterations of the simplex solve.
    """

    name = "cagrad"

    def __init__(self, c: float = 0.4, iters: int = 100) -> None:
        if c < 0:
            raise ValueError(f"c must be >= 0, got {c!r}")
        self.c, self.iters = c, iters

    def solve(self, M: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return reference.cagrad_weights(M, self.c, self.iters), None

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c})"


class MGDA(Rule):
    """MGDA per sample (Sener & Koltun, NeurIPS 2018): min-norm convex combination, x K."""

    name = "mgda"

    def __init__(self, iters: int = 50) -> None:
        self.iters = iters

    def solve(self, M: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return reference.mgda_weights(M, self.iters), None


RULES: dict[str, type[Rule]] = {
    "sum": Sum,
    "pcgrad": PCGrad,
    "gradvac": GradVac,
    "cagrad": CAGrad,
    "mgda": MGDA,
}


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
