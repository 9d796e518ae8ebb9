"""Bad input, non-finite gradients and names."""

from __future__ import annotations

import pytest
import torch

import gradharmony as gh
from _asserts import METHODS, close, runner

F64 = torch.float64


def _G(B, K, D, gen, dtype=F64):
    G = torch.randn(B, K, D, generator=gen, dtype=F64)
    G[:, 1] -= 0.6 * G[:, 0]
    return G.to(dtype)


def test_k_less_than_two(gen):
    with pytest.raises(ValueError, match="K >= 2"):
        gh.harmonize(torch.randn(3, 1, 4), backend="torch")
    with pytest.raises(ValueError, match="K >= 2"):
        gh.harmonize([torch.randn(3, 4)], backend="torch")
    with pytest.raises(ValueError, match=r"\(B, K, D\)"):
        gh.harmonize(torch.randn(3, 4), backend="torch")


def test_mismatched_shapes_name_loss_and_shape():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"loss 2 has batch size \(5, 4\)"):
        gh.harmonize([a, b, torch.randn(5, 4)], backend="torch")
    with pytest.raises(ValueError, match=r"loss 1 has shape \(3, 5\)"):
        gh.harmonize([a, torch.randn(3, 5)], backend="torch")
    with pytest.raises(ValueError, match=r"loss 1 has shape \(3, 2, 2\)"):  # same numel, other shape
        gh.harmonize([a, torch.randn(3, 2, 2)], backend="torch")


