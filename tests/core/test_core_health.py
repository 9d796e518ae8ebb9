"""The health check: scale disparity inside one sample (per-row rescale) and no host sync.

- A row 1e-30..1e30 of another in the same sample: every rule, every backend, float32 and
  float64, host and device check, against a float64 oracle (the same input in float64, or
  scaled by an exact power of two into the range where no repair runs).
- The device check (no host sync) gives what the host check gives, for every policy.
- ``harmonize`` on the torch backend traces under ``torch.compile(fullgraph=True)`` (a host
  sync is a graph break, so fullgraph fails if one comes back); on CUDA, the same under
  ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradharmony as gh
from gradharmony.engine import core
from _asserts import close
from _oracles import pcgrad_sample

F32, F64 = torch.float32, torch.float64
RULES = ("sum", "pcgrad", "gradvac", "cagrad", "mgda", "upgrad")
#: rules whose harmonize traces without a graph break (CAGrad: see README, "Numerics")
FULLGRAPH_RULES = ("sum", "pcgrad", "gradvac", "mgda", "upgrad")
SYNC_FREE = ("skip", "zero", "propagate")


def _rule(method: str, K: int) -> gh.Rule:
    if method in ("pcgrad", "gradvac"):
        rule = gh.get_rule(method, order="fixed")
        if method == "gradvac":
            t = torch.full((K, K), 0.3, dtype=F64)
            t.fill_diagonal_(0)
            rule.phi_hat = t  # type: ignore[attr-defined]
        return rule
    return gh.get_rule(method)


@pytest.fixture(params=["host", "device"])
def check(request, monkeypatch):
    """Where the health check runs (``nonfinite="skip"`` in these tests allows both)."""
    monkeypatch.setattr(core, "DEVICE_CHECK", request.param == "device")
    return request.param


def _issue_input(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, generator=g, dtype=F64)
    other = -base + 0.3 * torch.randn(64, generator=g, dtype=F64)
    return torch.stack([base, 1e-25 * other]).unsqueeze(0)  # (1, 2, 64), cos ~ -0.96


@pytest.mark.parametrize("dtype", [F32, F64])
def test_issue_input_pcgrad_projects(backend, check, dtype, seed):
    """G = [base, 1e-25 other]: the cosine is the true one and PCGrad projects (it used to
    see the small row as zero: cos 0, no projection, relative error 3.6)."""
    G64 = _issue_input(seed)
    G = G64.to(dtype)
    backend.skip_unless(G)
    res = gh.harmonize(G.to(backend.device), "pcgrad", backend=backend.name, nonfinite="skip")
    Gq = G.to(F64)  # the input as given, in float64
    cos = float(Gq[0, 0] @ Gq[0, 1] / (Gq[0, 0].norm() * Gq[0, 1].norm()))
    assert cos < -0.5
    assert abs(float(res.cos[0, 0, 1]) - cos) <= (1e-5 if dtype == F32 else 1e-12)
    assert res.stats.conflict_fraction == 1.0
    ref = pcgrad_sample(Gq[0])
    rel = float((res.grad[0].cpu().to(F64) - ref).norm() / ref.norm())
    assert rel <= (1e-5 if dtype == F32 else 1e-12), f"relative error {rel}"


def _disparate(B: int, K: int, D: int, seed: int, dtype) -> torch.Tensor:
    """Rows scaled by 10^U(-20, 10): disparities up to 1e30 between two rows of a sample (the
    weights are in the accumulation dtype: a ratio beyond ~1e38 overflows a float32 weight),
    float32 squared norms that underflow in most samples."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(B, K, D, generator=g, dtype=F64)
    e = torch.empty(B, K, dtype=F64).uniform_(-20, 10, generator=g)
    e[0, :2] = torch.tensor([5.0, -20.0])  # the issue's disparity (1e-25) in every run
    return (G * torch.pow(10.0, e).unsqueeze(-1)).to(dtype)


