"""Triton kernels (gradharmony/kernels/triton_*.py) vs the pure-PyTorch reference.

Without a CUDA GPU the kernels run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set below before triton is imported): shapes stay small.
With a GPU the same table runs compiled on CUDA tensors, plus the ``gpu``-marked tests
at the sizes of DESIGN.md.

Every test draws fresh random inputs from a seed that is printed on failure; rerun one
with ``GRADHARMONY_TEST_SEED=<seed>``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from gradharmony.engine import reference  # noqa: E402
from gradharmony.kernels import triton_gram  # noqa: E402
from gradharmony.kernels import triton_harmonize as th  # noqa: E402
from gradharmony.kernels import triton_launch as TL  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    from triton.runtime.interpreter import InterpretedFunction
if INTERPRET and not isinstance(triton_gram._gram_kernel, InterpretedFunction):
    # imported earlier (by another test module) before TRITON_INTERPRET was set
    from gradharmony.kernels import triton_combine, triton_fused, triton_solve

    for _mod in (TL, triton_gram, triton_solve, triton_combine, triton_fused, th):
        importlib.reload(_mod)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("no CUDA GPU and TRITON_INTERPRET=0", allow_module_level=True)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

F32_EPS = torch.finfo(torch.float32).eps
#: Under the interpreter the whole table runs; compiled (GPU), each kernel specialization
#: costs JIT time (about 0.5 s), so K in {5, 8} keeps two (K, D) pairs unless this is set.
FULL_TABLE = os.environ.get("GRADHARMONY_TEST_FULL", "1" if INTERPRET else "0") == "1"


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _seed() -> int:
    env = os.environ.get("GRADHARMONY_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


class Inputs:
    """Fresh random inputs of one case, drawn from ``seed`` (printed in every message)."""

    def __init__(self, B, K, D, dtype=torch.float32, scale=1.0, zero_rows=True, seed=None):
        self.seed = _seed() if seed is None else seed
        gen = torch.Generator().manual_seed(self.seed)
        G = torch.randn(B, K, D, generator=gen, dtype=torch.float64) * scale
        if zero_rows and B * K > 1:
            # zero about one row in five (a loss without gradient for that sample)
            z = torch.rand(B, K, generator=gen) < 0.2
            G[z] = 0
        self.G = G.to(dtype).to(DEVICE)
        self.order = torch.stack(
            [torch.stack([torch.randperm(K, generator=gen) for _ in range(K)]) for _ in range(B)]
        ).to(DEVICE)
        self.target = (torch.rand(K, K, generator=gen) * 1.1 - 0.3).to(DEVICE)  # in [-0.3, 0.8]
        self.w = (torch.randn(B, K, generator=gen) * 2).to(DEVICE)
        self.tag = f"seed={self.seed} B={B} K={K} D={D} dtype={dtype} scale={scale:g}"


def _assert_close(actual, expected, rtol, what, tag, atol=0.0, scale=None):
    """|a - e| <= atol + rtol * scale elementwise (scale: max|e| unless given); shows the
    worst ones."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape} ({tag})"
    a = actual.double().cpu()
    e = expected.double().cpu()
    assert torch.isfinite(a).all() or not torch.isfinite(e).all(), f"{what}: non-finite ({tag})"
    if scale is None:
        scale = e.abs().max().item() if e.numel() else 0.0
    bound = atol + rtol * scale
    err = (a - e).abs()
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = [f"  {tuple(i)}: got {a[tuple(i)].item():.9g} want {e[tuple(i)].item():.9g}" for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} beyond {bound:.3g} "
            f"(max err {err.max().item():.3g}) [{tag}]\n" + "\n".join(rows)
        )


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Block sizes small enough that the looping / multi-chunk code runs on tiny D."""
    monkeypatch.setattr(TL, "_BLOCK_OVERRIDE", 16)  # BLOCK_D = 16 everywhere
    monkeypatch.setattr(TL, "_CHUNK", 48)  # several Gram / combine chunks per row
    monkeypatch.setattr(TL, "_MIN_PROGRAMS", 8)
    monkeypatch.setattr(TL, "_MIN_SUM_PROGRAMS", 2)  # several samples per program


# (K, D) table; B cycles over {1, 3, 5}; path alternates small / large; two cases in three
# use tiny blocks (multi-tile / multi-chunk code), the others the real configs
KD = [(K, D) for K in (2, 3, 5, 8) for D in (1, 7, 100, 257)]
BS = (1, 3, 5)


def _cases():
    out = []
    for n, (K, D) in enumerate(KD):
        if not FULL_TABLE and K > 3 and (K, D) not in ((5, 7), (8, 257)):
            continue  # compiled: every specialization costs JIT time
        for method in (0, 1, 2):
            B = BS[(n + method) % 3]
            path = ("small", "large")[(n + method) % 2]
            blocks = "default" if (n + method + n // 4) % 3 == 0 else "tiny"
            out.append(
                pytest.param(B, K, D, method, path, blocks, id=f"B{B}-K{K}-D{D}-m{method}-{path}-{blocks}")
            )
    return out


def _check_fused(inp: Inputs, method, path, reduction, with_order=True, rtol=2e-5, solve=False):
    """fused_forward (and, with ``solve``, solve_forward: its M, cos, w, phi) vs the reference."""
    order = inp.order if with_order else None
    target = inp.target if method == 2 else None
    got = th.fused_forward(inp.G, method, order, target, reduction, path=path)
    want = reference.fused(inp.G, method, order, target, reduction)
    tag = f"{inp.tag} method={method} path={path} reduction={reduction} order={with_order}"
    if solve:
        _check_result((got[0], *th.solve_forward(inp.G, method, order, target)), want, inp, method,
                      reduction, rtol, f"solve_forward {tag}")
    _check_result(got, want, inp, method, reduction, rtol, tag)


def _check_result(got, want, inp: Inputs, method, reduction, rtol, tag):
    out, M, cos, w, phi = got
    r_out, r_M, r_cos, r_w, r_phi = want
    assert out.dtype == inp.G.dtype and M.dtype == cos.dtype == w.dtype == torch.float32, tag
    D = inp.G.shape[-1]
    # Gram: float32 sums of D products; error relative to sqrt(M_ii M_jj)
    dm = r_M.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    norm = (dm[:, :, None] * dm[:, None, :]).double().cpu()
    m_err = (M.double().cpu() - r_M.double().cpu()).abs()
    m_bound = 8 * F32_EPS * max(1.0, D**0.5) * norm + 64 * 1.5e-45 * D
    assert (m_err <= m_bound).all(), f"M: max err {m_err.max().item():.3g} [{tag}]"
    _assert_close(cos, r_cos, rtol * 10, "cos", tag, atol=1e-6)
    # GradVac at |cos| = 1 (D = 1: all rows parallel) is ill-conditioned:
    # sqrt(1 - phi^2) turns the last bit of phi into ~sqrt(2 eps) ~ 5e-4
    wtol = 1e-2 if (method == 2 and D == 1) else rtol * 10
    _assert_close(w, r_w, wtol, "w", tag, atol=1e-6)
    if method == 2:
        assert phi is not None and phi.shape == r_phi.shape, tag
        if D > 1:  # D = 1: rows are parallel, g'_i cancels to rounding noise and so does phi
            _assert_close(phi, r_phi, rtol * 10, "phi", tag, atol=1e-6)
        assert (phi.diagonal(dim1=1, dim2=2) == 0).all(), f"phi diagonal not 0 [{tag}]"
    else:
        assert phi is None, tag
    # out = sum of products that may cancel: error relative to the sum of magnitudes
    mag = reference.combine(inp.G.double().abs(), r_w.double().abs(), reduction).max().item()
    _assert_close(out, r_out, wtol, "out", tag, scale=mag)


# ----------------------------------------------------------------------------------------
# float32 vs the reference over the table
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,K,D,method,path,blocks", _cases())
def test_fused_matches_reference(B, K, D, method, path, blocks, request):
    if blocks == "tiny":
        request.getfixturevalue("tiny_blocks")
    inp = Inputs(B, K, D)
    for reduction in ("none", "sum"):
        _check_fused(inp, method, path, reduction, solve=reduction == "none" and path == "large")


@pytest.mark.parametrize("path", ["small", "large"])
@pytest.mark.parametrize("method", [0, 1, 2])
def test_fused_defaults(method, path):
    """order=None (fixed order 0..K-1), default block sizes."""
    inp = Inputs(3, 3, 100)
    _check_fused(inp, method, path, "none", with_order=False, solve=path == "large")
    _check_fused(inp, method, path, "sum", with_order=True)


@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1e10, 1e15, 1e20])
@pytest.mark.parametrize("path", ["small", "large"])
def test_fused_scales(scale, path, tiny_blocks):
    """Huge and tiny gradients (float32 subnormal squares at 1e-20), skipped where the
    float32 squares overflow."""
    inp = Inputs(3, 3, 100, scale=scale)
    if (inp.G.double() ** 2).sum(-1).max().item() * 4 >= torch.finfo(torch.float32).max:
        pytest.skip(f"float32 Gram overflows at scale {scale:g}")
    rtol = 2e-4 if scale < 1e-15 else 2e-5  # subnormal products lose bits
    for method in (1, 2):
        _check_fused(inp, method, path, "none", rtol=rtol)
    _check_fused(inp, 0, path, "sum", rtol=rtol)


@pytest.mark.parametrize("path", ["small", "large"])
def test_all_zero_and_parallel_rows(path, tiny_blocks):
    """All-zero samples: cos 0, nothing projected; parallel / opposite rows: cos +-1.

    (GradVac on exactly opposite rows cancels g'_i to rounding noise, so its output is
    only checked on the all-zero sample.)"""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(1, 1, 33, generator=gen)
    G = torch.cat([torch.zeros(1, 3, 33), torch.cat([g, -2 * g, 3 * g], 1)]).to(DEVICE)
    order = torch.arange(3).expand(2, 3, 3).contiguous().to(DEVICE)
    target = torch.full((3, 3), 0.5, device=DEVICE)
    for method in (0, 1, 2):
        got = th.fused_forward(G, method, order, target, "none", path=path)
        want = reference.fused(G, method, order, target, "none")
        tag = f"seed={seed} method={method} path={path}"
        assert (got[0][0] == 0).all() and (got[2][0] == 0).all(), tag
        assert (got[3][0] == 1).all(), f"a zero sample keeps w = 1 [{tag}]"
        mag = reference.combine(G.double().abs(), want[3].double().abs(), "none").max().item()
        for name, a, e in zip(("out", "M", "cos", "w"), got, want):
            if method == 2 and name in ("out", "w"):
                a, e = a[:1], e[:1]
            # out cancels (g - 2g + ...): its error is relative to the sum of magnitudes
            _assert_close(a, e, 1e-5, name, tag, atol=1e-6, scale=mag if name == "out" else None)


@pytest.mark.parametrize("B", [5, 7])
def test_small_sum_several_samples_per_program(B, monkeypatch):
    """reduction "sum" on the one-tile small path: 2 or 3 samples per program, the last
    program partly empty."""
    monkeypatch.setattr(TL, "_MIN_SUM_PROGRAMS", 2)
    inp = Inputs(B, 3, 100)
    for method in (0, 1, 2):
        _check_fused(inp, method, "small", "sum")


def test_sum_deterministic_mode(tiny_blocks):
    """Under torch.use_deterministic_algorithms the small path sums per-sample rows
    with torch instead of atomics; same result, bitwise reproducible."""
    inp = Inputs(5, 3, 100)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = th.fused_forward(inp.G, 1, inp.order, None, "sum", path="small")[0]
        b = th.fused_forward(inp.G, 1, inp.order, None, "sum", path="small")[0]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(a, b), inp.tag
    want = reference.fused(inp.G, 1, inp.order, None, "sum")[0]
    _assert_close(a, want, 2e-5, "out", inp.tag)


# ----------------------------------------------------------------------------------------
# standalone gram / combine
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("K,D", [(2, 1), (3, 7), (5, 100), (8, 257)])
@pytest.mark.parametrize("blocks", ["default", "tiny"])
def test_gram_and_combine(K, D, blocks, request):
    if blocks == "tiny":
        request.getfixturevalue("tiny_blocks")
    B = {1: 1, 7: 3, 100: 5, 257: 3}[D]
    inp = Inputs(B, K, D)
    M = th.gram_forward(inp.G)
    assert M.dtype == torch.float32 and M.shape == (B, K, K)
    _assert_close(M, reference.gram(inp.G), 1e-5, "gram", inp.tag, atol=0)
    for w in (inp.w, inp.w.double()):
        for reduction in ("none", "sum"):
            got = th.combine_forward(inp.G, w, reduction)
            assert got.dtype == inp.G.dtype
            _assert_close(got, reference.combine(inp.G, w, reduction), 2e-5, f"combine {reduction}", inp.tag)


# ----------------------------------------------------------------------------------------
# half precision: error at most 2x PyTorch's own error in that dtype vs a float64 oracle
# ----------------------------------------------------------------------------------------


def _within_2x_torch(got, torch_same, oracle, what, tag, atol):
    err = (got.double().cpu() - oracle.double().cpu()).abs().max().item()
    ref_err = (torch_same.double().cpu() - oracle.double().cpu()).abs().max().item()
    assert err <= 2 * ref_err + atol, f"{what}: error {err:.3g} > 2 x torch's {ref_err:.3g} + {atol:.3g} [{tag}]"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,D,path", [(2, 257, "small"), (3, 100, "large"), (5, 7, "small"), (8, 100, "large")])
def test_half_precision_vs_float64_oracle(dtype, K, D, path, tiny_blocks):
    B = 3
    inp = Inputs(B, K, D, dtype=dtype)
    G64 = inp.G.double()
    eps = torch.finfo(dtype).eps
    for method in (0, 1, 2):
        target = inp.target if method == 2 else None
        for reduction in ("none", "sum"):
            tag = f"{inp.tag} method={method} path={path} reduction={reduction}"
            got = th.fused_forward(inp.G, method, inp.order, target, reduction, path=path)
            same = reference.fused(inp.G, method, inp.order, target, reduction)
            oracle = reference.fused(G64, method, inp.order, target, reduction)
            scale = oracle[0].abs().max().item()
            _within_2x_torch(got[0], same[0], oracle[0], "out", tag, atol=eps * scale)
            m_scale = oracle[1].abs().max().item()
            for i, name in ((1, "M"), (2, "cos"), (3, "w")):
                _within_2x_torch(got[i], same[i], oracle[i], name, tag, atol=1e-5 * max(m_scale if i == 1 else 1.0, 1e-30))
            assert got[0].dtype == dtype
    # standalone ops in half precision
    M = th.gram_forward(inp.G)
    _within_2x_torch(M, reference.gram(inp.G), reference.gram(G64), "gram", inp.tag, atol=1e-5 * M.abs().max().item())
    for reduction in ("none", "sum"):
        got = th.combine_forward(inp.G, inp.w, reduction)
        same = reference.combine(inp.G, inp.w, reduction)
        oracle = reference.combine(G64, inp.w.double(), reduction)
        _within_2x_torch(got, same, oracle, f"combine {reduction}", inp.tag, atol=eps * oracle.abs().max().item())


# ----------------------------------------------------------------------------------------
# backend protocol
# ----------------------------------------------------------------------------------------


def test_backend_protocol():
    from gradharmony.engine.backend_triton import TritonBackend

    be = TritonBackend()
    assert be.name == "triton"
    G = torch.randn(2, 3, 5, device=DEVICE)
    assert be.supports(G)
    assert be.supports(G.half()) and be.supports(G.bfloat16())
    assert not be.supports(G.double())
    assert not be.supports(torch.randn(2, 9, 5, device=DEVICE))
    assert not be.supports(torch.randn(2, 5, device=DEVICE))
    assert be.supports(torch.randn(2, 8, 5, device=DEVICE))
    res = be.fused(G, 0, None, None, "sum")
    out, M, cos, w, phi = res
    assert out.shape == (5,) and phi is None and res.weights is w
    sol = be.solve(G, 2, None, torch.zeros(3, 3, device=DEVICE))
    assert sol.phi.shape == (2, 3, 3) and be.solve(G, 1, None, None).phi is None
    _assert_close(sol.weights, reference.gram_solve(G, 2, None, torch.zeros(3, 3, device=DEVICE)).weights,
                  1e-5, "solve w", "protocol", atol=1e-6)
    _assert_close(be.gram(G), reference.gram(G), 1e-5, "gram", "protocol")
    _assert_close(be.combine(G, w, "none"), reference.combine(G, w, "none"), 1e-5, "combine", "protocol")


def test_launch_configs():
    """Path choice and block configs at the DESIGN.md sizes (no kernel runs)."""

    class _G:
        def __init__(self, B, K, D, itemsize):
            self.shape, self._i = (B, K, D), itemsize

        def element_size(self):
            return self._i

    for B, K, D in ((256, 2, 1024), (256, 3, 1024), (1024, 2, 4096)):
        assert th._path(_G(B, K, D, 4), "auto") == "small"
    for B, K, D in ((64, 2, 1 << 20), (256, 3, 1 << 20)):
        assert th._path(_G(B, K, D, 4), "auto") == "large"
    # feature-level sizes keep the whole sample in registers (G read once)
    assert th._small_cfg(2, 1024, 4)[1] and th._small_cfg(4, 1024, 4)[1] and th._small_cfg(2, 4096, 4)[1]
    for KP in (2, 4, 8):
        for itemsize in (2, 4):
            block, warps = th._gram_cfg(KP, 1 << 20, itemsize)
            per_thread = block // (32 * warps)
            assert KP * KP * per_thread <= 128, (KP, itemsize)  # accumulator registers
            if KP <= 4:
                assert per_thread * itemsize >= 16, (KP, itemsize)  # 16-byte loads
    # large path, small B: chunks shrink so the grid still fills the GPU
    tiles, nc = TL._chunks(1, 1 << 20, 2048, TL._CHUNK)
    assert nc >= TL._MIN_PROGRAMS // 2


def test_backend_registry_loads():
    from gradharmony.engine import backends

    be = backends._load_triton()
    assert be.name == "triton"


def test_invalid_arguments():
    G = torch.randn(2, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="method"):
        th.fused_forward(G, 3)
    with pytest.raises(ValueError, match="target"):
        th.fused_forward(G, 2)
    with pytest.raises(ValueError, match="reduction"):
        th.fused_forward(G, 0, reduction="mean")
    with pytest.raises(ValueError, match="order"):
        th.fused_forward(G, 1, order=torch.zeros(2, 3, 2, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError):
        th.gram_forward(G.double())
    with pytest.raises(ValueError, match="K <= 8"):
        th.gram_forward(torch.randn(1, 9, 4, device=DEVICE))
    with pytest.raises(ValueError, match="reduction"):
        th.combine_forward(G, torch.ones(2, 3, device=DEVICE), "mean")


def test_empty_inputs():
    for shape in ((0, 2, 5), (3, 2, 0)):
        G = torch.randn(*shape, device=DEVICE)
        for reduction in ("none", "sum"):
            got = th.fused_forward(G, 1, None, None, reduction)
            want = reference.fused(G, 1, None, None, reduction)
            for a, e in zip(got[:4], want[:4]):
                assert a.shape == e.shape
                torch.testing.assert_close(a, e.to(a.dtype))
        tgt = torch.zeros(2, 2, device=DEVICE)
        for a, e in zip(th.solve_forward(G, 2, None, tgt), reference.gram_solve(G, 2, None, tgt)):
            torch.testing.assert_close(a, e)
        assert th.gram_forward(G).shape == (shape[0], 2, 2)
        assert th.combine_forward(G, torch.ones(shape[0], 2, device=DEVICE), "sum").shape == (shape[2],)


# ----------------------------------------------------------------------------------------
# GPU only: the sizes of DESIGN.md, compiled
# ----------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K,D", [(256, 3, 1024), (1024, 2, 4096), (64, 2, 1 << 20)])
def test_gpu_large_shapes(B, K, D, dtype):
    inp = Inputs(B, K, D, dtype=dtype, zero_rows=False)
    G64 = inp.G.double()
    eps = torch.finfo(dtype).eps
    for method in (0, 1, 2):
        target = inp.target if method == 2 else None
        for reduction in ("none", "sum"):
            for path in ("auto", "small", "large"):
                if path == "small" and D > 8192:
                    continue
                tag = f"{inp.tag} method={method} path={path} reduction={reduction}"
                got = th.fused_forward(inp.G, method, inp.order, target, reduction, path=path)
                same = reference.fused(inp.G, method, inp.order, target, reduction)
                oracle = reference.fused(G64, method, inp.order, target, reduction)
                if dtype == torch.float32:
                    for i, name in enumerate(("out", "M", "cos", "w")):
                        _assert_close(got[i], same[i], 1e-4, name, tag, atol=1e-6)
                else:
                    scale = oracle[0].abs().max().item()
                    _within_2x_torch(got[0], same[0], oracle[0], "out", tag, atol=eps * scale)
                    _within_2x_torch(got[3], same[3], oracle[3], "w", tag, atol=1e-5)


@pytest.mark.parametrize("B,K,D", [(6, 3, 40), (3, 2, 5000)])
def test_curriculum_path_matches_torch_backend(B, K, D):
    """harmonize with a curriculum on the triton backend (the rule solved by the solve op,
    then one weighted combine) equals the torch backend."""
    import gradharmony as gh

    for make in (lambda: gh.PCGrad(seed=1), lambda: gh.GradVac(seed=2, beta=0.5)):
        rules, curricula = (make(), make()), (gh.ConflictCurriculum(start=0.5), gh.ConflictCurriculum(start=0.5))
        for _ in range(2):
            G = torch.randn(B, K, D, device=DEVICE)
            a = gh.harmonize(G, rules[0], backend="triton", curriculum=curricula[0])
            b = gh.harmonize(G, rules[1], backend="torch", curriculum=curricula[1])
            for name in ("cos", "weights", "grad"):
                _assert_close(getattr(a, name), getattr(b, name), 1e-4, name, f"B={B} K={K} D={D}")


@gpu
@needs_cuda
def test_gpu_backend_registry():
    from gradharmony.engine import backends

    be = backends.get_backend("triton")
    G = torch.randn(256, 2, 1024, device="cuda")
    assert be.supports(G)
    torch.cuda.synchronize()
    out = be.fused(G, 1, None, None, "none")[0]
    _assert_close(out, reference.fused(G, 1)[0], 1e-4, "out", "auto backend")
