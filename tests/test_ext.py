"""The C++/CUDA extension (torch.ops.gradharmony.*) against the pure-PyTorch reference.

Each case draws fresh random inputs from a seed printed on failure (set GRADHARMONY_TEST_SEED
to replay one). Tolerances follow flash-attention: the kernel's error against a float64 oracle
must be at most twice the reference's own error in the same dtype, plus a tiny scale-aware slack.
GPU tests (marked ``gpu``) run the same table on CUDA and skip without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import _background
from _helpers import assert_within_2x, eps, fresh_seed
from _helpers import check_fused as _check_fused
from _helpers import check_solve as _check_solve
from _helpers import make_inputs as _make_inputs

from gradharmony.engine import reference as R
from gradharmony.kernels import build_flags

ext = pytest.importorskip("gradharmony.kernels.ext")

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
HAS_CUDA = torch.cuda.is_available()
REDUCTIONS = ("none", "sum")


@pytest.fixture(scope="module")
def ops():
    try:
        ext.load_ops()
    except RuntimeError as exc:
        if os.environ.get("GRADHARMONY_NO_JIT") or os.environ.get("GRADHARMONY_SKIP_EXT"):
            pytest.skip(str(exc))
        raise
    return torch.ops.gradharmony


_seed = fresh_seed
_eps = eps
_assert_2x = assert_within_2x


def make_inputs(B, K, D, dtype, device, scale, seed, zero_rows=True):
    """(G, order, target) of :func:`_helpers.make_inputs`."""
    return _make_inputs(B, K, D, dtype, device, scale, seed, zero_rows)[:3]


def check_fused(op_out, G, method, order, target, reduction, info, solve_out=None):
    """The raw fused op's (out, M, cos, w, phi) and, with ``solve_out``, the raw solve op's
    (M, cos, w, phi) vs the reference and a float64 oracle (tests/_helpers.py)."""
    _check_fused(op_out, G, method, order, target, reduction, info)
    if solve_out is not None:
        _check_solve(*solve_out, G, method, order, target, f"solve op: {info}")


# ----------------------------------------------------------------------------- the table

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BS = (1, 3, 37)
DS = (1, 7, 1000, 4099)
SCALES = {
    torch.float32: (1e-20, 1.0, 1e17),
    torch.float64: (1e-20, 1.0, 1e20),
    torch.bfloat16: (1e-20, 1.0, 1e17),
    torch.float16: (1e-2, 1.0, 1e2),
}


def _table(ds=DS):
    cases = []
    for di, dtype in enumerate(DTYPES):
        for bi, B in enumerate(BS):
            for dj, D in enumerate(ds):
                K = 2 + (di + 3 * bi + 5 * dj) % 7  # every K in 2..8 appears for every dtype
                scale = SCALES[dtype][(bi + dj) % 3]
                cases.append(pytest.param(dtype, B, K, D, scale, id=f"{str(dtype)[6:]}-B{B}-K{K}-D{D}-s{scale:g}"))
    return cases


def _run_table(ops, device, dtype, B, K, D, scale):
    seed = _seed(device, dtype, B, K, D, scale)
    G, order, target = make_inputs(B, K, D, dtype, device, scale, seed)
    for method in (0, 1, 2):
        for red_id, reduction in enumerate(REDUCTIONS):
            use_order = order if (method + red_id) % 3 else None
            tgt = target if method == 2 else None
            info = (f"seed={seed} device={device} dtype={dtype} B={B} K={K} D={D} scale={scale:g} "
                    f"method={method} reduction={reduction} order={'rand' if use_order is not None else None}")
            res = ops.fused(G, method, use_order, tgt, red_id)
            sol = ops.solve(G, method, use_order, tgt) if red_id == 0 else None
            if sol is not None:
                sol = sol[:3] + ((sol[3] if method == 2 else None),)
            check_fused(res[:4] + ((res[4] if method == 2 else None),), G, method, use_order, tgt,
                        reduction, info, solve_out=sol)


# the generic table of every op on the cpp backend: tests/test_{gram,combine,solve,fused}.py


@pytest.mark.parametrize("K", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_cpu_every_k(ops, dtype, K):
    _run_table(ops, "cpu", dtype, 5, K, 333, 1.0)


def test_fused_cpu_split_path(ops):
    """Few samples with long rows take the D-split (two-pass) CPU path."""
    for dtype in (torch.float32, torch.bfloat16):
        _run_table(ops, "cpu", dtype, 1, 3, 70001, 1.0)


def test_fused_cpu_large_output(ops):
    """Outputs over 2 MiB are written with streaming stores (rows not 32-byte aligned here)."""
    _run_table(ops, "cpu", torch.float32, 150, 3, 4099, 1.0)


def _vm_flags(addr):
    """VmFlags of the mapping that holds ``addr`` (Linux /proc/self/smaps), or None."""
    import re

    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                inside = int(m[1], 16) <= addr < int(m[2], 16)
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("op", ["fused", "combine"])
def test_cpu_large_outputs_get_huge_page_hint(ops, op):
    """Outputs of 8 MiB and more are madvise(MADV_HUGEPAGE)d before the kernel writes them
    (VmFlags 'hg' on their pages)."""
    G = torch.randn(40, 2, 70001)  # output 11 MiB
    out = ops.fused(G, 1, None, None, 0)[0] if op == "fused" else ops.combine(G, torch.randn(40, 2), 0)
    flags = _vm_flags(out.data_ptr() + out.nbytes // 2)
    assert flags is not None and "hg" in flags, flags


def test_cpu_outputs_over_huge_page_threshold(ops):
    """Outputs of 8 MiB and more get a transparent-huge-page hint before the kernel writes
    them (11 MiB here, not 2 MiB aligned): the values are unaffected."""
    _run_table(ops, "cpu", torch.float32, 41, 2, 70001, 1.0)
    G = torch.randn(41, 2, 70001)
    w = torch.randn(41, 2)
    torch.testing.assert_close(ops.combine(G, w, 0), (w.double().unsqueeze(-1) * G.double()).sum(1).float(),
                               rtol=1e-5, atol=1e-5)


def test_empty_and_degenerate(ops):
    for dtype in (torch.float32, torch.float16):
        G = torch.zeros(0, 3, 5, dtype=dtype)
        out, M, cos, w, phi = ops.fused(G, 2, None, torch.zeros(3, 3), 1)
        assert out.shape == (5,) and (out == 0).all() and M.shape == (0, 3, 3)
        G = torch.zeros(2, 3, 0, dtype=dtype)
        out, M, cos, w, phi = ops.fused(G, 1, None, None, 0)
        assert out.shape == (2, 0) and (M == 0).all() and (cos == 0).all() and (w == 1).all()
        G = torch.zeros(4, 3, 100, dtype=dtype)  # all zero: cos 0, never projected, no NaN
        for m in (0, 1, 2):
            out, M, cos, w, phi = ops.fused(G, m, None, torch.full((3, 3), 0.5), 0)
            assert (cos == 0).all() and (w == 1).all() and (out == 0).all()
            if m == 2:
                assert (phi == 0).all()


def test_no_nan_extreme_scales(ops):
    """Finite input whose squares do not overflow never gives NaN/inf (incl. subnormal squares)."""
    for scale in (1e-30, 1e-20, 1e-5, 1e5, 1e17):
        seed = _seed("scale", scale)
        G, order, target = make_inputs(7, 4, 513, torch.float32, "cpu", scale, seed)
        for m in (0, 1, 2):
            for red in (0, 1):
                res = ops.fused(G, m, order, target, red)
                for name, t in zip(("out", "M", "cos", "w", "phi"), res):
                    assert torch.isfinite(t).all(), f"{name} non-finite seed={seed} scale={scale} m={m}"


def test_input_errors(ops):
    G = torch.randn(2, 3, 10)
    with pytest.raises(RuntimeError, match="order"):
        ops.fused(G, 1, torch.full((2, 3, 3), 3), None, 0)
    with pytest.raises(RuntimeError, match="solve: order"):
        ops.solve(G, 1, torch.full((2, 3, 3), 3), None)
    with pytest.raises(RuntimeError, match="target"):
        ops.fused(G, 2, None, None, 0)
    with pytest.raises(RuntimeError, match="solve: gradvac needs"):
        ops.solve(G, 2, None, None)
    with pytest.raises(RuntimeError, match="K must be"):
        ops.fused(torch.randn(2, 9, 10), 0, None, None, 0)
    with pytest.raises(RuntimeError, match="solve: K must be"):
        ops.solve(torch.randn(2, 9, 10), 0, None, None)
    with pytest.raises(RuntimeError, match="unknown method"):
        ops.solve(G, 3, None, None)
    with pytest.raises(RuntimeError, match="reduction"):
        ops.combine(G, torch.ones(2, 3), 2)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.gram(G.to(torch.int32))


@pytest.mark.parametrize("B,K,D", [(64, 2, 1000), (5, 5, 33), (3, 8, 100), (4, 2, 3000)])
def test_curriculum_path_matches_reference(ops, B, K, D, monkeypatch):
    """A kernel rule under a curriculum runs the backend's solve op (gram + in-kernel solve,
    no combine) then one weighted combine, never a fused call whose output is thrown away;
    it matches the torch backend over several steps (GradVac's EMA target and the curriculum
    state move)."""
    import gradharmony as gh
    from gradharmony.engine.backend_ext import CppBackend

    calls = []  # which ops ran
    for op in ("fused", "solve", "gram", "combine"):
        inner = getattr(CppBackend, op)
        monkeypatch.setattr(CppBackend, op,
                            lambda self, *a, _op=op, _inner=inner: calls.append(_op) or _inner(self, *a))
    for make in (lambda: gh.PCGrad(seed=3), lambda: gh.GradVac(seed=4, beta=0.5), lambda: "sum"):
        rules, curricula = (make(), make()), (gh.ConflictCurriculum(start=0.6), gh.ConflictCurriculum(start=0.6))
        for step in range(3):
            G = torch.randn(B, K, D) * torch.logspace(-1, 1, K).unsqueeze(-1)
            a, b = (gh.harmonize(G, r, backend=be, curriculum=c, reduction=red)
                    for r, c, be, red in zip(rules, curricula, ("cpp", "torch"), ("none", "none")))
            for name in ("cos", "weights", "grad"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{name} step {step} {make()}: {m}")
            assert a.backend == "cpp"
            assert calls == ["solve", "combine"], calls
            calls.clear()
            for c in curricula:
                c.step()


@pytest.mark.parametrize("nonfinite", ["skip", "zero", "propagate"])
def test_curriculum_path_repair_and_nonfinite_match_reference(ops, nonfinite):
    """The in-kernel solve under a curriculum keeps the engine's health check: samples at
    scales 1e-20..1e20 (re-solved on a rescaled Gram) and a NaN sample under each policy give
    the torch backend's cosines, weights and output."""
    import gradharmony as gh

    B, K, D = 7, 3, 50
    scale = torch.tensor([1e-20, 1e-10, 1.0, 1e10, 1e20, 1e-17, 3.0]).view(B, 1, 1)
    G = (torch.randn(B, K, D, dtype=torch.float64) * scale).float()
    G[6, 1, 4] = float("nan")
    for make in (lambda: gh.PCGrad(seed=5), lambda: gh.GradVac(seed=6, beta=0.5)):
        res = []
        for be in ("cpp", "torch"):
            rule, cur = make(), gh.ConflictCurriculum(start=0.7)
            res.append([gh.harmonize(G, rule, backend=be, curriculum=cur, nonfinite=nonfinite) for _ in range(2)])
        for a, b in zip(*res):
            for name in ("cos", "weights", "grad"):
                # cosines lie in [-1, 1]: an absolute float32 tolerance (a near-orthogonal pair's
                # cosine has no relative accuracy); weights and outputs span 1e-20..1e20: relative
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4,
                                           atol=1e-6 if name == "cos" else 0, equal_nan=True,
                                           msg=lambda m: f"{name} {nonfinite}: {m}")
            assert torch.isfinite(a.weights[:6]).all() and torch.isfinite(a.cos[:6]).all()


