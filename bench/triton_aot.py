"""Compile the Triton kernels for a GPU architecture without a GPU, and report their resources.

The launchers of :mod:`gradharmony.kernels.triton_harmonize` are driven on CPU tensors over
a table of shapes; every kernel launch they make is turned into ``JITFunction.warmup`` (the
same argument binding and specialization as a real launch, no launch) against a stand-in
driver that reports the target architecture. Each compiled specialization is then checked:

- static shared memory within the architecture's per-block limit (227 KiB on sm_90) — the
  ``OutOfResources`` a real launch would raise;
- registers per thread (<= 255) and local memory (spills; from ``cuobjdump``).

    python bench/triton_aot.py                 # quick table, sm_90
    python bench/triton_aot.py --full --arch 90 --json out.json

Exit status 1 when a specialization fails to compile or exceeds a limit (spills are reported,
and fail only with ``--no-spills``). Uses Triton internals (``CudaDriver``,
``JITFunction.warmup``); checked with Triton 3.6 and 3.9.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot: unset TRITON_INTERPRET (the kernels must be JIT functions)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime import driver

#: Largest static shared memory per block (bytes) by architecture (CUDA programming guide).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}


class _AOTDriver(CudaDriver):
    """A CUDA driver stand-in: no device, a fixed target; enough for ``warmup``."""

    def __init__(self, arch: int) -> None:  # no CudaUtils: it would need libcuda
        self.arch = arch
        self.utils = None
        self.launcher_cls = None

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return divmod(self.arch, 10)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _arg_key(a) -> str:
    """How Triton specializes a runtime argument (its compile-cache key, Triton 3.x): tensors by
    dtype and 16-byte alignment; integers by width, ``== 1`` (a constant) and divisibility by
    16; bools by type. Two launches with different keys are two compiled kernels."""
    if isinstance(a, torch.Tensor):
        return f"{a.dtype}" + ("" if a.data_ptr() % 16 == 0 else ":unaligned")
    if isinstance(a, bool):
        return "bool"
    if isinstance(a, int):
        if a == 1:
            return "int=1"
        width = "i32" if -(2**31) <= a < 2**31 else ("u64" if a >= 2**63 else "i64")
        return width + (":div16" if a % 16 == 0 else "")
    return type(a).__name__


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args)`` compiles, never runs."""

    def __init__(self, name: str, fn, sink: dict) -> None:
        self.name, self.fn, self.sink = name, fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            # one entry per Triton specialization: the integer arguments' values matter
            # (== 1, divisibility by 16), not only their type
            key = (self.name, tuple(sorted((k, str(v)) for k, v in consts.items())),
                   kwargs.get("num_warps", 4), tuple(_arg_key(a) for a in args))
            if key in self.sink:
                return None
            t0 = time.perf_counter()
            try:
                k = self.fn.warmup(*args, grid=grid, **kwargs)
                self.sink[key] = dict(kernel=self.name, config=dict(consts, num_warps=kwargs.get("num_warps", 4)),
                                      args=list(key[3]), compiled=k, seconds=time.perf_counter() - t0)
            except Exception as exc:  # a compile error is a finding, not a crash of the tool
                self.sink[key] = dict(kernel=self.name, config=dict(consts), args=list(key[3]),
                                      error=f"{type(exc).__name__}: {exc}"[:2000])
            return None

        return launch


def _cuobjdump() -> Optional[str]:
    import triton.backends.nvidia as nv

    local = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return local if os.path.exists(local) else shutil.which("cuobjdump")


def _resources(cubin: bytes, tool: Optional[str]) -> dict:
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return {}
    reg, stack, shared, local = map(int, m.groups())
    return dict(registers=reg, stack=stack, static_shared=shared, local=local)


