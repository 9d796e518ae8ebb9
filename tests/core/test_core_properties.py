"""Shared property assertions applied to every method (sum, pcgrad, gradvac, cagrad, mgda) on
every live backend (the ``backend`` fixture of tests/conftest.py: torch, cpp, cuda, triton).

The hypothesis searches run on the fast backends (torch, cpp, cuda); under the Triton
interpreter they would take minutes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gradharmony as gh
from _helpers import backend_case
from _asserts import (
    METHODS,
    assert_cos_valid,
    assert_finite,
    assert_grad_matches_weights,
    assert_gram_psd,
    assert_non_conflicting,
    assert_permutation_equivariant,
    assert_reductions_consistent,
    assert_scaling,
    runner,
)

DTYPES = (torch.float32, torch.float64)


def _conflicting(B: int, K: int, D: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random gradients where about half of the pairs conflict (g_1 pushed against g_0)."""
    G = torch.randn(B, K, D, dtype=torch.float64, generator=gen)
    G[:, 1] -= 0.8 * G[:, 0]
    return G.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", [2, 3, 5])
def test_basic_properties(method, dtype, K, gen, backend):
    G = _conflicting(7, K, 41, dtype, gen).to(backend.device)
    backend.skip_unless(G)
    res = runner(method, backend=backend.name)(G)
    assert res.grad.shape == (7, 41) and res.grad.dtype == dtype
    assert res.weights.shape == (7, K) and res.cos.shape == (7, K, K)
    assert res.backend == backend.name
    assert_finite(res, method)
    assert_gram_psd(res, G)
    assert_cos_valid(res, G)
    assert_grad_matches_weights(res, G)
    assert_non_conflicting(method, res, G)
    assert_reductions_consistent(method, G, backend.name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["sum", "pcgrad", "gradvac", "cagrad"])
def test_no_conflict_gives_plain_sum(method, dtype, gen, backend):
    """'sum' has w = 1; PCGrad and GradVac (target 0) leave non-conflicting gradients alone;
    CAGrad with c = 0 is the sum."""
    G = torch.rand(5, 3, 17, dtype=dtype, generator=gen).to(backend.device)  # all cosines > 0
    backend.skip_unless(G)
    rule = gh.get_rule(method, **({"c": 0.0} if method == "cagrad" else {}))
    res = gh.harmonize(G, rule, backend=backend.name)
    torch.testing.assert_close(res.grad, G.sum(1))
    torch.testing.assert_close(res.weights, torch.ones_like(res.weights))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", [2, 4])
def test_permutation_equivariance(method, K, gen, backend):
    dtype = torch.float64 if backend.name != "triton" else torch.float32
    G = _conflicting(9, K, 23, dtype, gen).to(backend.device)
    perm = torch.randperm(9, generator=gen)
    assert_permutation_equivariant(runner(method, backend=backend.name), G, perm)


def test_permutation_equivariance_random_order_k2(gen):
    """With K = 2 every visiting order is the same, so even order='random' is equivariant."""
    G = _conflicting(9, 2, 23, torch.float64, gen)
    perm = torch.randperm(9, generator=gen)

    def run(X):
        return gh.harmonize(X, "pcgrad", backend="torch")  # default order="random"

    assert_permutation_equivariant(run, G, perm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", [2, 3])
def test_scaling_invariance(method, dtype, K, gen, backend):
    G = _conflicting(4, K, 33, dtype, gen).to(backend.device)
    backend.skip_unless(G)
    b = int(torch.randint(4, (1,), generator=gen))
    assert_scaling(method, runner(method, backend=backend.name), G, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e10, 1e20])
def test_whole_batch_at_scale_is_finite(method, dtype, scale, gen, backend):
    """No NaN/inf from finite input: every sample (and the sum reduction) at one scale."""
    G = (_conflicting(6, 3, 50, torch.float64, gen) * scale).to(dtype).to(backend.device)
    backend.skip_unless(G)
    for reduction in ("none", "sum"):
        res = runner(method, reduction, backend.name)(G)
        assert_finite(res, f"{method} {dtype} scale {scale:g} reduction {reduction}")
    base = runner(method, backend=backend.name)(_conflicting(6, 3, 50, torch.float64, gen).to(dtype).to(backend.device))
    assert base.weights.shape == res.weights.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_all_zero_sample_and_zero_loss(method, dtype, gen, backend):
    """An all-zero sample gives a zero row; a zero gradient of one loss conflicts with nothing."""
    G = _conflicting(3, 3, 10, dtype, gen).to(backend.device)
    backend.skip_unless(G)
    G[0] = 0
    G[1, 2] = 0  # one zero loss gradient in sample 1
    res = runner(method, backend=backend.name)(G)
    assert_finite(res, method)
    assert (res.grad[0] == 0).all()
    assert (res.cos[0] == 0).all()
    assert (res.cos[1, 2] == 0).all() and (res.cos[1, :, 2] == 0).all()
    if method in ("pcgrad", "gradvac"):
        # the zero gradient is never projected against and receives nothing
        ref = runner(method, backend=backend.name)(G[1:2, :2])
        torch.testing.assert_close(res.grad[1], ref.grad[0])