def test_auto_fallback_warns_once_naming_every_missing_backend(monkeypatch):
    """Two preferred backends missing on a device: one warning that names both reasons and the
    backend used, and none on later calls."""
    import warnings

    from gradharmony.engine import backends

    def broken(msg):
        def load():
            raise RuntimeError(msg)
        return load

    monkeypatch.setitem(backends._REGISTRY, "fast1", backends._Entry(loader=broken("no toolchain one")))
    monkeypatch.setitem(backends._REGISTRY, "fast2", backends._Entry(loader=broken("no toolchain two")))
    monkeypatch.setitem(backends.PREFERENCE, "meta", ("fast1", "fast2", "torch"))
    monkeypatch.setattr(backends, "_WARNED", set())
    G = torch.empty(2, 2, 3, device="meta")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert backends.select_backend("auto", G).name == "torch"
        assert backends.select_backend("auto", G).name == "torch"
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1, msgs
    assert "using backend 'torch' on meta" in msgs[0]
    assert "'fast1': RuntimeError: no toolchain one" in msgs[0] and "'fast2': RuntimeError: no toolchain two" in msgs[0]


def test_backend_protocol(ops):
    from gradharmony.engine.backend_ext import CppBackend

    be = CppBackend()
    assert be.name == "cpp" and be.supports(torch.randn(2, 2, 3)) and not be.supports(torch.zeros(2, 2, 3, dtype=torch.int64))
    G = torch.randn(4, 3, 50)
    res = be.fused(G, 1, None, None, "none")
    out, M, cos, w, phi = res
    assert phi is None and out.shape == (4, 50) and res.weights is w and res.gram is M
    assert be.fused(G, 2, None, torch.zeros(3, 3), "sum").phi.shape == (4, 3, 3)
    sol = be.solve(G, 2, None, torch.zeros(3, 3))
    assert sol.phi.shape == (4, 3, 3) and be.solve(G, 1, None, None).phi is None
    torch.testing.assert_close(be.gram(G), R.gram(G))
    torch.testing.assert_close(be.combine(G, w, "sum"), R.combine(G, w, "sum"))


