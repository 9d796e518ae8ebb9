"""The reference engine against float64 oracles written independently of it."""

from __future__ import annotations

import pytest
import torch

import gradharmony as gh
import _oracles as O
from _asserts import close

F64 = torch.float64
#: (dtype, rtol relative to the largest oracle entry)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _grads(B, K, D, gen, conflict=0.7):
    G = torch.randn(B, K, D, dtype=F64, generator=gen)
    G[:, 1:] -= conflict * G[:, :1]  # many conflicting pairs
    scales = torch.exp(torch.randn(B, K, 1, dtype=F64, generator=gen))  # unequal norms
    return G * scales


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [2, 3, 4, 7])
def test_pcgrad_fixed_order_matches_oracle(K, dtype, gen):
    G = _grads(6, K, 29, gen)
    res = gh.harmonize(G.to(dtype), "pcgrad", order="fixed", backend="torch")
    ref = torch.stack([O.pcgrad_sample(G[b]) for b in range(6)])
    close(res.grad, ref, TOL[dtype], msg=f"pcgrad K={K} {dtype}")
    # the float32 input itself, not the float64 one, is what the engine saw
    ref32 = torch.stack([O.pcgrad_sample(G[b].to(dtype)) for b in range(6)])
    close(res.grad, ref32, TOL[dtype], msg=f"pcgrad K={K} {dtype} (oracle on rounded input)")


def test_pcgrad_random_order_matches_oracle_with_that_order(gen, monkeypatch):
    """order='random': the engine's own visiting order, replayed in the oracle, gives its output."""
    from gradharmony.engine import reference

    seen = {}
    real = reference.pcgrad_weights

    def spy(M, order=None):
        seen["order"] = order
        return real(M, order)

    monkeypatch.setattr(reference, "pcgrad_weights", spy)
    G = _grads(5, 4, 19, gen)
    res = gh.harmonize(G, "pcgrad", order="random", seed=123, backend="torch")
    order = seen["order"]
    assert order is not None and order.shape == (5, 4, 4)
    ref = torch.stack([O.pcgrad_sample(G[b], order[b].tolist()) for b in range(5)])
    close(res.grad, ref, 1e-10, msg="pcgrad random order")
    for b in range(5):  # each row is a permutation
        for i in range(4):
            assert sorted(order[b, i].tolist()) == [0, 1, 2, 3]


def test_pcgrad_order_matters_and_seed_reproduces(gen):
    """K = 3 with order='random': different samples get different orders; a seed reproduces them."""
    G = _grads(64, 3, 5, gen, conflict=1.0)
    a = gh.harmonize(G, "pcgrad", order="random", seed=7, backend="torch").grad
    b = gh.harmonize(G, "pcgrad", order="random", seed=7, backend="torch").grad
    f = gh.harmonize(G, "pcgrad", order="fixed", backend="torch").grad
    assert torch.equal(a, b)
    assert not torch.allclose(a, f), "random order never differed from the fixed order on 64 samples"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [2, 3, 5])
def test_gradvac_matches_oracle_over_calls(K, dtype, gen):
    """Several consecutive calls: per-sample surgery against the EMA target, EMA = batch mean of phi."""
    beta = 0.3
    rule = gh.GradVac(beta=beta, order="fixed")
    target = torch.zeros(K, K, dtype=F64)
    for step in range(4):
        G = _grads(5, K, 23, gen, conflict=0.3 * step)
        Gd = G.to(dtype)
        res = gh.harmonize(Gd, rule, backend="torch")
        outs, phis = zip(*[O.gradvac_sample(Gd[b], target) for b in range(5)])
        close(res.grad, torch.stack(outs), 10 * TOL[dtype], msg=f"gradvac K={K} {dtype} step {step}")
        mean_phi = torch.stack(phis).mean(0)
        new = (1 - beta) * target + beta * mean_phi
        new.fill_diagonal_(0)
        target = new
        close(rule.phi_hat, target, 10 * TOL[dtype], scale=1.0, msg=f"gradvac EMA after step {step}")


def test_gradvac_first_call_equals_pcgrad(gen):
    """With the EMA at 0 GradVac's correction is exactly the PCGrad projection."""
    G = _grads(6, 3, 17, gen)
    a = gh.harmonize(G, gh.GradVac(order="fixed"), backend="torch").grad
    b = gh.harmonize(G, "pcgrad", order="fixed", backend="torch").grad
    close(a, b, 1e-10, msg="gradvac(phi_hat=0) vs pcgrad")


