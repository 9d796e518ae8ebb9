"""The autograd branch op ``Harmonizer.branch`` (path decomposition at a shared representation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradharmony as gh
from _asserts import close

F64 = torch.float64


class Net(nn.Module):
    """Encoder -> shared h (B, T, C) -> two heads with a contrastive-ish coupling across samples."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.enc = nn.Linear(5, 6, dtype=dtype)
        self.head_a = nn.Linear(6, 4, dtype=dtype)
        self.head_b = nn.Linear(6, 4, dtype=dtype)

    def h(self, x):
        return torch.tanh(self.enc(x))  # (B, T, 6)

    def losses(self, a, b, y):
        za = self.head_a(a).mean(1)  # (B, 4)
        zb = self.head_b(b).mean(1)
        # loss a only sees view a, loss b only view b; loss a couples samples (batch negatives)
        logits = za @ y.T
        la = nn.functional.cross_entropy(logits, torch.arange(za.shape[0]))
        lb = ((zb - y) ** 2).sum(1).mean() + (zb.mean(0) ** 2).sum()
        return la, lb


def _data(gen, B=6, dtype=torch.float32):
    x = torch.randn(B, 3, 5, generator=gen).to(dtype)
    y = torch.randn(B, 4, generator=gen).to(dtype)
    return x, y


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_sum_branch_equals_plain_backward(gen):
    torch.manual_seed(0)
    model = Net()
    x, y = _data(gen)
    h = model.h(x)
    sum(model.losses(h, h, y)).backward()
    plain = _grads(model)
    model.zero_grad()
    harm = gh.Harmonizer("sum", backend="torch")
    a, b = harm.branch(model.h(x), 2)
    sum(model.losses(a, b, y)).backward()
    for g, p in zip(plain, model.parameters()):
        close(p.grad, g, 1e-6, msg="sum branch vs plain backward")
    assert harm.last_result is not None and harm.last_result.backend == "torch"


def test_gradcheck_through_sum_branch(gen):
    torch.manual_seed(0)
    model = Net(F64)
    x, y = _data(gen, B=4, dtype=F64)
    W = model.enc.weight.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    harm = gh.Harmonizer("sum", backend="torch")

    def f(xr, W):
        h = torch.tanh(xr @ W.T + model.enc.bias)
        a, b = harm.branch(h, 2)
        la, lb = model.losses(a, b, y)
        return torch.stack([la + lb])

    assert torch.autograd.gradcheck(f, (xr, W), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["pcgrad", "mgda", "cagrad"])
def test_branch_equals_harmonize_of_per_sample_grads(method, gen):
    """h.grad = harmonize(dL_a/dh, dL_b/dh) row by row; upstream params get J^T of it."""
    torch.manual_seed(0)
    model = Net(F64)
    x, y = _data(gen, dtype=F64)
    h = model.h(x)
    la, lb = model.losses(h, h, y)
    ga, gb = torch.autograd.grad(la, h, retain_graph=True)[0], torch.autograd.grad(lb, h)[0]
    expect = gh.harmonize([ga, gb], method, backend="torch").grad.reshape(h.shape)
    cos = torch.nn.functional.cosine_similarity(ga.flatten(1), gb.flatten(1), dim=1)

    hh = model.h(x).detach().requires_grad_(True)
    harm = gh.Harmonizer(method, backend="torch")
    a, b = harm.branch(hh, 2)
    sum(model.losses(a, b, y)).backward()
    close(hh.grad, expect, 1e-10, msg=f"{method} branch h.grad")
    close(harm.last_result.cos[:, 0, 1], cos, 1e-10, scale=1.0, msg="branch cosines")
    if method == "pcgrad":
        assert not torch.allclose(hh.grad, ga + gb), "test data has no conflict: not a test"

    # upstream: the encoder's grads are the VJP of the harmonized h.grad
    model.zero_grad()
    h2 = model.h(x)
    a, b = harm.branch(h2, 2)
    sum(model.losses(a, b, y)).backward()
    enc_expect = torch.autograd.grad(model.h(x), model.enc.weight, grad_outputs=expect)[0]
    close(model.enc.weight.grad, enc_expect, 1e-10, msg="encoder grad = J^T harmonized")


def test_unused_branches(gen):
    torch.manual_seed(0)
    model = Net(F64)
    x, y = _data(gen, dtype=F64)
    harm = gh.Harmonizer("pcgrad", backend="torch")
    # one of two views used: its gradient passes unchanged
    h = model.h(x).detach().requires_grad_(True)
    a, _ = harm.branch(h, 2)
    la, _ = model.losses(a, a.detach(), y)
    la.backward()
    h2 = model.h(x).detach().requires_grad_(True)
    model.losses(h2, h2.detach(), y)[0].backward()
    assert torch.equal(h.grad, h2.grad)
    # three views, two used: same as harmonizing the two
    h = model.h(x).detach().requires_grad_(True)
    a, b, c = harm.branch(h, 3)
    sum(model.losses(a, c, y)).backward()
    h3 = model.h(x).detach().requires_grad_(True)
    la, lb = model.losses(h3, h3, y)
    ga, gb = torch.autograd.grad(la, h3, retain_graph=True)[0], torch.autograd.grad(lb, h3)[0]
    close(h.grad, gh.harmonize([ga, gb], "pcgrad", backend="torch").grad.reshape(h.shape), 1e-12, msg="3 views, 2 used")
    # no grad mode: plain identity
    with torch.no_grad():
        outs = harm.branch(h, 2)
    assert all(o is h for o in outs)