def test_opcheck(ops):
    G = torch.randn(3, 3, 37)
    order = torch.stack([torch.stack([torch.randperm(3) for _ in range(3)]) for _ in range(3)])
    torch.library.opcheck(ops.gram.default, (G,))
    torch.library.opcheck(ops.combine.default, (G, torch.rand(3, 3), 0))
    torch.library.opcheck(ops.combine.default, (G, torch.rand(3, 3), 1))
    torch.library.opcheck(ops.fused.default, (G, 1, order, None, 0))
    torch.library.opcheck(ops.fused.default, (G.half(), 2, order, torch.zeros(3, 3), 1))
    torch.library.opcheck(ops.solve.default, (G, 1, order, None))
    torch.library.opcheck(ops.solve.default, (G.half(), 2, order, torch.zeros(3, 3)))


def test_torch_compile_fullgraph(ops):
    def f(G, order):
        out, M, cos, w, phi = torch.ops.gradharmony.fused(G, 1, order, None, 0)
        return out * 2 + 1, cos.sum()

    G = torch.randn(5, 2, 64)
    order = torch.tensor([[0, 1], [1, 0]]).expand(5, 2, 2).contiguous()
    # aot_eager: exercises the fake kernels and full-graph capture without an inductor C++ build
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, ref = cf(G, order), f(G, order)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