def test_gradvac_reaches_target_cosine(gen):
    """K = 2, one visit: after the correction cos(g'_1, g_2) equals the target (paper's closed form)."""
    G = _grads(8, 2, 31, gen, conflict=0.9)
    rule = gh.GradVac(beta=0.0, order="fixed")
    rule.phi_hat = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=F64)
    res = gh.harmonize(G, rule, backend="torch")
    w = res.weights
    g1p = G[:, 0] + (w[:, 1] - 1).unsqueeze(-1) * G[:, 1]
    cos0 = torch.nn.functional.cosine_similarity(G[:, 0], G[:, 1], dim=-1)
    cos1 = torch.nn.functional.cosine_similarity(g1p, G[:, 1], dim=-1)
    expect = torch.where(cos0 < 0.5, torch.full_like(cos0, 0.5), cos0)
    close(cos1, expect, 1e-9, scale=1.0, msg="cos(g'_1, g_2) after GradVac")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mgda_k2_closed_form(dtype, gen):
    G = _grads(10, 2, 37, gen)
    G[0, 1] = 2 * G[0, 0]  # aligned: min-norm point is the shorter one
    G[1, 1] = G[1, 0]  # identical
    res = gh.harmonize(G.to(dtype), "mgda", backend="torch")
    ref = torch.stack([2 * O.mgda_k2_closed_form(G[b].to(dtype)) for b in range(10)])
    close(res.grad, ref, 10 * TOL[dtype], msg=f"mgda K=2 {dtype}")
    w = res.weights.to(F64)
    assert (w >= -1e-12).all() and torch.allclose(w.sum(-1), torch.full((10,), 2.0, dtype=F64))


def _mgda_gaps(G):
    B, K, _ = G.shape
    res = gh.harmonize(G, "mgda", backend="torch")
    w = res.weights
    assert (w >= -1e-12).all(), f"mgda weights leave the simplex: {w}"
    torch.testing.assert_close(w.sum(-1), torch.full((B,), float(K), dtype=F64))
    d = res.grad / K
    d_star = torch.stack([O.min_norm_point(G[b]) for b in range(B)])
    scale = G.norm(dim=-1).amax(-1)
    gap = (d.norm(dim=-1) ** 2 - d_star.norm(dim=-1) ** 2) / scale**2
    assert (gap >= -1e-9).all(), f"below the true minimum?? {gap.min()}"
    return gap, (d - d_star).norm(dim=-1) / scale


@pytest.mark.parametrize("K", [3, 4, 5, 8])
def test_mgda_min_norm_exact_qp(K, gen):
    """K > 2: the output is K x the min-norm point (exact active-set QP oracle).

    A loose bound on many shapes; test_mgda_min_norm_accurate below holds the tight one.
    """
    G = _grads(16, K, 13, gen)
    gap, derr = _mgda_gaps(G)
    assert gap.max() <= 1e-2, f"|d|^2 - |d*|^2 up to {float(gap.max()):.3e} x max|g_k|^2"
    assert derr.max() <= 0.1, f"|d - d*| up to {float(derr.max()):.3e} x max|g_k|"


def test_mgda_min_norm_accurate():
    gen = torch.Generator().manual_seed(0)  # deterministic
    for K in (3, 5, 8):
        G = _grads(200, K, 13, gen)
        gap, derr = _mgda_gaps(G)
        assert gap.max() <= 1e-6 and derr.max() <= 1e-3, (K, float(gap.max()), float(derr.max()))


def test_mgda_kkt_k3_interior(gen):
    """An interior min-norm point: every g_k . d equals |d|^2 (KKT with all constraints inactive)."""
    e = torch.eye(3, dtype=F64)
    G = torch.stack([e[0], e[1], e[2]]).unsqueeze(0) * torch.tensor([1.0, 2.0, 3.0], dtype=F64)[None, :, None]
    res = gh.harmonize(G, "mgda", backend="torch")
    d = res.grad[0] / 3
    inv = 1 / torch.tensor([1.0, 4.0, 9.0], dtype=F64)
    expect = (inv / inv.sum()) @ G[0]
    close(d, expect, 1e-3, msg="mgda orthogonal K=3")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", [0.0, 0.4, 0.9])
def test_cagrad_k2_grid(c, dtype, gen):
    G = _grads(6, 2, 21, gen)
    res = gh.harmonize(G.to(dtype), "cagrad", c=c, backend="torch")
    for b in range(6):
        ref = O.cagrad_k2_grid(G[b].to(dtype), c)
        close(res.grad[b], ref, 2e-3, scale=float(G[b].norm(dim=-1).max()), msg=f"cagrad c={c} sample {b}")


