"""The rules layer: exact MGDA / CAGrad / UPGrad for every K (KKT conditions), the inputs
that broke the former solvers, option checks, and docs/RULES.md's conventions table, row by
row against the peers' published formulas (torchjd through the package; LibMTL,
Pytorch-PCGrad and the official CAGrad code as small oracles written here)."""

from __future__ import annotations

import math

import pytest
import torch

import gradharmony as gh
from _asserts import close
from gradharmony.rules._qp import active_set_qp, kkt_residual

F64 = torch.float64
TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


def _grads(B, K, D, gen, conflict=0.7):
    G = torch.randn(B, K, D, dtype=F64, generator=gen)
    G[:, 1:] -= conflict * G[:, :1]
    return G * torch.exp(torch.randn(B, K, 1, dtype=F64, generator=gen))


def _hull_zero(K, D, gen):
    """One sample whose hull holds 0 (more gradients than dimensions, or built so)."""
    g = torch.randn(K, D, dtype=F64, generator=gen)
    lam = torch.rand(K, dtype=F64, generator=gen) + 0.05
    return (g - (lam / lam.sum()) @ g).unsqueeze(0)


# ---------------------------------------------------------------- the inputs

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cagrad_pareto_stationary_inputs(dtype):
    """0 in the hull, optimal value 0: the optimal d nearest g0 (projection onto the dual cone)."""
    G = torch.tensor([[[0.0, 1], [1, 1], [0, -2]], [[-1.0, 2], [1, 1], [-1, -1]]], dtype=dtype)
    res = gh.harmonize(G, "cagrad", c=0.4, backend="torch")
    close(res.grad, torch.tensor([[1.0, 0.0], [-1.5, 1.5]], dtype=F64), TOL[dtype], msg="cagrad stationary")
    assert res.weights.abs().max() < 10, f"weights blow up: {res.weights}"
    assert (torch.einsum("bkd,bd->bk", G.to(F64), res.grad.to(F64)) >= -1e-6).all(), "output conflicts"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mgda_k9_origin_in_hull(dtype):
    G = torch.tensor([[2, 3], [-3, 3], [1, 2], [3, -3], [1, 2], [-1, 2], [1, 3], [3, 3], [3, -2]], dtype=dtype)
    res = gh.harmonize(G[None], "mgda", backend="torch")
    close(res.grad[0], torch.zeros(2, dtype=F64), TOL[dtype], scale=9 * 4.3, msg="mgda K=9")


# ---------------------------------------------------------------- KKT, every K

def _mgda_kkt(G, w):
    """Min-norm KKT on the actual vectors: g_k . d >= |d|^2, equality on the support."""
    d = torch.einsum("bk,bkd->bd", w, G)
    gd = torch.einsum("bkd,bd->bk", G, d)
    dd = (d * d).sum(-1, keepdim=True)
    scale = (G * G).sum(-1).amax(-1, keepdim=True)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones_like(w[:, 0]))
    viol = torch.where(w > 1e-12, (gd - dd).abs(), (dd - gd).clamp_min(0)) / scale
    return viol.amax()


@pytest.mark.parametrize("K,D", [(3, 5), (9, 4), (12, 30), (16, 3)])
def test_mgda_kkt_every_k(K, D, gen):
    G = torch.cat([_grads(24, K, D, gen), _hull_zero(K, D, gen)])
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        res = gh.harmonize(G.to(dtype), "mgda", backend="torch")
        viol = _mgda_kkt(G, res.weights.to(F64) / K)
        assert viol <= tol, f"mgda KKT violated by {float(viol):.3e} (K={K}, {dtype})"


def _cagrad_check(G, out, c):
    """Primal feasibility, dual feasibility and zero duality gap of CAGrad at d = out / K."""
    B, K, _ = G.shape
    d = out / K
    g0 = G.mean(1)
    s = c * g0.norm(dim=-1)
    scale = (G.norm(dim=-1).amax(-1) * g0.norm(dim=-1)).clamp_min(1e-300)
    primal = torch.einsum("bkd,bd->bk", G, d).min(-1).values
    assert ((d - g0).norm(dim=-1) <= s * (1 + 1e-9) + 1e-12 * scale.sqrt()).all(), "d leaves the ball"
    # the best dual value (min over the simplex of g_w.g0 + s |g_w|) from the exact solver on the
    # vectors; a feasible d with primal value equal to some dual value is optimal
    M = G @ G.transpose(1, 2)
    w = gh.rules.cagrad.cagrad_weights(M, c)  # K (1/K + lam w*)
    lam_w = w / K - 1.0 / K
    lam = lam_w.sum(-1, keepdim=True)
    ws = torch.where(lam > 0, lam_w / lam.clamp_min(1e-300), torch.full_like(lam_w, 1.0 / K))
    gw = torch.einsum("bk,bkd->bd", ws, G)
    dual = (gw * g0).sum(-1) + s * gw.norm(dim=-1)
    return ((primal - dual) / scale).abs()