@_background.job("nvcc_kernels", priority=30)
def _nvcc_kernels(d):
    return _background.Spec(["nvcc", "-c", "-arch=sm_90", *build_flags.NVCC_FLAGS, "-I", CSRC,
                              os.path.join(CSRC, "cuda_selftest.cu"), "-o", str(d / "selftest.o")], timeout=300)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.background("nvcc_kernels")
def test_cuda_kernels_compile():
    """The CUDA kernels (every dtype and K, via the standalone self-test) compile with nvcc."""
    res, _ = _background.result("nvcc_kernels")
    assert res.returncode == 0, res.stderr[-4000:]


def _cuda_glue_stubs(d):
    """The declarations that torch's ATen/cuda headers need from cuBLAS/cuSPARSE/cuSOLVER, whose
    headers a bare toolkit (nvcc + cudart only) lacks; harmonize_cuda.cu uses none of them
    (where the real headers exist, nvcc's own -I path finds those first)."""
    stubs = {
        "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\n"
                       "typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;",
        "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;",
        "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
                      "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;",
        "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0, "
                             "CUSOLVER_STATUS_INVALID_VALUE = 3 } cusolverStatus_t;",
        "cusolverDn.h": "#include <cusolver_common.h>\ntypedef struct cusolverDnContext* cusolverDnHandle_t;",
    }
    for name, text in stubs.items():
        (d / name).write_text("#pragma once\n" + text + "\n")