def _oracle(method: str, G: torch.Tensor):
    """float64 result on the same numbers, scaled by an exact power of two into the range where
    the float64 Gram needs no repair (every rule is homogeneous of degree 1 in each sample)."""
    G64 = G.to(F64)
    amax = G64.abs().flatten(1).amax(-1).clamp_min(1e-300)
    p = torch.pow(2.0, -torch.floor(torch.log2(amax)))  # largest entry of each sample in [1, 2)
    res = gh.harmonize(G64 * p.view(-1, 1, 1), _rule(method, G.shape[1]), backend="torch")
    return res.grad / p.view(-1, 1), res.cos


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", RULES)
def test_scale_disparity_every_rule(backend, check, method, dtype, seed):
    """Random within-sample disparities 1e-30..1e30: as the float64 oracle, per sample, NaN-free."""
    K = 3 if method != "sum" else 2
    G = _disparate(5, K, 24, seed, dtype)
    if dtype == F64:  # push the float64 squared norms out of range too: the repair must run
        G = G * 1e-135
    backend.skip_unless(G)
    res = gh.harmonize(G.to(backend.device), _rule(method, K), backend=backend.name, nonfinite="skip")
    ref, ref_cos = _oracle(method, G)
    grad, cos = res.grad.cpu(), res.cos.cpu()
    assert torch.isfinite(grad).all() and torch.isfinite(cos).all()
    tol = {F32: 2e-3 if method == "cagrad" else 2e-4, F64: 1e-6 if method == "cagrad" else 1e-9}[dtype]
    close(cos, ref_cos, tol, scale=1.0, msg=f"{method} cos")
    d = G.to(F64).square().sum(-1)
    repaired = ((d < (1e-30 if dtype == F32 else 1e-280)) | (d > (1e36 if dtype == F32 else 1e280))).any(-1)
    assert repaired[0], "the repair must run"
    for b in range(G.shape[0]):
        if method == "cagrad" and dtype == F32 and not repaired[b]:
            # solved on the float32 Gram: CAGrad's stationarity test resolves no hull point
            # below sqrt(eps) of the rows, so a disparity beyond ~1e4 is decided at that resolution
            continue
        close(grad[b], ref[b], tol, msg=f"{method} grad of sample {b}")


def _mixed(seed: int, dtype) -> torch.Tensor:
    """Healthy samples, an underflowing row, an overflowing sample, a NaN and an inf."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(7, 2, 16, generator=g, dtype=F64)
    G[1, 1] *= 1e-25
    G[2] *= 1e21 if dtype == F32 else 1e160
    G[3, 0, 5] = math.nan
    G[5, 1, 2] = math.inf
    return G.to(dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("nonfinite", SYNC_FREE)
@pytest.mark.parametrize("method", RULES)
def test_device_check_equals_host_check(method, nonfinite, dtype, seed, monkeypatch):
    G = _mixed(seed, dtype)
    out = {}
    for where in ("host", "device"):
        monkeypatch.setattr(core, "DEVICE_CHECK", where == "device")
        for red in ("none", "sum"):
            out[where, red] = gh.harmonize(G, _rule(method, 2), backend="torch", nonfinite=nonfinite, reduction=red)
    tol = 2e-3 if method == "cagrad" and dtype == F32 else (2e-4 if dtype == F32 else 1e-9)
    h, d = out["host", "none"], out["device", "none"]
    assert h.nonfinite_samples.tolist() == d.nonfinite_samples.tolist() == [3, 5]
    fin = torch.tensor([0, 1, 2, 4, 6])
    for b in fin.tolist():
        close(d.grad[b], h.grad[b], tol, msg=f"{method} {nonfinite} sample {b}")
    close(d.cos[fin], h.cos[fin], tol, scale=1.0, msg="cos")
    if nonfinite == "propagate":
        assert not torch.isfinite(d.grad[[3, 5]]).all(dim=-1).any()
        assert not torch.isfinite(out["device", "sum"].grad).all()
    else:
        close(d.grad[[3, 5]], h.grad[[3, 5]], tol, msg=f"{nonfinite} repaired samples")
        close(out["device", "sum"].grad, out["host", "sum"].grad, tol, msg="sum")
        assert torch.isfinite(d.grad).all() and torch.isfinite(d.cos).all()


@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e10, 1e20])
@pytest.mark.parametrize("nonfinite", SYNC_FREE)
def test_device_check_no_nan_at_any_scale(scale, nonfinite, seed, monkeypatch):
    monkeypatch.setattr(core, "DEVICE_CHECK", True)
    G = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(seed)) * scale
    for method in RULES:
        r = gh.harmonize(G, _rule(method, 3), backend="torch", nonfinite=nonfinite)
        assert torch.isfinite(r.grad).all() and torch.isfinite(r.cos).all(), method
        ref = gh.harmonize(G.double() / scale, _rule(method, 3), backend="torch").grad * scale
        close(r.grad, ref, 2e-3 if method == "cagrad" else 2e-4, msg=f"{method} at scale {scale}")


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
def test_row_scaled_gram_chunked(dtype, seed, monkeypatch):
    """The device check's Gram over D in chunks (one with a remainder) equals the unchunked one."""
    G = torch.randn(3, 2, 50, generator=torch.Generator().manual_seed(seed)).to(dtype)
    G[1, 1] *= 1e-25 if dtype != torch.bfloat16 else 1e-20
    s = core._row_scales(G)
    whole = core._row_scaled_gram(G, s)
    monkeypatch.setattr(core, "_CHUNK_ENTRIES", 6 * 16)  # chunks of 16 columns: 16+16+16+2
    chunked = core._row_scaled_gram(G, s)
    close(chunked, whole, 1e-6, msg="chunked Gram")
    ref = ((G.double() / s.double().unsqueeze(-1)) @ (G.double() / s.double().unsqueeze(-1)).transpose(1, 2))
    close(chunked, ref, 1e-6 if dtype == F32 else (1e-12 if dtype == F64 else 1e-2), msg="vs float64")