def _cagrad_primal_gap(G, c, gen, n=20000):
    """(best sampled - achieved) of min_k g_k . d over the ball, relative to max|g_k| |g0|."""
    B, K, _ = G.shape
    res = gh.harmonize(G, "cagrad", c=c, backend="torch")
    gaps = []
    for b in range(B):
        g = G[b]
        g0 = g.mean(0)
        r = c * g0.norm()
        d = res.grad[b] / K
        assert (d - g0).norm() <= r * (1 + 1e-6), "CAGrad direction leaves the ball |d - g0| <= c |g0|"
        val = (g @ d).min()
        U = O.random_unit_in_span(g, n, gen)
        best = ((g0 + r * U) @ g.T).min(1).values.max()
        gaps.append(float(best - val) / float(g.norm(dim=-1).max() * g0.norm()))
    return torch.tensor(gaps)


@pytest.mark.parametrize("K", [2, 3])
def test_cagrad_primal_optimality(K, gen):
    """d = out/K maximizes min_k g_k . d over the ball |d - g0| <= c |g0| (sampled check).

    A loose bound (sampled check); test_cagrad_accurate below holds the tight one.
    """
    gaps = _cagrad_primal_gap(_grads(6, K, 15, gen), 0.5, gen)
    assert gaps.max() <= 2e-2, f"CAGrad primal value below the sampled optimum by {gaps.max():.3e} (relative)"


def test_cagrad_accurate():
    gen = torch.Generator().manual_seed(1541229393)  # deterministic
    gaps = _cagrad_primal_gap(_grads(64, 3, 15, gen), 0.5, gen, n=4000)
    assert gaps.max() <= 1e-4, float(gaps.max())


def test_cagrad_no_wrong_fixed_point():
    gen = torch.Generator().manual_seed(1)  # deterministic: holds such samples (e.g. 24, 137)
    G = _grads(500, 4, 4, gen)
    gaps = _cagrad_primal_gap(G, 0.5, gen, n=2000)
    assert gaps.max() <= 2e-2, f"{int((gaps > 2e-2).sum())} samples, max relative gap {float(gaps.max()):.3f}"


def test_cagrad_c0_is_sum(gen):
    G = _grads(5, 3, 11, gen)
    res = gh.harmonize(G, "cagrad", c=0.0, backend="torch")
    close(res.grad, G.sum(1), 1e-12, msg="cagrad c=0")


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_random_order_state_round_trip(method, gen):
    """The order generator's state is saved: a loaded rule continues with the same orders."""
    G = _grads(6, 4, 9, gen, conflict=1.0)
    rule = gh.get_rule(method, order="random", seed=int(torch.randint(1000, (1,), generator=gen)))
    gh.harmonize(G, rule, backend="torch")
    state = rule.state_dict()
    a = gh.harmonize(G, rule, backend="torch").grad
    b = gh.harmonize(G, rule, backend="torch").grad
    other = gh.get_rule(method, order="random")  # unseeded: only the state can make it agree
    other.load_state_dict(state)
    assert torch.equal(gh.harmonize(G, other, backend="torch").grad, a)
    assert torch.equal(gh.harmonize(G, other, backend="torch").grad, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K,D", [(3, 2), (4, 3), (5, 2), (3, 1)])
def test_mgda_origin_in_hull(K, D, dtype, gen):
    """More gradients than dimensions around the origin: the min-norm point is 0 (M_SS singular)."""
    g = torch.randn(K, D, dtype=F64, generator=gen)
    lam = torch.rand(K, dtype=F64, generator=gen) ** 3 + 0.01
    lam = lam / lam.sum()  # far from uniform: Frank-Wolfe from 1/K does not start at the answer
    g = g - lam @ g  # 0 = sum_k lam_k g_k: inside the hull
    G = g.unsqueeze(0)
    res = gh.harmonize(G.to(dtype), "mgda", backend="torch")
    scale = float(g.norm(dim=-1).max())
    close(res.grad[0], torch.zeros(D, dtype=F64), 1e-9 if dtype == F64 else 1e-5, scale=K * scale,
          msg=f"mgda K={K} D={D}: min-norm point should be 0")
    assert O.min_norm_point(g).norm() <= 1e-9 * scale


def test_gradvac_update_masked_mean_on_device():
    """The EMA moves by the mean over the samples that took part; none taking part leaves it."""
    rule = gh.GradVac(beta=0.5, order="fixed")
    target = rule.target(2, torch.device("cpu")).clone()
    phi = torch.tensor([[[0.0, 0.2], [0.4, 0.0]], [[0.0, 0.8], [-0.6, 0.0]]], dtype=F64)
    rule.update(None, phi, torch.tensor([False, False]))
    assert torch.equal(rule.phi_hat, target), "no sample took part, the target must not move"
    rule.update(None, phi, torch.tensor([False, True]))
    expect = torch.tensor([[0.0, 0.4], [-0.3, 0.0]], dtype=F64)
    torch.testing.assert_close(rule.phi_hat, expect)
    assert rule.state_dict()["phi_hat"].device.type == "cpu"
