"""Cross-checks against torchjd's Gramian weightings, applied per sample."""

from __future__ import annotations

import pytest
import torch

torchjd_agg = pytest.importorskip("torchjd.aggregation")

import gradharmony as gh  # noqa: E402
from _asserts import close  # noqa: E402

F64 = torch.float64


def _grads(B, K, D, gen):
    G = torch.randn(B, K, D, dtype=F64, generator=gen)
    G[:, 1:] -= 0.6 * G[:, :1]
    return G * torch.exp(torch.randn(B, K, 1, dtype=F64, generator=gen))


@pytest.fixture
def fixed_randperm(monkeypatch):
    """torchjd shuffles with torch.randperm: make it the identity so it visits in fixed order."""
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: torch.arange(n))


def _per_sample(weighting, G):
    return torch.stack([weighting(G[b] @ G[b].T) for b in range(G.shape[0])])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pcgrad_k2_matches_torchjd(dtype, gen):
    G = _grads(12, 2, 31, gen).to(dtype)
    w_jd = _per_sample(torchjd_agg.PCGradWeighting(), G)
    res = gh.harmonize(G, "pcgrad", backend="torch")  # default random order: irrelevant at K = 2
    close(res.weights, w_jd, 1e-10 if dtype == F64 else 1e-4, scale=1.0, msg="weights vs torchjd PCGrad")
    close(res.grad, torch.einsum("bk,bkd->bd", w_jd, G), 1e-10 if dtype == F64 else 1e-4, msg="grad vs torchjd")


@pytest.mark.parametrize("K", [3, 4, 6])
def test_pcgrad_fixed_order_matches_torchjd(K, gen, fixed_randperm):
    G = _grads(8, K, 19, gen)
    w_jd = _per_sample(torchjd_agg.PCGradWeighting(), G)
    res = gh.harmonize(G, "pcgrad", order="fixed", backend="torch")
    close(res.weights, w_jd, 1e-10, scale=1.0, msg=f"weights vs torchjd PCGrad K={K}")


@pytest.mark.parametrize("K", [2, 3, 5])
@pytest.mark.parametrize("beta", [0.5, 0.05])
def test_gradvac_b1_tracks_torchjd_over_calls(K, beta, gen, fixed_randperm):
    """B = 1: GradVac(beta) in fixed order == torchjd GradVacWeighting(beta, eps=0), call after call."""
    jd = torchjd_agg.GradVacWeighting(beta=beta, eps=0.0)
    rule = gh.GradVac(beta=beta, order="fixed")
    for step in range(6):
        G = _grads(1, K, 17, gen)
        if step % 2:
            G[0, 1] = -G[0, 1] + 0.1 * G[0, 0]  # alternate strongly conflicting calls
        w_jd = jd(G[0] @ G[0].T)
        res = gh.harmonize(G, rule, backend="torch")
        close(res.weights[0], w_jd, 1e-9, scale=float(w_jd.abs().max()) + 1, msg=f"GradVac weights, call {step}")
        phi_jd = jd._phi_t.clone()
        phi_jd.fill_diagonal_(0)
        close(rule.phi_hat, phi_jd, 1e-9, scale=1.0, msg=f"GradVac EMA after call {step}")


def test_gradvac_batch_ema_is_mean_of_per_sample_phis(gen, fixed_randperm):
    """B > 1: the EMA moves by beta times the batch mean of the visit cosines (torchjd's per-sample phis)."""
    K, B, beta = 3, 5, 0.2
    rule = gh.GradVac(beta=beta, order="fixed")
    G = _grads(B, K, 11, gen)
    gh.harmonize(G, rule, backend="torch")  # first call: target 0, same for every sample
    phis = []
    for b in range(B):
        jd = torchjd_agg.GradVacWeighting(beta=1.0, eps=0.0)  # beta = 1: _phi_t = this sample's phi
        jd(G[b] @ G[b].T)
        phis.append(jd._phi_t.clone())
    expect = beta * torch.stack(phis).mean(0)
    expect.fill_diagonal_(0)
    close(rule.phi_hat, expect, 1e-10, scale=1.0, msg="EMA = beta * mean_b phi_b")
