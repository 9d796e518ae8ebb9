"""ParameterHarmonizer: policies, errors and options (small models, float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradharmony as gh
from gradharmony.ghost import ParameterHarmonizer


class NanGradRow(torch.autograd.Function):
    """Identity whose backward turns one row of the incoming gradient into NaN."""

    @staticmethod
    def forward(ctx, x, row):
        ctx.row = row
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[ctx.row] = float("nan")
        return g, None


class Net(nn.Module):
    def __init__(self, bad_row=None) -> None:
        super().__init__()
        self.l1, self.l2, self.bad_row = nn.Linear(5, 7), nn.Linear(7, 2), bad_row

    def forward(self, x):
        h = self.l1(x)
        if self.bad_row is not None:
            h = NanGradRow.apply(h, self.bad_row)
        return self.l2(torch.tanh(h))


def losses(y):
    return [y[:, 0].pow(2).mean() + torch.logsumexp(y[:, 1], 0), (1 - y[:, 1]).pow(2).mean()]


def step(net, ph, x):
    with ph.capture(batch_size=x.shape[0]):
        y = net(x)
    ph.backward(losses(y))


def test_nonfinite_raise_names_the_sample(seed) -> None:
    net = Net(bad_row=2).double()
    ph = ParameterHarmonizer(net, "pcgrad")
    with pytest.raises(gh.NonFiniteGradientError, match="sample 2"):
        step(net, ph, torch.randn(5, 5, dtype=torch.float64))


@pytest.mark.parametrize("policy", ["skip", "zero"])
def test_nonfinite_skip_and_zero_give_finite_gradients(policy, seed) -> None:
    net = Net(bad_row=2).double()
    ph = ParameterHarmonizer(net, "pcgrad", nonfinite=policy)
    step(net, ph, torch.randn(5, 5, dtype=torch.float64))
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    if policy == "skip":
        assert (ph.last_weights[2] == 0).all() and (ph.last_weights[[0, 1, 3, 4]] != 0).any()


def test_nonfinite_propagate_passes_nan_through(seed) -> None:
    net = Net(bad_row=2).double()
    ph = ParameterHarmonizer(net, "pcgrad", nonfinite="propagate")
    step(net, ph, torch.randn(5, 5, dtype=torch.float64))
    assert not torch.isfinite(net.l1.weight.grad).all()


def test_grad_scaler_unscaled_gradients_match(seed) -> None:
    x = torch.randn(6, 5)
    net = Net()
    ref = ParameterHarmonizer(net, "pcgrad")
    step(net, ref, x)
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ph = ParameterHarmonizer(net, "pcgrad", optimizer=opt, scaler=scaler)
    step(net, ph, x)
    scaler.unscale_(opt)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    ph.step()  # scaler.step + update
    assert scaler.get_scale() == 2.0 ** 10


def test_parameter_used_outside_a_call_is_an_error(seed) -> None:
    class Outside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.extra = nn.ParameterDict({"b": nn.Parameter(torch.randn(1, 3))})

        def forward(self, x):
            return self.lin(x) + self.extra["b"]  # neither its module's call nor a module argument

    m = Outside()
    ph = ParameterHarmonizer(m, "pcgrad")
    with ph.capture(batch_size=4):
        y = m(torch.randn(4, 3))
    with pytest.raises(ValueError, match="extra.b"):
        ph.backward([y[:, 0].sum(), y[:, 1].sum()])


def test_root_owned_position_parameter_is_split_per_sample(seed) -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 4, 3))
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x + self.pos).mean(1)

    m = Root().double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    ph = ParameterHarmonizer(m, "sum")
    with ph.capture(batch_size=3):
        y = m(x)
    ph.backward([y[:, 0].sum(), y[:, 1].pow(2).sum()])
    g = m.pos.grad.clone()
    m.zero_grad()
    y = m(x)
    (y[:, 0].sum() + y[:, 1].pow(2).sum()).backward()  # "sum" = the plain gradient
    torch.testing.assert_close(g, m.pos.grad)
    assert m.pos.shape == (1, 4, 3) and isinstance(m.pos, nn.Parameter)  # restored after the call


def test_rows_not_a_multiple_of_the_batch(seed) -> None:
    net = Net()
    ph = ParameterHarmonizer(net, "pcgrad")
    with ph.capture(batch_size=3):
        y = net(torch.randn(4, 5))
    with pytest.raises(ValueError, match="not a multiple of the batch size 3"):
        ph.backward(losses(y))


def test_bad_arguments() -> None:
    net = Net()
    with pytest.raises(ValueError, match="nonfinite"):
        ParameterHarmonizer(net, nonfinite="ignore")
    ph = ParameterHarmonizer(net)
    with pytest.raises(RuntimeError, match="capture"):
        ph.backward(losses(net(torch.randn(2, 5))))
    with pytest.raises(ValueError, match="batch_size"):
        with ph.capture(batch_size=0):
            pass
    with pytest.raises(ValueError, match="K >= 2"):
        ph.backward([torch.ones((), requires_grad=True)])


def test_measure_changes_nothing_and_matches_backward(seed) -> None:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x = torch.randn(6, 5)
    cur = gh.ConflictCurriculum("fraction", start=0.5)
    ph = gh.ParameterHarmonizer(net, "gradvac", curriculum=cur)
    state = copy.deepcopy(ph.state_dict())

    def losses():
        with ph.capture(batch_size=6):
            y = net(x)
        return [y[:, 0].pow(2).mean(), (y[:, 1] - y[:, 2]).pow(2).mean()]

    M, cos = ph.measure(losses())
    assert all(p.grad is None for p in net.parameters()) and ph.last_gram is None and ph.last_stats is None
    assert str(ph.state_dict()) == str(state)
    ph.backward(losses())
    torch.testing.assert_close(M, ph.last_gram)
    torch.testing.assert_close(cos, ph.last_stats.cos.to(cos.dtype))
    d = M.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(cos[:, 0, 1], M[:, 0, 1] / (d[:, 0] * d[:, 1]).sqrt())