def test_dtypes():
    with pytest.raises(TypeError, match="floating"):
        gh.harmonize(torch.ones(2, 2, 3, dtype=torch.int64), backend="torch")
    with pytest.raises(TypeError, match="loss 1"):
        gh.harmonize([torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int32)], backend="torch")
    with pytest.raises(TypeError, match="loss 1 has dtype torch.float64"):
        gh.harmonize([torch.randn(2, 3), torch.randn(2, 3, dtype=F64)], backend="torch")
    with pytest.raises(TypeError, match="loss 1"):
        gh.harmonize([torch.randn(2, 3), [1.0, 2.0]], backend="torch")
    with pytest.raises(TypeError):
        gh.harmonize("not a tensor", backend="torch")
    with pytest.raises(TypeError):
        gh.harmonize(torch.ones(2, 2, 3, dtype=torch.bool), backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need a GPU")
def test_mixed_devices():
    with pytest.raises(ValueError, match="loss 1"):
        gh.harmonize([torch.randn(2, 3), torch.randn(2, 3, device="cuda")], backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, gen):
    G = _G(5, 3, 40, gen)
    res = gh.harmonize(G.to(dtype), "pcgrad", order="fixed", backend="torch")
    ref = gh.harmonize(G.to(dtype).to(F64), "pcgrad", order="fixed", backend="torch")
    assert res.grad.dtype == dtype and res.gram.dtype == torch.float32
    close(res.grad, ref.grad, 2e-2, msg=f"{dtype} vs float64 on the same rounded input")


def test_unknown_names(gen):
    G = _G(2, 2, 3, gen)
    with pytest.raises(ValueError, match="unknown method"):
        gh.harmonize(G, "pcgrd", backend="torch")
    with pytest.raises(ValueError, match="reduction"):
        gh.harmonize(G, reduction="avg", backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        gh.harmonize(G, backend="fortran")
    with pytest.raises(ValueError, match="nonfinite"):
        gh.harmonize(G, nonfinite="ignore", backend="torch")
    with pytest.raises(ValueError, match="order"):
        gh.harmonize(G, "pcgrad", order="sorted", backend="torch")
    with pytest.raises(TypeError, match="bad options"):
        gh.harmonize(G, "pcgrad", c=0.4, backend="torch")
    with pytest.raises(ValueError):
        gh.harmonize(G, gh.PCGrad(), order="fixed", backend="torch")  # options with an instance
    with pytest.raises(ValueError):
        gh.GradVac(beta=1.5)
    with pytest.raises(ValueError):
        gh.CAGrad(c=-1)
    with pytest.raises(TypeError):
        gh.harmonize(G, curriculum="fraction", backend="torch")


def test_gradvac_state_for_other_k(gen):
    rule = gh.GradVac()
    gh.harmonize(_G(2, 2, 3, gen), rule, backend="torch")
    with pytest.raises(ValueError, match="K=2"):
        gh.harmonize(_G(2, 3, 3, gen), rule, backend="torch")
    rule.reset()
    gh.harmonize(_G(2, 3, 3, gen), rule, backend="torch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raises_naming_loss_and_sample(bad, gen):
    G = _G(5, 3, 7, gen)
    G[3, 2, 4] = bad
    with pytest.raises(gh.NonFiniteGradientError, match="loss 2 for sample 3") as ei:
        gh.harmonize(G, "pcgrad", backend="torch")
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_nonfinite_skip(method, dtype, gen):
    """'skip': weight 0, output row 0, the rest exactly as without the sample."""
    G = _G(6, 3, 9, gen, dtype)
    G[2, 1, 0] = float("nan")
    G[4, 0, 3] = float("inf")
    keep = torch.tensor([0, 1, 3, 5])
    res = runner(method, nonfinite="skip")(G)
    ref = runner(method)(G[keep])
    assert (res.weights[[2, 4]] == 0).all() and (res.grad[[2, 4]] == 0).all()
    assert torch.isfinite(res.grad).all() and torch.isfinite(res.cos).all()
    close(res.grad[keep], ref.grad, 1e-6, msg="skip: other rows")
    close(res.weights[keep], ref.weights, 1e-6, scale=1.0, msg="skip: other weights")
    assert sorted(res.nonfinite_samples.tolist()) == [2, 4]
    res_sum = runner(method, "sum", nonfinite="skip")(G)
    close(res_sum.grad, ref.grad.sum(0), 1e-6, msg="skip: reduction sum")


def test_nonfinite_skip_gradvac_ema_ignores_sample(gen):
    G = _G(4, 2, 9, gen)
    Gbad = G.clone()
    Gbad[1, 0, 0] = float("nan")
    r1, r2 = gh.GradVac(beta=0.5), gh.GradVac(beta=0.5)
    gh.harmonize(Gbad, r1, nonfinite="skip", backend="torch")
    gh.harmonize(G[[0, 2, 3]], r2, backend="torch")
    close(r1.phi_hat, r2.phi_hat, 1e-12, scale=1.0, msg="EMA with a skipped sample")


def test_nonfinite_skip_with_curriculum(gen):
    """A skipped sample is out of the batch for the curriculum too (quantile and normalization)."""
    G = _G(8, 2, 9, gen)
    G[5, 1, 2] = float("nan")
    keep = torch.tensor([0, 1, 2, 3, 4, 6, 7])
    res = gh.harmonize(G, "pcgrad", nonfinite="skip", backend="torch",
                       curriculum=gh.ConflictCurriculum(start=0.5))
    ref = gh.harmonize(G[keep], "pcgrad", backend="torch", curriculum=gh.ConflictCurriculum(start=0.5))
    assert (res.grad[5] == 0).all() and res.weights[5].abs().sum() == 0
    close(res.grad[keep], ref.grad, 1e-12, msg="skip + curriculum: other rows")
    assert res.sample_weights[keep].sum() == pytest.approx(len(keep))


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_zero(method, gen):
    G = _G(5, 3, 9, gen)
    Gb = G.clone()
    Gb[1, 2, 4] = float("nan")
    Gb[3, 0, 0] = float("-inf")
    Gz = torch.nan_to_num(Gb, nan=0.0, posinf=0.0, neginf=0.0)
    res = runner(method, nonfinite="zero")(Gb)
    ref = runner(method)(Gz)
    close(res.grad, ref.grad, 1e-12, msg="zero == harmonize of the zeroed gradients")
    assert torch.isfinite(res.grad).all()


@pytest.mark.parametrize("method", ["sum", "pcgrad", "gradvac", "cagrad", "mgda"])
def test_nonfinite_propagate(method, gen):
    """'propagate': NaN/inf reach only that sample's row; the other rows are unchanged."""
    G = _G(5, 2, 9, gen)
    G[0, 0] *= 1e-25  # a tiny sample in the same batch still goes through the rescaling repair
    Gb = G.clone()
    Gb[2, 1, 3] = float("inf")
    res = runner(method, nonfinite="propagate")(Gb)
    ref = runner(method)(G)
    others = torch.tensor([0, 1, 3, 4])
    close(res.grad[others], ref.grad[others], 1e-12, msg="propagate: other rows")
    assert not torch.isfinite(res.grad[2]).all(), "the non-finite sample must stay non-finite"
    res_sum = runner(method, "sum", nonfinite="propagate")(Gb)
    assert not torch.isfinite(res_sum.grad).all(), "propagate must reach the summed gradient (GradScaler)"


def test_trailing_dims_are_flattened(gen):
    G = torch.randn(4, 3, 2, 5, generator=gen, dtype=F64)
    a = gh.harmonize(G, "pcgrad", order="fixed", backend="torch")
    b = gh.harmonize(G.reshape(4, 3, 10), "pcgrad", order="fixed", backend="torch")
    c = gh.harmonize([G[:, k] for k in range(3)], "pcgrad", order="fixed", backend="torch")
    assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, c.grad) and a.grad.shape == (4, 10)
    nc = torch.randn(4, 5, 3, generator=gen, dtype=F64).transpose(1, 2)  # non-contiguous (4, 3, 5)
    torch.testing.assert_close(gh.harmonize(nc, "pcgrad", order="fixed", backend="torch").grad,
                               gh.harmonize(nc.contiguous(), "pcgrad", order="fixed", backend="torch").grad)


@pytest.mark.parametrize("method", METHODS)
def test_zero_width_gradients(method):
    """D = 0 (e.g. K tensors of shape (B, 0)): zero gradients, which conflict with nothing.
    Regression: the health check's rescaled re-solve reduced amax over an empty dim and
    raised IndexError on every backend."""
    backends = [b for b, st in gh.available_backends().items() if st == "available" and b in ("torch", "cpp")]
    for be in backends:
        for cur in (None, gh.ConflictCurriculum()):
            for red in ("none", "mean"):
                r = gh.harmonize(torch.zeros(3, 2, 0), method, backend=be, curriculum=cur, reduction=red)
                assert r.grad.shape == ((3, 0) if red == "none" else (0,))
                assert torch.isfinite(r.weights).all() and (r.cos == 0).all(), (be, r.weights, r.cos)


def test_env_backend_is_honoured_and_named_in_errors(gen, monkeypatch):
    # regression: GRADHARMONY_BACKEND had no test, and a bad value raised an error that did
    # not say it came from the environment (the caller passed backend="auto")
    G = _G(3, 2, 5, gen, torch.float32)
    monkeypatch.setenv("GRADHARMONY_BACKEND", "torch")
    assert gh.harmonize(G, "pcgrad").backend == "torch"
    assert gh.Harmonizer("sum").branch(G[:, 0].clone().requires_grad_(), 2)[0].shape == (3, 5)
    monkeypatch.setenv("GRADHARMONY_BACKEND", "fortran")
    with pytest.raises(ValueError, match="unknown backend 'fortran'.*GRADHARMONY_BACKEND"):
        gh.harmonize(G, "pcgrad")
    assert gh.harmonize(G, "pcgrad", backend="torch").backend == "torch"  # an explicit name wins
    if not torch.cuda.is_available():
        monkeypatch.setenv("GRADHARMONY_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available.*GRADHARMONY_BACKEND"):
            gh.harmonize(G, "pcgrad")
        monkeypatch.delenv("GRADHARMONY_BACKEND")
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available") as e:
            gh.harmonize(G, "pcgrad", backend="cuda")
        assert "GRADHARMONY_BACKEND" not in str(e.value)


def test_info_reports_a_forced_backend(monkeypatch):
    # regression: with GRADHARMONY_BACKEND set, `python -m gradharmony.info` still printed the
    # auto preference lists as if nothing were forced, even for an unknown name
    from gradharmony.info import report

    monkeypatch.delenv("GRADHARMONY_BACKEND", raising=False)
    assert "auto on cpu: first live of cpp, torch" in report()
    monkeypatch.setenv("GRADHARMONY_BACKEND", "torch")
    text = report()
    assert "auto: forced to 'torch' by GRADHARMONY_BACKEND" in text and "auto on cpu" not in text
    monkeypatch.setenv("GRADHARMONY_BACKEND", "fortran")
    assert "GRADHARMONY_BACKEND is unusable here" in report() and "unknown backend 'fortran'" in report()
