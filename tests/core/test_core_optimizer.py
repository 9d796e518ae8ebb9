"""``HarmonizedOptimizer``: batch and per-sample (term decomposition) harmonization."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradharmony as gh
import _oracles as O
from _asserts import close

F64 = torch.float64


class Coupled(nn.Module):
    """Two/three per-sample losses whose terms depend on other samples (batch negatives)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 4, dtype=F64)
        self.txt = nn.Linear(3, 4, dtype=F64)
        self.head = nn.Linear(4, 2, dtype=F64)

    def forward(self, x, t, y, K=2):
        e = torch.tanh(self.enc(x))  # (B, 4)
        z = self.txt(t)  # (B, 4)
        logits = e @ z.T
        l_nce = nn.functional.cross_entropy(logits, torch.arange(x.shape[0]), reduction="none")  # (B,)
        l_reg = ((self.head(e) - y) ** 2).sum(1) + (e * e.mean(0)).sum(1)  # coupled through the batch mean
        losses = [l_nce, l_reg]
        if K == 3:
            losses.append((z.pow(2).sum(1) - 1).pow(2) - 0.5 * (e * z).sum(1))
        return losses


def _data(gen, B=5):
    return (torch.randn(B, 5, generator=gen, dtype=F64), torch.randn(B, 3, generator=gen, dtype=F64),
            torch.randn(B, 2, generator=gen, dtype=F64))


def _flat_grad(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


def _term_grads(model, losses):
    """G (B, K, P): the gradient of each term l_{k,b} by a loop of autograd.grad calls."""
    params = list(model.parameters())
    B, K = losses[0].shape[0], len(losses)
    G = torch.zeros(B, K, sum(p.numel() for p in params), dtype=F64)
    for b in range(B):
        for k in range(K):
            gs = torch.autograd.grad(losses[k][b], params, retain_graph=True, allow_unused=True)
            G[b, k] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])
    return G


def _model(seed=0):
    torch.manual_seed(seed)
    return Coupled()


def test_batch_sum_equals_plain_backward(gen):
    model = _model()
    data = _data(gen)
    sum(l.mean() for l in model(*data)).backward()
    plain = _flat_grad(model)
    model.zero_grad()
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "sum", granularity="batch", backend="torch")
    opt.backward([l.mean() for l in model(*data)])
    close(_flat_grad(model), plain, 1e-12, msg="batch 'sum' vs plain backward")


def test_sample_sum_equals_plain_backward(gen):
    model = _model()
    data = _data(gen)
    sum(l.mean() for l in model(*data)).backward()
    plain = _flat_grad(model)
    model.zero_grad()
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "sum", granularity="sample", backend="torch")
    opt.backward(model(*data))
    assert torch.equal(_flat_grad(model), plain), "sample 'sum' is not bit for bit plain backward of the means"


def test_batch_pcgrad_equals_oracle(gen):
    model = _model()
    data = _data(gen)
    losses = [l.mean() for l in model(*data, K=3)]
    params = list(model.parameters())
    rows = []
    for l in losses:
        gs = torch.autograd.grad(l, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]))
    expect = O.pcgrad_sample(torch.stack(rows))
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(params, lr=0.1), "pcgrad", order="fixed", backend="torch",
                                 shared_only=False)
    opt.backward(losses)
    close(_flat_grad(model), expect, 1e-12, msg="batch pcgrad vs oracle")


@pytest.mark.parametrize("K,method", [(2, "pcgrad"), (3, "pcgrad"), (2, "mgda"), (3, "gradvac")])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_sample_level_equals_term_loop(K, method, chunk_size, gen):
    """p.grad == harmonize(G, reduction='mean') with G from a loop over the loss terms."""
    model = _model()
    kw = {"order": "fixed"} if method in ("pcgrad", "gradvac") else {}
    for _ in range(20):  # redraw (seeded) until some sample's terms conflict, else it tests nothing
        data = _data(gen, B=7)
        losses = model(*data, K=K)
        G = _term_grads(model, losses)
        expect = gh.harmonize(G, method, reduction="mean", backend="torch", **kw)
        if not torch.allclose(expect.grad, G.sum(1).mean(0)):
            break
    else:
        pytest.fail("no conflicting sample in 20 draws")
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, granularity="sample",
                                 chunk_size=chunk_size, backend="torch", shared_only=False, **kw)
    opt.backward(losses)
    close(_flat_grad(model), expect.grad, 1e-10, msg=f"{method} K={K} chunk {chunk_size}")
    close(opt.last_stats.cos, expect.cos, 1e-10, scale=1.0, msg="per-sample cosines")


def test_sample_level_with_curriculum_equals_term_loop(gen):
    model = _model()
    data = _data(gen, B=8)
    losses = model(*data)
    G = _term_grads(model, losses)
    expect = gh.harmonize(G, "pcgrad", reduction="mean", backend="torch",
                          curriculum=gh.ConflictCurriculum(start=0.5, ramp_steps=4))
    cur = gh.ConflictCurriculum(start=0.5, ramp_steps=4)
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", curriculum=cur,
                                 granularity="sample", chunk_size=3, backend="torch", shared_only=False)
    opt.backward(losses)
    close(_flat_grad(model), expect.grad, 1e-10, msg="curriculum, sample level")
    assert opt.last_stats.kept_fraction == 0.5
    opt.step()
    assert cur.step_count == 1


def _train(opt, model, gen_data, steps):
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(model(*gen_data()))
        opt.step()