def table(full: bool) -> list[tuple]:
    """(B, K, D, dtype, op, method, reduction, order, deterministic) cases
    covering every kernel, padded K (KP = 2, 4, 8), dtype, path and flag the launchers use."""
    Ks = range(1, 9) if full else (2, 3, 8)
    Ds = (7, 1000, 4096, 8193, 1 << 20) if full else (1000, 4096, 1 << 20)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if full else (torch.float32, torch.bfloat16)
    cases = []
    for K, D, dt in itertools.product(Ks, Ds, dtypes):
        B = 64 if D >= 1 << 20 else 256
        for method, red in itertools.product((0, 1, 2), ("none", "sum")):
            cases.append((B, K, D, dt, "fused", method, red, method > 0, False))
        cases.append((B, K, D, dt, "fused", 1, "sum", True, True))  # deterministic
        if full or K == 3:
            cases.append((B, K, D, dt, "gram", None, None, False, False))
            cases.append((B, K, D, dt, "solve", 2, None, True, False))
            for red in ("none", "sum"):
                cases.append((B, K, D, dt, "combine", None, red, False, False))
    if not full:  # the float16 loads: one small and one large path
        cases += [(256, 2, 1000, torch.float16, "fused", 1, "none", True, False),
                  (64, 2, 1 << 20, torch.float16, "fused", 1, "none", True, False)]
    return cases


def run(arch: int, full: bool) -> list[dict]:
    driver.set_active(_AOTDriver(arch))
    import importlib

    from gradharmony.kernels import triton_harmonize as th

    sink: dict = {}
    mods = {n: importlib.import_module(f"gradharmony.kernels.{m}") for n, m in th.KERNEL_MODULES.items()}
    saved = {n: getattr(mods[n], n) for n in mods}
    try:
        for n in mods:
            setattr(mods[n], n, _Recorder(n, saved[n], sink))
        for (B, K, D, dt, op, method, red, order, det) in table(full):
            G = torch.empty(B, K, D, dtype=dt)  # never read: nothing runs
            prev = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(det)
            try:
                if op == "gram":
                    th.gram_forward(G)
                elif op == "combine":
                    th.combine_forward(G, torch.ones(B, K), red)
                else:
                    o = torch.zeros(B, K, K, dtype=torch.int64) if order else None
                    tgt = torch.zeros(K, K) if method == 2 else None
                    if op == "solve":
                        th.solve_forward(G, method, o, tgt)
                    else:
                        th.fused_forward(G, method, o, tgt, red)
            finally:
                torch.use_deterministic_algorithms(prev)
    finally:
        for n, fn in saved.items():
            setattr(mods[n], n, fn)
    tool = _cuobjdump()
    rows = []
    for rec in sink.values():
        k = rec.pop("compiled", None)
        if k is not None:
            rec["shared"] = int(k.metadata.shared)
            rec.update(_resources(k.asm["cubin"], tool))
        rows.append(rec)
    return rows


def problems(rows: list[dict], arch: int, no_spills: bool) -> list[str]:
    limit = SMEM_LIMIT.get(arch, 48 * 1024)
    out = []
    for r in rows:
        tag = f"{r['kernel']} {r['config']} {r['args']}"
        if "error" in r:
            out.append(f"compile error: {tag}: {r['error']}")
            continue
        if r["shared"] > limit:
            out.append(f"shared memory {r['shared']} B > {limit} B (sm_{arch}): {tag}")
        if r.get("registers", 0) > 255:
            out.append(f"{r['registers']} registers per thread > 255: {tag}")
        if no_spills and r.get("local", 0) > 0:
            out.append(f"spills ({r['local']} B local memory per thread): {tag}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="SM architecture, e.g. 80, 90")
    p.add_argument("--full", action="store_true", help="every K in 1..8, more D and dtypes")
    p.add_argument("--no-spills", action="store_true", help="fail on any register spill")
    p.add_argument("--json", default=None, help="write the per-specialization rows here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(a.arch, a.full)
    bad = problems(rows, a.arch, a.no_spills)
    ok = [r for r in rows if "error" not in r]
    print(f"triton {triton.__version__}, sm_{a.arch}: {len(rows)} specializations compiled in "
          f"{time.perf_counter() - t0:.0f} s")
    for name in sorted({r["kernel"] for r in ok}):
        rs = [r for r in ok if r["kernel"] == name]
        regs = [r["registers"] for r in rs if "registers" in r]
        print(f"  {name:20s} n={len(rs):3d}  shared max {max(r['shared'] for r in rs):6d} B  "
              f"registers max {max(regs) if regs else '?':>3}  "
              f"spilling {sum(1 for r in rs if r.get('local', 0) > 0)}")
    for r in ok:
        if r.get("local", 0) > 0:
            print(f"  spill: {r['kernel']} {r['config']} {r['args']}: {r['local']} B local, "
                  f"{r.get('registers')} registers")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=a.arch, rows=rows), f, indent=1)
    for b in bad:
        print("PROBLEM:", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
