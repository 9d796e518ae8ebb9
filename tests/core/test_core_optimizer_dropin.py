"""``HarmonizedOptimizer`` as a ``torch.optim.Optimizer`` drop-in: PyTorch's tools, plain
backward bit for bit with ``method="sum"``, scale, shared/task-specific parameters."""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import pytest
import torch
from torch import nn

import gradharmony as gh
import _oracles as O
from _asserts import close

F64 = torch.float64


class Net(nn.Module):
    """Every parameter layout: sparse embedding, tied weights, frozen and unreached
    parameters, a shared trunk and one head per loss."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(7, 3, sparse=True, dtype=dtype)
        self.trunk = nn.Linear(3 + 4, 5, dtype=dtype)
        self.frozen = nn.Linear(5, 5, dtype=dtype)
        self.frozen.requires_grad_(False)
        self.head_a = nn.Linear(5, 1, dtype=dtype)
        self.head_b = nn.Linear(5, 5, bias=False, dtype=dtype)
        self.tied = nn.Linear(5, 5, bias=False, dtype=dtype)
        self.tied.weight = self.head_b.weight  # one parameter used twice by loss b
        self.unused = nn.Linear(2, 2, dtype=dtype)

    def forward(self, idx, x):
        h = torch.tanh(self.frozen(torch.tanh(self.trunk(torch.cat([self.emb(idx), x], 1)))))
        la = (self.head_a(h).squeeze(1) - 1) ** 2
        lb = self.tied(torch.tanh(self.head_b(h))).pow(2).sum(1)
        return [la, lb]


def _batch(gen, B=6, dtype=torch.float32):
    return torch.randint(0, 7, (B,), generator=gen), torch.randn(B, 4, generator=gen, dtype=dtype)


def _groups(model):
    return [{"params": list(model.emb.parameters()) + list(model.trunk.parameters()), "lr": 0.1},
            {"params": [model.head_a.weight, model.head_a.bias, model.head_b.weight], "lr": 0.03},
            {"params": list(model.unused.parameters()) + list(model.frozen.parameters()), "lr": 0.2}]


def _grads(model):
    return [None if p.grad is None else p.grad.to_dense().clone() for p in model.parameters()]


def _assert_same_grads(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), f"{what}: parameter {i}: grad None-ness differs"
        if x is not None:
            assert torch.equal(x, y), f"{what}: parameter {i}: max diff {(x - y).abs().max()}"


@pytest.mark.filterwarnings("ignore:gradharmony. batched per-sample gradients failed")  # sparse: loops
@pytest.mark.parametrize("granularity", ["batch", "sample"])
@pytest.mark.parametrize("B", [6, 1, 0])
def test_sum_is_plain_backward_bit_for_bit(granularity, B, gen):
    """Unreached params keep grad None, frozen ones too, tied and sparse-gradient
    parameters, three param groups, B = 0: grads and the stepped params equal plain."""
    torch.manual_seed(1)
    ref = Net()
    model = copy.deepcopy(ref)
    model.tied.weight = model.head_b.weight  # deepcopy keeps ties; say it
    data = _batch(gen, B)
    ropt = torch.optim.SGD(_groups(ref), lr=0.1)
    rl = ref(*data)
    (sum(l.mean() for l in rl) if granularity == "sample" else sum(l.mean() for l in rl)).backward()
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(_groups(model), lr=0.1), "sum", granularity=granularity,
                                 chunk_size=4, backend="torch")
    ls = model(*data)
    opt.backward([l.mean() for l in ls] if granularity == "batch" else ls)
    assert model.emb.weight.grad.is_sparse == ref.emb.weight.grad.is_sparse
    _assert_same_grads(_grads(model), _grads(ref), f"{granularity} B={B}")
    assert model.unused.weight.grad is None and model.frozen.weight.grad is None
    ropt.step()
    opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), f"{n} after step"
    if B == 0:
        assert all(g is None or not g.to_dense().any() for g in _grads(model))


def test_sample_scale_is_batch_mean(gen):
    """Per-sample losses give the gradient of the batch mean by default, B times it with
    loss_reduction='sum' (at B = 16 the old default was exactly 16x)."""
    torch.manual_seed(0)
    model = Net(F64)
    data = _batch(gen, 16, F64)
    ref = copy.deepcopy(model)
    sum(l.mean() for l in ref(*data)).backward()
    for red, factor in (("mean", 1.0), ("sum", 16.0)):
        model.zero_grad()
        opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "sum", granularity="sample",
                                     loss_reduction=red)
        opt.backward(model(*data))
        close(model.trunk.weight.grad, factor * ref.trunk.weight.grad, 1e-12, msg=red)


class Trunk2Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 6, dtype=F64)
        self.head_a = nn.Linear(6, 1, dtype=F64)
        self.head_b = nn.Linear(6, 1, dtype=F64)

    def forward(self, x, y):
        h = torch.tanh(self.trunk(x))
        return [(self.head_a(h).squeeze(1) - y[:, 0]) ** 2, (self.head_b(h).squeeze(1) + y[:, 1]).abs()]


def _per_loss_grads(model, losses):
    params = list(model.parameters())
    return [torch.autograd.grad(l, params, retain_graph=True, allow_unused=True) for l in losses]


def _flat(gs, params):
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])


def _conflicting_data(model, gen):
    for _ in range(50):
        x, y = torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 2, generator=gen, dtype=F64)
        gs = _per_loss_grads(model, [l.mean() for l in model(x, y)])
        t = [torch.cat([g.reshape(-1) for g in gk[:2]]) for gk in gs]  # trunk grads
        if torch.dot(t[0], t[1]) < 0:
            return x, y
    pytest.fail("no conflicting batch in 50 draws")


@pytest.mark.parametrize("shared_only", [True, False])
def test_batch_shared_only_vs_float64_oracle(shared_only, gen):
    torch.manual_seed(2)
    model = Trunk2Heads()
    params = list(model.parameters())
    x, y = _conflicting_data(model, gen)
    losses = [l.mean() for l in model(x, y)]
    gs = _per_loss_grads(model, losses)
    if shared_only:
        trunk = O.pcgrad_sample(torch.stack([_flat(g[:2], params[:2]) for g in gs]))
        expect = torch.cat([trunk, _flat(gs[0][2:4], params[2:4]), _flat(gs[1][4:], params[4:])])
    else:
        expect = O.pcgrad_sample(torch.stack([_flat(g, params) for g in gs]))
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(params, lr=0.1), "pcgrad", shared_only=shared_only, backend="torch")
    opt.backward(losses)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    close(got, expect, 1e-12, msg=f"shared_only={shared_only}")
    if shared_only:  # the heads keep their own loss's gradient exactly
        assert torch.equal(model.head_a.weight.grad, gs[0][2])
        assert torch.equal(model.head_b.weight.grad, gs[1][4])


def test_sample_shared_only_heads_keep_own_gradient(gen):
    torch.manual_seed(3)
    model = Trunk2Heads()
    x, y = _conflicting_data(model, gen)
    ref = copy.deepcopy(model)
    sum(l.mean() for l in ref(x, y)).backward()
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", granularity="sample")
    opt.backward(model(x, y))
    for n in ("head_a", "head_b"):
        for a, b in zip(getattr(model, n).parameters(), getattr(ref, n).parameters()):
            close(a.grad, b.grad, 1e-12, msg=n)
    assert not torch.allclose(model.trunk.weight.grad, ref.trunk.weight.grad), "trunk was not harmonized"


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_trunk_only_wrapper_leaves_heads_their_plain_gradient(granularity, gen):
    torch.manual_seed(4)
    model = Trunk2Heads()
    x, y = _conflicting_data(model, gen)
    ref = copy.deepcopy(model)
    sum(l.mean() for l in ref(x, y)).backward()
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(model.trunk.parameters(), lr=0.1), "pcgrad",
                                 granularity=granularity)
    heads = torch.optim.SGD(list(model.head_a.parameters()) + list(model.head_b.parameters()), lr=0.1)
    ls = model(x, y)
    opt.backward([l.mean() for l in ls] if granularity == "batch" else ls)
    for n in ("head_a", "head_b"):
        for a, b in zip(getattr(model, n).parameters(), getattr(ref, n).parameters()):
            assert a.grad is not None, f"{n} left with grad None"
            close(a.grad, b.grad, 1e-12, msg=n)
    heads.step()
    opt.step()


# -- torch.optim surface -------------------------------------------------------------------
def _lin():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9 ** e),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.9),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 2),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [1, 3]),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o), torch.optim.lr_scheduler.ExponentialLR(o, 0.8)], [2]),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, 4),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 4),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o), torch.optim.lr_scheduler.ExponentialLR(o, 0.8)]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=2),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 2),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=10),
}


def test_every_scheduler_is_covered():
    mod = torch.optim.lr_scheduler
    names = {n for n, c in inspect.getmembers(mod, inspect.isclass)
             if issubclass(c, mod.LRScheduler) and c.__module__ == mod.__name__
             and not n.startswith("_") and n != "LRScheduler"}
    assert names <= set(SCHEDULERS), f"schedulers not tested: {sorted(names - set(SCHEDULERS))}"


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_scheduler(name, gen):
    """Each scheduler drives the wrapper exactly as the plain optimizer, without warnings."""
    lrs = []
    for wrap in (False, True):
        m = _lin()
        inner = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        opt = gh.HarmonizedOptimizer(inner, "pcgrad") if wrap else inner
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sched = SCHEDULERS[name](opt)
            seq = []
            for _ in range(5):
                opt.zero_grad()
                out = m(torch.randn(4, 3, generator=gen))
                ls = [out[:, 0].pow(2).mean(), (1 - out[:, 1]).pow(2).mean()]
                opt.backward(ls) if wrap else sum(ls).backward()
                opt.step()
                sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()
                seq.append(opt.param_groups[0]["lr"])
        lrs.append(seq)
    assert lrs[0] == lrs[1]


def test_optimizer_surface(tmp_path):
    m = _lin()
    inner = torch.optim.Adam(m.parameters(), lr=0.01)
    opt = gh.HarmonizedOptimizer(inner, "pcgrad")
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults is inner.defaults and opt.state is inner.state
    assert opt.param_groups is inner.param_groups
    extra = nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["lr"] == 0.5
    opt.param_groups = inner.param_groups[:1]
    assert len(inner.param_groups) == 1
    r = repr(opt)
    assert "HarmonizedOptimizer" in r and "PCGrad" in r and "Adam" in r and "lr: 0.01" in r
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o is opt)))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o is opt)))
    out = m(torch.randn(4, 3))
    opt.backward([out[:, 0].mean(), out[:, 1].mean()])
    opt.step()
    assert calls == [("pre", True), ("post", True)]
    h1.remove(), h2.remove()
    opt.step()
    assert len(calls) == 2
    pickle.loads(pickle.dumps(opt))  # picklable like an optimizer


def test_step_closure_lbfgs_and_sgd(gen):
    x = torch.randn(8, 3, generator=gen)
    for make in (lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3)):
        m = _lin()
        ref = copy.deepcopy(m)
        opt = gh.HarmonizedOptimizer(make(m.parameters()), "sum")
        ropt = make(ref.parameters())

        def closure():
            opt.zero_grad()
            out = m(x)
            ls = [out[:, 0].pow(2).mean(), (1 - out[:, 1]).pow(2).mean()]
            opt.backward(ls)
            return sum(ls)

        def rclosure():
            ropt.zero_grad()
            out = ref(x)
            loss = out[:, 0].pow(2).mean() + (1 - out[:, 1]).pow(2).mean()
            loss.backward()
            return loss

        assert torch.equal(opt.step(closure), ropt.step(rclosure))
        for p, q in zip(m.parameters(), ref.parameters()):
            assert torch.equal(p, q)


def test_step_closure_with_gradscaler(gen):
    m = _lin()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), "pcgrad", scaler=scaler)
    before = [p.clone() for p in m.parameters()]

    def closure():
        opt.zero_grad()
        out = m(torch.randn(8, 3, generator=gen))
        ls = [out[:, 0].pow(2).mean(), (1 - out[:, 1]).pow(2).mean()]
        opt.backward(ls)
        return sum(ls)

    loss = opt.step(closure)
    assert loss is not None and any(not torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_external_gradscaler_steps_the_wrapper(gen):
    """scaler.step(wrapper) as with any optimizer: unscale, step (same as unscaled)."""
    m = _lin()
    ref = copy.deepcopy(m)
    x = torch.randn(8, 3, generator=gen)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), "pcgrad")
    out = m(x)
    opt.backward([scaler.scale(out[:, 0].pow(2).mean()), scaler.scale((1 - out[:, 1]).pow(2).mean())])
    scaler.step(opt)
    scaler.update()
    ropt = gh.HarmonizedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), "pcgrad")
    out = ref(x)
    ropt.backward([out[:, 0].pow(2).mean(), (1 - out[:, 1]).pow(2).mean()])
    ropt.step()
    for p, q in zip(m.parameters(), ref.parameters()):
        close(p, q, 1e-6, msg="scaler.step(wrapper)")


def test_load_plain_inner_state_dict_and_bad_dict(gen):
    m = _lin()
    inner = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    out = m(torch.randn(4, 3, generator=gen))
    sum([out[:, 0].mean(), out[:, 1].mean()]).backward()
    inner.step()
    plain = copy.deepcopy(inner.state_dict())
    opt = gh.HarmonizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), "gradvac")
    opt.load_state_dict(plain)
    buf = opt.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf, plain["state"][0]["momentum_buffer"])
    with pytest.raises(ValueError, match="state dict"):
        opt.load_state_dict({"foo": 1})
    full = opt.state_dict()
    opt2 = gh.HarmonizedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), "gradvac")
    opt2.load_state_dict(full)
    assert torch.equal(opt2.state_dict()["optimizer"]["state"][0]["momentum_buffer"], buf)