@pytest.mark.parametrize("K,D", [(3, 7), (9, 12), (12, 5)])
def test_cagrad_zero_duality_gap_every_k(K, D, gen):
    """Zero duality gap. A sample with 0 in the hull (K > D) has V* <= 0, so a d of the ball with
    min_k g_k . d = 0 is optimal (the Pareto-stationary case, where the dual has g_w* = 0);
    otherwise the gap to the dual value of the returned w* must vanish."""
    G = _grads(12, K, D, gen)
    scale = G.norm(dim=-1).amax(-1)
    stationary = gh.harmonize(G, "mgda", backend="torch").grad.norm(dim=-1) <= 1e-9 * scale
    for c in (0.4, 0.9):
        res = gh.harmonize(G, "cagrad", c=c, backend="torch")
        gap = _cagrad_check(G, res.grad, c)
        primal = torch.einsum("bkd,bd->bk", G, res.grad / K).min(-1).values
        gap = torch.where(stationary & (primal.abs() <= 1e-9 * scale**2), 0.0, gap)
        assert gap.max() <= 1e-9, f"CAGrad duality gap {float(gap.max()):.3e} (K={K}, c={c})"


@pytest.mark.parametrize("method", ["cagrad", "mgda", "upgrad"])
@pytest.mark.parametrize("K", [3, 10])
def test_float32_matches_float64(method, K, gen):
    """Solved in float64 from the float32 Gram: right to float32 precision, for every K."""
    G = _grads(16, K, 2 * K + 3, gen)
    ref = gh.harmonize(G, method, backend="torch").grad
    out = gh.harmonize(G.to(torch.float32), method, backend="torch").grad
    close(out, ref, 1e-6, scale=float(G.norm(dim=-1).amax()) * K, msg=f"{method} K={K} float32 vs float64")


@pytest.mark.parametrize("K", [3, 10])
def test_cagrad_kkt_stationarity(K, gen):
    """On the support of w*, every g_k . d equals min_k g_k . d (the worst case is balanced)."""
    G = _grads(16, K, 2 * K, gen)
    M = G @ G.transpose(1, 2)
    w = gh.rules.cagrad.cagrad_weights(M, 0.5) / K - 1.0 / K  # lam w*
    d = gh.harmonize(G, "cagrad", c=0.5, backend="torch").grad / K
    gd = torch.einsum("bkd,bd->bk", G, d)
    lo = gd.min(-1, keepdim=True).values
    scale = (G.norm(dim=-1).amax(-1, keepdim=True) * d.norm(dim=-1, keepdim=True))
    spread = torch.where(w > 1e-9 * w.amax(-1, keepdim=True), (gd - lo).abs(), 0.0) / scale
    assert spread.max() <= 1e-9, f"support gradients not balanced: {float(spread.max()):.3e}"


def test_active_set_qp_kkt(gen):
    """Positive-definite A with any q, and singular A (K > D) with q in its range."""
    for K, D in ((6, 14), (14, 6)):
        G = _grads(40, K, D, gen)
        M = G @ G.transpose(1, 2)
        x = torch.randn(40, K, dtype=F64, generator=gen)
        q = x * M.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True) if K <= D else torch.einsum("bij,bj->bi", M, x)
        for simplex in (True, False):
            w, ok = active_set_qp(M, q, simplex)
            assert ok.all()
            r = kkt_residual(M, q, w, simplex)
            assert r.max() <= 1e-10, f"K={K} D={D} simplex={simplex}: KKT residual {float(r.max()):.3e}"


# ---------------------------------------------------------------- UPGrad