@pytest.mark.parametrize("method", METHODS)
def test_mixed_scales_within_batch(method, gen, backend):
    """Samples at 1e-20 and 1e20 in one float32 batch: each as if harmonized alone."""
    G64 = _conflicting(4, 2, 30, torch.float64, gen).to(backend.device)
    scales = torch.tensor([1e-20, 1.0, 1e20, 1e-10], dtype=torch.float64, device=backend.device)
    G = (G64 * scales[:, None, None]).float()
    res = runner(method, backend=backend.name)(G)
    assert_finite(res, method)
    for b in range(4):
        alone = runner(method, backend=backend.name)(G64[b : b + 1].float())
        torch.testing.assert_close(res.weights[b], alone.weights[0], rtol=2e-3, atol=2e-3)


@st.composite
def shapes(draw):
    B = draw(st.integers(0, 9))
    K = draw(st.integers(2, 8))
    D = draw(st.integers(1, 300))
    return B, K, D


FAST_BACKENDS = ("torch", "cpp", "cuda")


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    return backend_case(request.param)


@given(shape=shapes(), method=st.sampled_from(METHODS), dtype=st.sampled_from(DTYPES),
       log_scale=st.sampled_from([-20, -10, 0, 10, 20]), seed=st.integers(0, 2**31 - 1),
       reduction=st.sampled_from(["none", "sum", "mean"]))
def test_hypothesis_shapes(shape, method, dtype, log_scale, seed, reduction, fast_backend):
    B, K, D = shape
    # MGDA/CAGrad solve a K x K problem: keep hypothesis fast but still cover K up to 8.
    assume(not (method in ("cagrad", "mgda") and B * K > 48))
    g = torch.Generator().manual_seed(seed)
    G = (torch.randn(B, K, D, dtype=torch.float64, generator=g) * 10.0**log_scale).to(dtype)
    G = G.to(fast_backend.device)
    res = runner(method, reduction, fast_backend.name)(G)
    expected = (B, D) if reduction == "none" else (D,)
    assert res.grad.shape == expected, f"seed={seed}"
    assert res.weights.shape == (B, K) and res.cos.shape == (B, K, K) and res.gram.shape == (B, K, K)
    assert_finite(res, f"seed={seed}")
    assert_cos_valid(res, G)
    assert_grad_matches_weights(res, G, reduction)
    if B == 0 and reduction != "none":
        assert (res.grad == 0).all()
    if log_scale == 0:
        assert_gram_psd(res, G)
    if reduction == "none":
        assert_non_conflicting(method, res, G)


@st.composite
def degenerate_batch(draw):
    """Structured samples: duplicates, exact opposites, zero rows, collinear, per-loss scales."""
    K = draw(st.integers(2, 5))
    D = draw(st.integers(1, 12))
    B = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(B, K, D, dtype=torch.float64, generator=g)
    for b in range(B):
        for k in range(1, K):
            kind = draw(st.sampled_from(["rand", "dup", "neg", "zero", "collinear", "scaled"]))
            j = draw(st.integers(0, k - 1))
            if kind == "dup":
                G[b, k] = G[b, j]
            elif kind == "neg":
                G[b, k] = -G[b, j]
            elif kind == "zero":
                G[b, k] = 0
            elif kind == "collinear":
                G[b, k] = draw(st.sampled_from([-3.0, -0.5, 0.25, 2.0])) * G[b, j]
            elif kind == "scaled":
                G[b, k] *= 10.0 ** draw(st.sampled_from([-12, -6, 6, 12]))
    return G, seed


@given(data=degenerate_batch(), method=st.sampled_from(METHODS), dtype=st.sampled_from(DTYPES))
def test_hypothesis_degenerate(data, method, dtype, fast_backend):
    G64, seed = data
    if dtype == torch.float32:
        # float32 holds squared norms over ~1e76 only: within one sample keep the losses'
        # norms within 1e15 of each other (the engine rescales a sample by its largest entry)
        n = G64.norm(dim=-1)
        nz = torch.where(n > 0, n, torch.full_like(n, torch.inf))
        assume(bool((n.amax(-1) <= 1e15 * nz.amin(-1)).all()))
    G = G64.to(dtype).to(fast_backend.device)
    res = runner(method, backend=fast_backend.name)(G)
    assert_finite(res, f"seed={seed}")
    assert_cos_valid(res, G)
    assert_grad_matches_weights(res, G)
    if dtype == torch.float64:
        assert_non_conflicting(method, res, G)
    if method == "mgda" and dtype == torch.float64:
        import _oracles as O

        K = G.shape[1]
        for b in range(G.shape[0]):
            d_star = O.min_norm_point(G64[b])
            scale = float(G64[b].norm(dim=-1).max())
            d = res.grad[b] / K
            assert float(d.norm()) <= float(d_star.norm()) + 1e-6 * scale, f"seed={seed} sample {b}: not min-norm"