def _fn(method: str, K: int, nonfinite: str):
    # a short active-set cap keeps the traced (unrolled) loop small; the code path is the same
    rule = gh.get_rule(method, max_iter=6) if method in ("mgda", "upgrad") else _rule(method, K)

    def f(G):
        r = gh.harmonize(G, rule, backend="torch", nonfinite=nonfinite)
        return r.grad, r.cos, r.weights, r.gram

    return f


@pytest.mark.parametrize("nonfinite", SYNC_FREE)
@pytest.mark.parametrize("method", FULLGRAPH_RULES)
def test_fullgraph_no_host_sync(method, nonfinite, seed):
    """harmonize traces as one graph: any host read (.item(), bool(tensor), .tolist(),
    data-dependent shapes) is a graph break, an error under fullgraph=True."""
    torch._dynamo.reset()
    G = _mixed(seed, F32)
    K = G.shape[1]
    got = torch.compile(_fn(method, K, nonfinite), fullgraph=True, backend="eager")(G)
    core_dc = core.DEVICE_CHECK
    try:  # eager on the device check: the same numbers
        core.DEVICE_CHECK = True
        want = _fn(method, K, nonfinite)(G)
    finally:
        core.DEVICE_CHECK = core_dc
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_raise_keeps_the_host_check():
    """"raise" is a host decision: it never takes the device check."""
    G = torch.randn(2, 2, 4, device="meta")
    assert not core.use_device_check(G, "raise")
    assert core.use_device_check(G, "skip")
    with pytest.raises(ValueError, match="raise"):
        core.health_check(torch.randn(2, 2, 4), None, "raise", device=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("nonfinite", SYNC_FREE)
@pytest.mark.parametrize("method", ["sum", "pcgrad", "gradvac"])
def test_cuda_no_host_sync(method, nonfinite):
    """On CUDA, harmonize (every available backend) runs under set_sync_debug_mode("error")."""
    from gradharmony.engine.backends import available_backends

    G = torch.randn(64, 2, 4096, device="cuda")
    G[3, 1] *= 1e-25
    G[5, 0, 7] = math.nan
    for be in ("torch", "cuda", "triton"):
        if not available_backends().get(be, "").startswith("available"):
            continue
        rule = _rule(method, 2)
        gh.harmonize(G, rule, backend=be, nonfinite=nonfinite)  # warm-up: loads, caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            r = gh.harmonize(G, rule, backend=be, nonfinite=nonfinite, reduction="sum")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(r.grad).all() or nonfinite == "propagate"


class _HostReads:
    """Counts the host reads of tensor values in eager mode (what stalls a CUDA stream):
    .item(), .tolist(), bool/int/float of a tensor, nonzero and boolean-mask indexing."""

    def __init__(self, monkeypatch):
        self.n = 0
        T = torch.Tensor
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
            self._wrap(monkeypatch, T, name)
        self._wrap(monkeypatch, torch, "nonzero")
        get = T.__getitem__

        def getitem(t, idx):
            items = idx if isinstance(idx, tuple) else (idx,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
                self.n += 1
            return get(t, idx)

        monkeypatch.setattr(T, "__getitem__", getitem)

    def _wrap(self, monkeypatch, owner, name):
        f = getattr(owner, name)

        def counted(*a, **k):
            self.n += 1
            return f(*a, **k)

        monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("nonfinite", ["raise", *SYNC_FREE])
@pytest.mark.parametrize("method", ["sum", "pcgrad", "gradvac"])
def test_host_reads_per_call(backend, method, nonfinite, seed, monkeypatch):
    """Eager, every backend: one host read under "raise" (finite input needing no repair),
    none under the device check (the code that runs on an accelerator) with a 1e-25 row and a
    NaN sample. (MGDA/UPGrad read their early exit in eager; CAGrad its root search.)"""
    G = torch.randn(6, 2, 40, generator=torch.Generator().manual_seed(seed))
    if nonfinite != "raise":
        G[1, 1] *= 1e-25
        G[4, 0, 3] = math.nan
    backend.skip_unless(G)
    G = G.to(backend.device)
    rule = _rule(method, 2)
    gh.harmonize(G, rule, backend=backend.name, nonfinite="skip")  # loads and caches first
    monkeypatch.setattr(core, "DEVICE_CHECK", True)
    reads = _HostReads(monkeypatch)
    for reduction in ("none", "sum"):
        gh.harmonize(G, rule, backend=backend.name, nonfinite=nonfinite, reduction=reduction)
    assert reads.n == (2 if nonfinite == "raise" else 0), f"{reads.n} host reads in two calls"