def test_state_dict_round_trip(gen):
    datas = [_data(gen) for _ in range(6)]
    it = iter(datas)

    def make(model):
        return gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                      gh.GradVac(beta=0.3, order="random", seed=3), granularity="sample",
                                      curriculum=gh.ConflictCurriculum(start=0.6, ramp_steps=5), backend="torch")

    m1 = _model()
    o1 = make(m1)
    _train(o1, m1, lambda: next(it), 3)
    state = copy.deepcopy(o1.state_dict())
    m2 = copy.deepcopy(m1)
    o2 = make(m2)
    o2.load_state_dict(state)
    assert o2.curriculum.step_count == 3 and torch.equal(o2.rule.phi_hat, o1.rule.phi_hat)
    rest = datas[3:]
    _train(o1, m1, iter(rest).__next__, 3)
    _train(o2, m2, iter(rest).__next__, 3)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q), "training after a state_dict round trip diverged"
    with pytest.raises(ValueError):  # curriculum config mismatch
        o3 = gh.HarmonizedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.05, momentum=0.9), "gradvac",
                                    granularity="sample", curriculum=gh.ConflictCurriculum(start=0.9))
        o3.load_state_dict(state)


def test_param_groups(gen):
    model = _model()
    model.head.bias.requires_grad_(False)
    groups = [{"params": list(model.enc.parameters()), "lr": 0.1},
              {"params": list(model.txt.parameters()) + list(model.head.parameters()), "lr": 0.01}]
    ref = copy.deepcopy(model)
    ref_groups = [{"params": list(ref.enc.parameters()), "lr": 0.1},
                  {"params": list(ref.txt.parameters()) + list(ref.head.parameters()), "lr": 0.01}]
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(groups), "sum", granularity="sample", backend="torch")
    assert opt.param_groups[1]["lr"] == 0.01
    data = _data(gen)
    opt.zero_grad()
    opt.backward(model(*data))
    opt.step()
    ropt = torch.optim.SGD(ref_groups)
    sum(l.mean() for l in ref(*data)).backward()
    ropt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        close(p, q, 1e-12, msg="param groups")
    assert model.head.bias.grad is None


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_gradscaler_path(granularity, gen):
    model = _model()
    ref = copy.deepcopy(model)
    data = _data(gen)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", granularity=granularity,
                                 scaler=scaler, backend="torch")
    losses = model(*data)
    losses = [l.mean() for l in losses] if granularity == "batch" else losses
    opt.backward(losses)
    opt.step()
    ropt = gh.HarmonizedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), "pcgrad", granularity=granularity,
                                  backend="torch")
    rl = ref(*data)
    ropt.backward([l.mean() for l in rl] if granularity == "batch" else rl)
    ropt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.isfinite(p).all()
        close(p, q, 1e-9, msg="scaled step == unscaled step")
    assert scaler.get_scale() == 2.0**12
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), _model().parameters()))


def test_gradscaler_overflow_skips_step(gen):
    model = _model()
    before = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", granularity="sample",
                                 scaler=scaler, backend="torch")
    opt.backward([1e300 * l for l in model(*_data(gen))])  # float64 params: overflow needs > 1e308
    opt.step()
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q), "an overflowing step was not skipped"
    assert scaler.get_scale() < 3e38


def test_bad_input(gen):
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError):
        gh.HarmonizedOptimizer(object(), "sum")
    with pytest.raises(ValueError):
        gh.HarmonizedOptimizer(sgd, "sum", granularity="token")
    with pytest.raises(ValueError):
        gh.HarmonizedOptimizer(sgd, "sum", chunk_size=0)
    with pytest.raises(ValueError):
        gh.HarmonizedOptimizer(sgd, "sum", curriculum=gh.ConflictCurriculum(), granularity="batch")
    with pytest.raises(ValueError):
        gh.HarmonizedOptimizer(sgd, "frobnicate")
    opt_b = gh.HarmonizedOptimizer(sgd, "pcgrad", granularity="batch")
    opt_s = gh.HarmonizedOptimizer(sgd, "pcgrad", granularity="sample")
    l1, l2 = model(*_data(gen))
    with pytest.raises(ValueError, match="K >= 2"):
        opt_b.backward([l1.mean()])
    with pytest.raises(ValueError, match="loss 1 has shape"):
        opt_b.backward([l1.mean(), l2])
    with pytest.raises(ValueError, match="loss 0 has shape"):
        opt_s.backward([l1.mean(), l2])
    with pytest.raises(ValueError, match="loss 1 has batch size 4"):
        opt_s.backward([l1, l2[:4]])
    with pytest.raises(ValueError, match="loss 1 does not require grad"):
        opt_s.backward([l1, l2.detach()])
    with pytest.raises(TypeError, match="loss 1"):
        opt_s.backward([l1, 3.0])


def test_sample_skip_nonfinite_sample():
    """A non-finite value in one sample's forward pass contaminates every per-sample
    gradient of the batch graph (their backward multiplies a zero output gradient by the
    non-finite local derivative: 0 * inf = NaN), so 'skip' drops every sample whose
    per-sample gradient came out non-finite: p.grad stays finite (here: all dropped, zero),
    and 'raise' names the problem."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, dtype=F64)
    x = torch.randn(5, 4, dtype=F64)
    x[2, 1] = float("inf")

    def losses():
        z = lin(x)
        return [(z[:, 0] - 1) ** 2, (z[:, 1] + z[:, 2]) ** 2]

    opt = gh.HarmonizedOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), "pcgrad", granularity="sample",
                                 nonfinite="skip", backend="torch")
    opt.backward(losses())
    got = torch.cat([lin.weight.grad.reshape(-1), lin.bias.grad])
    assert torch.isfinite(got).all(), f"NaN/inf leaked into p.grad: {got}"
    assert (got == 0).all(), f"contaminated samples were not all dropped: {got}"
    opt_r = gh.HarmonizedOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), "pcgrad", granularity="sample",
                                   backend="torch")
    with pytest.raises(gh.NonFiniteGradientError, match="not finite"):
        opt_r.backward(losses())
