"""Facts written once: the K limit, the op ids, the accumulation dtype, the compiler flags, and
the layering of ``gradharmony/kernels`` (raw ops and launchers; nothing from the engine)."""

from __future__ import annotations

import ast
import os
import re
import runpy
import subprocess
import sys

import torch

from gradharmony.kernels import build_flags, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
KERNELS = os.path.join(ROOT, "gradharmony", "kernels")


def _header(name: str) -> str:
    with open(os.path.join(CSRC, name)) as f:
        return f.read()


def test_fused_k_limit_matches_the_cpp_header():
    """kMaxFusedK (C++/CUDA kernels) is the Python FUSED_MAX_K, which the engine, the Triton
    launchers and the Triton backend read."""
    m = re.search(r"constexpr\s+int\s+kMaxFusedK\s*=\s*(\d+)\s*;", _header("harmonize_solve.h"))
    assert m, "kMaxFusedK not found in csrc/harmonize_solve.h"
    assert int(m.group(1)) == spec.FUSED_MAX_K
    from gradharmony.engine import backends
    from gradharmony.kernels import triton_harmonize

    assert backends.FUSED_MAX_K is spec.FUSED_MAX_K and triton_harmonize.MAX_K == spec.FUSED_MAX_K
    # the CUDA K dispatch has one case per K up to the limit
    cases = re.findall(r"case (\d+): \{ constexpr int KC = \1;", _header("../csrc/harmonize_cuda.cu"))
    assert [int(c) for c in cases] == list(range(1, spec.FUSED_MAX_K + 1))


def test_method_and_reduction_ids_match_the_cpp_header():
    text = _header("harmonize_solve.h")
    m = re.search(r"enum Method : int \{ kSum = (\d+), kPCGrad = (\d+), kGradVac = (\d+) \};", text)
    r = re.search(r"enum Reduction : int \{ kNone = (\d+), kReduceSum = (\d+) \};", text)
    assert m and r
    assert dict(zip(("sum", "pcgrad", "gradvac"), map(int, m.groups()))) == spec.METHOD_IDS
    assert dict(zip(("none", "sum"), map(int, r.groups()))) == spec.REDUCTION_IDS


def test_accumulation_dtype_has_one_source():
    from gradharmony.engine import reference

    assert reference.acc_dtype is spec.acc_dtype
    assert [spec.acc_dtype(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)] == [
        torch.float64, torch.float32, torch.float32, torch.float32]
    text = _header("harmonize_common.h")
    assert "using acc_of" in text
    for name in ("harmonize_cpu.cpp", "harmonize_cuda.cu"):
        assert "using acc_of" not in _header(name), f"{name} defines its own acc_of"


def test_build_flags_are_data_only_and_shared(monkeypatch):
    """setup.py executes build_flags.py (no torch needed) and the JIT loader imports it: both
    pass the same flags."""
    with open(os.path.join(KERNELS, "build_flags.py")) as f:
        tree = ast.parse(f.read())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    # executable without torch or the package
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['gradharmony'] = None; "
            f"print(runpy.run_path({os.path.join(KERNELS, 'build_flags.py')!r})['CXX_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(build_flags.CXX_FLAGS)

    # setup.py: capture the extension it would build
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.delenv("GRADHARMONY_SKIP_EXT", raising=False)
    monkeypatch.setenv("MAX_JOBS", "1")
    runpy.run_path(os.path.join(ROOT, "setup.py"))
    (ext,) = captured["ext_modules"]
    args = ext.extra_compile_args
    assert (args["cxx"] if isinstance(args, dict) else args) == build_flags.CXX_FLAGS
    assert ext.extra_link_args == build_flags.LD_FLAGS

    # the JIT loader: capture what it passes to torch.utils.cpp_extension.load
    from torch.utils import cpp_extension

    from gradharmony.kernels import ext as ext_mod

    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ext_mod, "_state", dict(ext_mod._state))  # _jit_load records the library
    ext_mod._jit_load()
    assert seen["extra_cflags"] == build_flags.CXX_FLAGS and seen["extra_ldflags"] == build_flags.LD_FLAGS


def test_kernels_import_nothing_from_the_engine():
    """gradharmony/kernels is the bottom layer: raw ops and launchers, no upward import."""
    bad = []
    for name in sorted(os.listdir(KERNELS)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(KERNELS, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.ImportFrom):
                mods = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            for m in mods:
                if m.startswith("..") or m.startswith("gradharmony.") and not m.startswith("gradharmony.kernels"):
                    bad.append(f"{name}: {m}")
    assert not bad, bad