@pytest.mark.parametrize("K", [2, 3, 5])
def test_upgrad_matches_torchjd_single_samples(K, gen):
    agg = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")  # torchjd's dual-cone projector
    from torchjd.linalg import QuadprogProjector

    # torchjd's default projector normalizes and regularizes the Gram (norm_eps = reg_eps = 1e-4);
    # unregularized it solves the same projection exactly
    exact = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
    G = _grads(6, K, 9, gen)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
        res = gh.harmonize(G.to(dtype), "upgrad", backend="torch")
        for b in range(6):
            w_jd = agg.UPGradWeighting(projector=exact)(G[b] @ G[b].T)
            close(res.weights[b] / K, w_jd, tol, msg=f"UPGrad / K vs torchjd UPGradWeighting, sample {b}, {dtype}")
        out = res.grad.to(F64)
        gd = torch.einsum("bkd,bd->bk", G, out)
        assert (gd >= -tol * G.norm(dim=-1) * out.norm(dim=-1, keepdim=True)).all(), "UPGrad conflicts"


def test_upgrad_no_conflict_is_sum(gen):
    G = torch.rand(5, 3, 4, dtype=F64, generator=gen) + 0.1  # positive: no pair conflicts
    close(gh.harmonize(G, "upgrad", backend="torch").grad, G.sum(1), 1e-12, msg="upgrad without conflicts")


# ---------------------------------------------------------------- options, registry

@pytest.mark.parametrize("bad", [
    ("mgda", {"max_iter": 0}), ("cagrad", {"max_iter": 2.5}), ("cagrad", {"c": -1.0}),
    ("cagrad", {"c": math.nan}), ("gradvac", {"beta": 1.5}), ("upgrad", {"max_iter": True}),
    ("pcgrad", {"order": "sorted"}),
])
def test_options_validated(bad):
    name, kw = bad
    with pytest.raises(ValueError, match=next(iter(kw))):
        gh.get_rule(name, **kw)


def test_registry_and_trainer_config_share_names():
    from gradharmony.rules import NONFINITE_POLICIES, RULE_NAMES, RULES
    from gradharmony.vatt import config

    assert config.METHODS == RULE_NAMES == tuple(RULES) and "upgrad" in RULE_NAMES
    assert NONFINITE_POLICIES == gh.engine.NONFINITE_POLICIES
    for name, cls in RULES.items():
        assert cls.name == name and cls.__module__ == f"gradharmony.rules.{name}"
    from gradharmony.rules.rules import PCGrad  # the former module still imports

    assert PCGrad is gh.PCGrad


# ---------------------------------------------------------------- conventions table (docs/RULES.md)

def _pcgrad_visiting_self(g):
    """LibMTL / Pytorch-PCGrad loop (fixed order): for each g_i, for every g_j including j = i."""
    out = torch.zeros_like(g[0])
    for i in range(g.shape[0]):
        gi = g[i].clone()
        for j in range(g.shape[0]):
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        out += gi
    return out


def test_convention_sum_scale(gen):
    """sum: torchjd's SumWeighting (weights 1); its MeanWeighting is that / K."""
    agg = pytest.importorskip("torchjd.aggregation")
    G = _grads(3, 4, 5, gen)
    w = gh.harmonize(G, "sum", backend="torch").weights
    for b in range(3):
        M = G[b] @ G[b].T
        close(w[b], agg.SumWeighting()(M), 1e-15, scale=1.0, msg="sum vs torchjd Sum")
        close(w[b] / 4, agg.MeanWeighting()(M), 1e-15, scale=1.0, msg="sum / K vs torchjd Mean")


def test_convention_pcgrad_visiting_rule():
    g = torch.tensor([[-1.0, 3], [-1, 0], [1, -1]], dtype=F64)
    ours = gh.harmonize(g[None], gh.PCGrad(order="fixed"), backend="torch").grad[0]
    close(ours, torch.tensor([0.5, 0.7], dtype=F64), 1e-12, msg="PCGrad j != i")
    close(_pcgrad_visiting_self(g), torch.tensor([0.6, 0.6], dtype=F64), 1e-12, msg="LibMTL-style j = i")


