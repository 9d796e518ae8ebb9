"""GradVac: gradient vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 2), per sample.

For each loss i and each other loss j (visit list ``j != i``), with ``phi = cos(g'_i, g_j)``
and the EMA target ``t = phi_hat[i, j]``: if ``phi < t``,
``g'_i += |g'_i| (t sqrt(1-phi^2) - phi sqrt(1-t^2)) / (|g_j| sqrt(1-t^2)) g_j``; the output
is ``sum_i g'_i`` (fused kernel method 2; Gram form in
:func:`gradharmony.engine.reference.gradvac_weights`). After each call
``phi_hat <- (1 - beta) phi_hat + beta mean_b phi_b`` over the samples that took part.

Conventions (docs/RULES.md): sum scale. Default ``beta = 0.01`` (the paper's value);
torchjd's ``GradVacWeighting`` and LibMTL's ``GradVac`` default to 0.5. Scope: the whole
gradient vector of a sample (the paper and LibMTL can also work per layer), with the EMA of
the batch mean of the sample cosines; with B = 1 and ``order="fixed"`` one call is torchjd's
``GradVacWeighting`` with ``eps = 0``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .base import OrderedRule, check_float

__all__ = ["GradVac"]


class GradVac(OrderedRule):
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
        self.beta = check_float("beta", beta, 0.0, 1.0)
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