def test_branch_bad_args():
    harm = gh.Harmonizer("pcgrad")
    with pytest.raises(ValueError):
        harm.branch(torch.zeros(3, requires_grad=True), 1)
    with pytest.raises(TypeError):
        harm.branch([1.0, 2.0], 2)
    with pytest.raises(ValueError):
        gh.Harmonizer("nope")


def test_branch_autocast_bf16(gen):
    torch.manual_seed(0)
    model = Net()
    x, y = _data(gen)
    harm = gh.Harmonizer("pcgrad", backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.h(x)
        assert h.dtype == torch.bfloat16
        a, b = harm.branch(h, 2)
        la, lb = model.losses(a, b, y)
    (la + lb).float().backward()
    grads = _grads(model)
    assert all(torch.isfinite(g).all() for g in grads)
    assert harm.last_result.grad.dtype == torch.bfloat16
    # close to the float32 result at bf16 precision
    model.zero_grad()
    a, b = harm.branch(model.h(x), 2)
    sum(model.losses(a, b, y)).backward()
    for g, g32 in zip(grads, _grads(model)):
        close(g, g32, 1e-1, msg="bf16 autocast vs float32")


def test_branch_gradscaler_steps(gen):
    torch.manual_seed(0)
    model = Net()
    x, y = _data(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    harm = gh.Harmonizer("pcgrad", backend="torch", nonfinite="propagate")
    before = [p.detach().clone() for p in model.parameters()]
    a, b = harm.branch(model.h(x), 2)
    scaler.scale(sum(model.losses(a, b, y))).backward()
    scaler.step(opt)
    scaler.update()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(p0, p) for p0, p in zip(before, after)), "the step did not happen"
    assert scaler.get_scale() == 2.0**10
    # reference: unscaled step with the same harmonized gradient (PCGrad weights are scale-invariant)
    m2 = Net()
    m2.load_state_dict({k: v for k, v in zip(dict(model.state_dict()).keys(), before)})
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    a, b = harm.branch(m2.h(x), 2)
    sum(m2.losses(a, b, y)).backward()
    opt2.step()
    for p, q in zip(model.parameters(), m2.parameters()):
        close(p, q, 1e-5, msg="scaled step == unscaled step")


def test_branch_gradscaler_overflow_skips_step(gen):
    """An overflowing scale: 'propagate' lets GradScaler see inf and skip; 'raise' raises."""
    torch.manual_seed(0)
    model = Net()
    x, y = _data(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    harm = gh.Harmonizer("pcgrad", backend="torch", nonfinite="propagate")
    before = [p.detach().clone() for p in model.parameters()]
    a, b = harm.branch(model.h(x), 2)
    # x 1e6 so that the scaled gradients overflow float32 whatever the drawn data
    scaler.scale(1e6 * sum(model.losses(a, b, y))).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p0, p) for p0, p in zip(before, model.parameters())), "step not skipped"
    assert scaler.get_scale() < 3e38
    harm = gh.Harmonizer("pcgrad", backend="torch")
    a, b = harm.branch(model.h(x), 2)
    with pytest.raises(gh.NonFiniteGradientError):
        (torch.tensor(float("inf")) * sum(model.losses(a, b, y))).backward()


def test_branch_gradvac_state_and_curriculum(gen):
    torch.manual_seed(0)
    model = Net(F64)
    x, y = _data(gen, dtype=F64)
    cur = gh.ConflictCurriculum(start=0.5, ramp_steps=10)
    harm = gh.Harmonizer(gh.GradVac(beta=0.5, order="fixed"), curriculum=cur, backend="torch")
    h = model.h(x).detach().requires_grad_(True)
    a, b = harm.branch(h, 2)
    sum(model.losses(a, b, y)).backward()
    res = harm.last_result
    dropped = res.sample_weights == 0
    assert int(dropped.sum()) == 3  # B = 6, keep half
    assert (h.grad[dropped] == 0).all() and (h.grad[~dropped].abs().sum((1, 2)) > 0).all()
    assert harm.rule.phi_hat is not None and harm.rule.phi_hat[0, 1] != 0
    st = harm.state_dict()
    harm2 = gh.Harmonizer(gh.GradVac(beta=0.5, order="fixed"), curriculum=gh.ConflictCurriculum(start=0.5, ramp_steps=10))
    harm.step()
    harm2.load_state_dict(harm.state_dict())
    assert harm2.curriculum.step_count == 1 and torch.equal(harm2.rule.phi_hat, harm.rule.phi_hat)
    assert st["curriculum"]["step_count"] == 0