def _official_cagrad(g, c, rescale):
    """The official CAGrad (Liu et al. 2021 code): SLSQP on the simplex, then g0 + lmbda g_w,
    divided by 1 + c^2 (rescale=1) or 1 + c (rescale=2)."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    import numpy as np

    K = g.shape[0]
    GG = (g @ g.T).numpy()
    g0_norm = math.sqrt(GG.mean() + 1e-8)
    x0 = np.ones(K) / K
    cc = c * g0_norm + 1e-8

    def obj(x):
        return float(x @ GG @ x0 + cc * math.sqrt(x @ GG @ x + 1e-8))

    res = scipy_opt.minimize(obj, x0, bounds=[(0, 1)] * K,
                             constraints={"type": "eq", "fun": lambda x: 1 - x.sum()}, options={"ftol": 1e-14})
    gw = torch.from_numpy(res.x) @ g
    d = g.mean(0) + cc / (gw.norm() + 1e-8) * gw
    return d / (1 + c**2) if rescale == 1 else d / (1 + c)


@pytest.mark.parametrize("rescale", [1, 2])
def test_convention_cagrad_scale_vs_official(rescale, gen):
    c = 0.5
    G = _grads(4, 3, 6, gen)
    ours = gh.harmonize(G, "cagrad", c=c, backend="torch").grad
    for b in range(4):
        ref = _official_cagrad(G[b], c, rescale)
        factor = 3 * ((1 + c**2) if rescale == 1 else (1 + c))
        close(ours[b] / factor, ref, 2e-4, msg=f"K d*/factor vs official CAGrad, sample {b}")


def test_convention_cagrad_vs_torchjd(gen):
    """torchjd's CAGradWeighting returns 1/K + lambda w* (ours / K), and 0 at a stationary sample."""
    agg = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    G = _grads(4, 3, 6, gen)
    res = gh.harmonize(G, "cagrad", c=0.5, backend="torch")
    for b in range(4):
        w_jd = agg.CAGradWeighting(c=0.5, norm_eps=0.0)(G[b] @ G[b].T)
        # clarabel solves the dual to ~1e-8 in value: weights to ~1e-4
        close(res.weights[b] / 3, w_jd, 3e-4, msg=f"CAGrad / K vs torchjd, sample {b}")
    g = torch.tensor([[-1.0, 2], [1, 1], [-1, -1]], dtype=F64)
    assert torch.equal(agg.CAGradWeighting(c=0.4)(g @ g.T), torch.zeros(3, dtype=F64))
    out = gh.harmonize(g[None], "cagrad", c=0.4, backend="torch").grad[0]
    close(out, torch.tensor([-1.5, 1.5], dtype=F64), 1e-12, msg="stationary sample: nearest optimal d")


def test_convention_mgda_scale_and_libmtl_l2(gen):
    agg = pytest.importorskip("torchjd.aggregation")
    G = _grads(4, 3, 7, gen)
    res = gh.harmonize(G, "mgda", backend="torch")
    for b in range(4):  # torchjd: weights on the simplex (Frank-Wolfe, epsilon 1e-3)
        w_jd = agg.MGDAWeighting(epsilon=1e-9, max_iters=10000)(G[b] @ G[b].T)
        d_jd = w_jd @ G[b]
        close(res.grad[b] / 3, d_jd, 5e-2, msg="mgda / K vs torchjd MGDA (Frank-Wolfe, approximate)")
    # LibMTL mgda_gn='l2': unit-norm rows, then K x min-norm point of them (its own formula)
    Gn = G / G.norm(dim=-1, keepdim=True)
    ours = gh.harmonize(Gn, "mgda", backend="torch").grad
    import _oracles as O

    for b in range(4):
        close(ours[b], 3 * O.min_norm_point(Gn[b]), 1e-9, msg="LibMTL l2 reproduction")


def test_convention_defaults():
    agg = pytest.importorskip("torchjd.aggregation")
    import inspect

    assert gh.GradVac().beta == 0.01
    assert inspect.signature(agg.GradVacWeighting).parameters["beta"].default == 0.5
    assert gh.CAGrad().c == 0.4


def test_convention_k1_is_an_error_here(gen):
    agg = pytest.importorskip("torchjd.aggregation")
    G = torch.randn(2, 1, 5, dtype=F64, generator=gen)
    with pytest.raises(ValueError):
        gh.harmonize(G, "mgda", backend="torch")
    assert agg.MeanWeighting()(G[0] @ G[0].T).shape == (1,)  # torchjd aggregates one row


def test_solver_cap_warns(gen):
    """A solve stopped by max_iter says so (its weights are still feasible)."""
    G = _grads(8, 12, 20, gen)
    for name in ("mgda", "upgrad", "cagrad"):
        with pytest.warns(RuntimeWarning, match="max_iter=1"):
            w = gh.get_rule(name, max_iter=1).solve(G @ G.transpose(1, 2))[0]
        assert torch.isfinite(w).all() and (w >= 0).all()
