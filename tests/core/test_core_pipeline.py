"""One pipeline: the optimizer's per-sample path equals ``harmonize`` on per-sample
gradients computed independently with ``torch.func``, for every rule x nonfinite policy x
curriculum, including a sample whose gradient is non-finite only in the backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import gradharmony as gh
from gradharmony.api import pipeline

F64 = torch.float64
A = 1e300  # forward a * z finite, backward a * x overflows (float64)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=F64)
        with torch.no_grad():
            self.lin.weight[:, 0] = 1e-4  # keeps a * z finite for the large input below

    def forward(self, x, a):
        z = self.lin(x)
        return [torch.sin(a * z[:, 0]) + (z[:, 1] - 1) ** 2,
                (z[:, 0] - z[:, 1] + z[:, 2]) ** 2,
                torch.tanh(z[:, 2]) * z[:, 1]]


CURRICULA = {
    "off": None,
    "fraction-hard": dict(schedule="fraction", start=0.5),
    "fraction-soft": dict(schedule="fraction", start=0.6, mode="soft", temperature=0.3),
    "threshold-hard": dict(schedule="threshold", start=-0.2),
    "threshold-soft": dict(schedule="threshold", start=0.0, mode="soft", temperature=0.5),
}
RULES = {"sum": {}, "pcgrad": {"order": "fixed"}, "gradvac": {"order": "fixed", "beta": 0.5}, "cagrad": {},
         "mgda": {}}


def _inputs(gen, bad: bool):
    B = 7
    x = torch.randn(B, 3, generator=gen, dtype=F64)
    a = torch.ones(B, dtype=F64)
    if bad:  # sample 2: finite losses, infinite gradient of loss 0 (only in the backward)
        x[2, 0], a[2] = 1e12, A
    return x, a


def _func_grads(model, x, a):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def terms(p, xb, ab):
        return torch.stack([l[0] for l in functional_call(model, p, (xb[None], ab[None]))])

    jac = vmap(jacrev(terms), in_dims=(None, 0, 0))(params, x, a)
    B = x.shape[0]
    return torch.cat([jac[n].reshape(B, 3, -1) for n in params], dim=2)


def _cur(name):
    cfg = CURRICULA[name]
    return None if cfg is None else gh.ConflictCurriculum(**cfg)


@pytest.mark.parametrize("curriculum", sorted(CURRICULA))
@pytest.mark.parametrize("nonfinite", ["raise", "skip", "zero", "propagate"])
@pytest.mark.parametrize("method", sorted(RULES))
def test_optimizer_sample_path_equals_harmonize(method, nonfinite, curriculum, gen):
    torch.manual_seed(0)
    model = Net()
    x, a = _inputs(gen, bad=nonfinite != "raise")
    G = _func_grads(model, x, a)
    if nonfinite != "raise":
        assert not torch.isfinite(G[2]).all() and torch.isfinite(G[torch.arange(7) != 2]).all()
        assert all(torch.isfinite(l).all() for l in model(x, a)), "the forward must stay finite"
    rule = gh.get_rule(method, **RULES[method])
    expect = gh.harmonize(G, rule, reduction="mean", curriculum=_cur(curriculum), nonfinite=nonfinite,
                          backend="torch")
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, granularity="sample",
                                 curriculum=_cur(curriculum), nonfinite=nonfinite, shared_only=False, chunk_size=3,
                                 backend="torch", **RULES[method])
    opt.backward(model(x, a))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    if nonfinite == "propagate":
        # equal where finite; a sample weighted exactly 0 (a hard curriculum) propagates its
        # inf through harmonize's combine (0 * inf = NaN), not through the optimizer's backward
        # (which multiplies the loss, not its inf gradient, by 0)
        ok = torch.isfinite(got) & torch.isfinite(expect.grad)
        assert (torch.isfinite(got) | ~torch.isfinite(expect.grad)).all(), "non-finite where harmonize is finite"
        assert not torch.isfinite(expect.grad).all()
        if (expect.sample_weights is None or expect.sample_weights[2] != 0):
            assert not torch.isfinite(got).all(), "a kept non-finite sample did not propagate"
        if ok.any():
            torch.testing.assert_close(got[ok], expect.grad[ok], rtol=1e-10,
                                       atol=1e-10 * float(expect.grad[ok].abs().max()))
    else:
        torch.testing.assert_close(got, expect.grad, rtol=1e-10, atol=1e-10 * float(expect.grad.abs().max()))
    st, se = opt.last_stats, expect.stats
    torch.testing.assert_close(st.cos, se.cos, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(opt.last_result.weights, expect.weights, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(st.sample_weights, se.sample_weights, equal_nan=True)
    if curriculum != "off":
        torch.testing.assert_close(st.curriculum_weights, se.curriculum_weights, equal_nan=True)
    if nonfinite == "skip":
        assert (expect.weights[2] == 0).all()
    if method == "gradvac":  # the same rule state update (kept samples only)
        torch.testing.assert_close(opt.rule.phi_hat, rule.phi_hat)
        assert torch.isfinite(rule.phi_hat).all()


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_nonfinite_raise_names_it(granularity, gen):
    model = Net()
    x, a = _inputs(gen, bad=True)
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", granularity=granularity)
    ls = model(x, a)
    with pytest.raises(gh.NonFiniteGradientError, match="not finite"):
        opt.backward([l.mean() for l in ls] if granularity == "batch" else ls)


def test_weigh_on_ready_gram_matches_harmonize(gen):
    """``pipeline.weigh`` with a Gram computed elsewhere gives harmonize's weights and stats,
    and a skipped sample is out of the curriculum's quantile and normalisation."""
    G = torch.randn(9, 3, 11, generator=gen, dtype=F64)
    M = G @ G.transpose(1, 2)
    cur = dict(schedule="fraction", start=0.5)
    r = gh.harmonize(G, "pcgrad", order="fixed", curriculum=gh.ConflictCurriculum(**cur), backend="torch")
    w = pipeline.weigh(M, gh.get_rule("pcgrad", order="fixed"), gh.ConflictCurriculum(**cur))
    torch.testing.assert_close(w.weights, r.weights)
    torch.testing.assert_close(w.stats.score, r.stats.score)
    finite = torch.ones(9, dtype=torch.bool)
    finite[4] = False
    ws = pipeline.weigh(M, gh.get_rule("pcgrad", order="fixed"), gh.ConflictCurriculum(**cur), finite, "skip")
    keep = torch.arange(9) != 4
    wk = pipeline.weigh(M[keep], gh.get_rule("pcgrad", order="fixed"), gh.ConflictCurriculum(**cur))
    assert (ws.weights[4] == 0).all() and ws.sample_weights[4] == 0
    torch.testing.assert_close(ws.weights[keep], wk.weights)
    torch.testing.assert_close(ws.sample_weights[keep], wk.sample_weights)
    with pytest.raises(ValueError, match="Gram matrices"):
        pipeline.weigh(M[0], gh.get_rule("sum"))