@_background.job("nvcc_glue", priority=10)
def _nvcc_glue(d):
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    _cuda_glue_stubs(d)
    cmd = ["nvcc", "-c", "-arch=sm_90", *build_flags.NVCC_FLAGS,
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_API_INCLUDE_EXTENSION_H", "-I", CSRC,
           "-isystem", str(d)]
    for inc in include_paths() + [sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", inc]
    cmd += [os.path.join(CSRC, "harmonize_cuda.cu"), "-o", str(d / "harmonize_cuda.o")]
    return _background.Spec(cmd, timeout=600)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.background("nvcc_glue")
def test_cuda_ops_compile():
    """harmonize_cuda.cu (the torch glue of the CUDA ops: dispatch, guards, launches) compiles
    with nvcc against torch's headers, as setup.py builds it; before, only the kernels
    (cuda_selftest.cu) were compile-checked and a glue error surfaced on the GPU machine."""
    res, _ = _background.result("nvcc_glue")
    assert res.returncode == 0, res.stderr[-4000:]


_NO_PREBUILT = "import sys; sys.modules['gradharmony._C'] = None\n"  # as if installed without it


def _py_env(**env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("GRADHARMONY_")}
    full.update(env)
    return full


def _run_py(code, **env):
    return subprocess.run([sys.executable, "-c", _NO_PREBUILT + code], capture_output=True,
                          text=True, timeout=600, env=_py_env(**env))


def test_fallback_without_compiler(tmp_path):
    """No prebuilt _C and no compiler for the JIT build: the reference engine runs, with one
    short warning that names the cause (not torch's "compiler not compatible" + ninja log)."""
    code = """
import warnings, torch, gradharmony as gh
from gradharmony.info import report
G = torch.randn(4, 2, 10)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    r = [gh.harmonize(G, m) for m in ("pcgrad", "pcgrad", "gradvac")]
ref = gh.harmonize(G, "pcgrad", backend="torch")
assert torch.equal(r[0].grad, ref.grad) and torch.equal(r[0].weights, ref.weights)
assert len(w) == 1, [str(x.message) for x in w]
print("WARNING:", w[0].message)
print(report())
"""
    res = _run_py(code, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "using backend 'torch' on cpu" in res.stdout and "'cpp': RuntimeError" in res.stdout, res.stdout
    assert "no C++ compiler" in res.stdout, res.stdout
    assert "cpp     unavailable" in res.stdout and "not compatible" not in res.stderr, res.stderr
    assert len(res.stdout.splitlines()[0]) < 600  # one readable line


_JIT_CODE = """
import torch, gradharmony as gh
from gradharmony.kernels import ext
from gradharmony.info import report
G = torch.randn(6, 3, 100)
r = gh.harmonize(G, gh.PCGrad(order="fixed"), backend="cpp")
ref = gh.harmonize(G, gh.PCGrad(order="fixed"), backend="torch")
torch.testing.assert_close(r.grad, ref.grad)
print(ext.ops_source(), ext.ops_path())
print(report())
"""


@_background.job("jit_build", priority=20)
def _jit_build(d):
    return _background.Spec([sys.executable, "-c", _NO_PREBUILT + _JIT_CODE], timeout=600,
                            env=_py_env(TORCH_EXTENSIONS_DIR=str(d)))


@pytest.mark.skipif(shutil.which("ninja") is None, reason="ninja not on PATH")
@pytest.mark.background("jit_build")
def test_jit_build_cached_in_torch_extensions_dir():
    """Without a prebuilt _C (GRADHARMONY_SKIP_EXT=1 install) the ops are JIT-compiled on first
    use into $TORCH_EXTENSIONS_DIR, agree with the reference, and `gradharmony.info` says so."""
    res, tmp_path = _background.result("jit_build")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    src, path = res.stdout.splitlines()[0].split(" ", 1)
    assert src == "jit" and path.startswith(str(tmp_path)) and os.path.isfile(path), res.stdout
    assert f"C++/CUDA ops: jit ({path})" in res.stdout


# ------------------------------------------------------------------------------------ GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_ops(ops):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("gradharmony::fused", "CUDA"):
        pytest.fail("gradharmony extension loaded without CUDA kernels (loaded: %s)" % ext.ops_source())
    return ops


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,B,K,D,scale", _table(DS + (8193, 20000)))
def test_fused_cuda_table(cuda_ops, dtype, B, K, D, scale):
    _run_table(cuda_ops, "cuda", dtype, B, K, D, scale)


@gpu
@needs_cuda
@pytest.mark.parametrize("K", range(1, 9))
@pytest.mark.parametrize("D", (333, 8192, 70001))
def test_fused_cuda_every_k(cuda_ops, K, D):
    for dtype in DTYPES:
        _run_table(cuda_ops, "cuda", dtype, 5, K, D, 1.0)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,D", [(1, 1, 1), (3, 2, 7), (37, 5, 1000), (2, 9, 4099), (300, 3, 4096), (4, 12, 70001)])
def test_gram_combine_cuda(cuda_ops, dtype, B, K, D):
    seed = _seed("gc-cuda", dtype, B, K, D)
    G, _, _ = make_inputs(B, K, D, dtype, "cuda", 1.0, seed)
    info = f"seed={seed} dtype={dtype} B={B} K={K} D={D}"
    Go = G.double()
    norms = R.gram(Go).diagonal(dim1=1, dim2=2).sqrt()
    _assert_2x("gram", cuda_ops.gram(G), R.gram(G), R.gram(Go), 8 * _eps(R.acc_dtype(dtype)) * max(D, 1) ** 0.5 * norms.max().item() ** 2, info)
    w = torch.randn(B, K, generator=torch.Generator().manual_seed(seed)).cuda()
    for red_id, red in enumerate(REDUCTIONS):
        scale = torch.einsum("bk,bkd->bd", w.double().abs(), Go.abs())
        scale = scale.sum(0) if red == "sum" else scale
        _assert_2x(f"combine[{red}]", cuda_ops.combine(G, w, red_id), R.combine(G, w, red),
                   R.combine(Go, w.double(), red), 4 * _eps(dtype) * scale.max().item() + 1e-300, info)


@gpu
@needs_cuda
def test_cuda_backend_and_compile(cuda_ops):
    from gradharmony.engine.backend_ext import CudaBackend

    be = CudaBackend()
    G = torch.randn(8, 3, 1000, device="cuda")
    assert be.supports(G) and not be.supports(G.cpu())
    out, M, cos, w, phi = be.fused(G, 1, None, None, "sum")
    assert phi is None and out.shape == (1000,)
    assert be.solve(G, 2, None, torch.zeros(3, 3, device="cuda")).phi.shape == (8, 3, 3)
    torch.library.opcheck(torch.ops.gradharmony.fused.default, (G, 2, None, torch.zeros(3, 3, device="cuda"), 0))
    torch.library.opcheck(torch.ops.gradharmony.solve.default, (G, 2, None, torch.zeros(3, 3, device="cuda")))
    cf = torch.compile(lambda G: torch.ops.gradharmony.fused(G, 1, None, None, 0)[0] + 1,
                       fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(G), torch.ops.gradharmony.fused(G, 1, None, None, 0)[0] + 1)
