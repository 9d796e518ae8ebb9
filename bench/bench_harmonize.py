"""Benchmark of ``gradharmony.harmonize`` (per-sample PCGrad + cosines) against what a
user would write instead.

For each size (B, K, D) and dtype it times, side by side in one process:

- every live gradharmony backend (``harmonize(G, "pcgrad", backend=...)``, the whole
  public op: validation, kernel(s), the health check);
- ``reference``: the vectorized pure-PyTorch reference op (``engine.reference.fused``);
- ``compiled``: ``torch.compile`` of that reference;
- ``loop``: a per-sample Python loop in the style of the popular PCGrad wrappers;
- ``torchjd``: torchjd's PCGrad weighting applied per sample, then combined, plus the
  cosines from one batched Gram product (torchjd visits in a random order, so for K > 2 its
  output is reported as unchecked).

All gradharmony candidates and the loop use the fixed visiting order 0..K-1.

It reports the median and 20th/80th percentiles, the speed-up over ``reference``, the
time of one read of G at the measured copy bandwidth, and peak extra memory (CUDA
allocator on GPU, the CPU allocator's events under the profiler on CPU). Each
candidate's combined gradient and cosines are checked against the reference before it
is timed. Results go to ``bench/results/harmonize_<device>.{json,md}`` (rewritten after
every size) with device, torch version and commit ($GH_COMMIT where the tree has no .git).

    python bench/bench_harmonize.py              # default sizes for the device
    python bench/bench_harmonize.py --quick      # a small subset
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import gradharmony as gh
from gradharmony.engine import available_backends, reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakMemory, device_name, git_commit, percentiles, time_fn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GPU_SIZES = [
    (256, 2, 1024), (256, 3, 1024), (1024, 2, 4096),
    (64, 2, 1 << 20), (256, 2, 1 << 20), (256, 3, 1 << 20),
]
CPU_SIZES = [(256, 2, 1024), (256, 3, 1024), (256, 2, 4096), (1024, 2, 4096), (64, 2, 1 << 18)]
SLOW_MAX_ELEMS = 1 << 22  # the loop / torchjd baselines only up to this many elements on CPU


def pcgrad_loop(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loop in the style of the popular PCGrad wrappers (one sample at a time)."""
    B, K, D = G.shape
    outs, coss = [], []
    for b in range(B):
        grads = [G[b, k] for k in range(K)]
        pc = [g.clone() for g in grads]
        for i in range(K):
            for j in range(K):  # the wrappers shuffle here; a fixed order keeps outputs comparable
                if j == i:
                    continue
                dot = torch.dot(pc[i], grads[j])
                if dot < 0:
                    pc[i] -= dot * grads[j] / grads[j].norm() ** 2
        outs.append(torch.stack(pc).sum(0))
        coss.append(torch.nn.functional.cosine_similarity(G[b].unsqueeze(1), G[b].unsqueeze(0), dim=-1))
    return torch.stack(outs), torch.stack(coss)


def make_torchjd() -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    try:
        from torchjd.aggregation import PCGrad
    except ImportError:
        return None
    agg = PCGrad()

    def run(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.stack([agg(G[b]) for b in range(G.shape[0])])
        M = torch.bmm(G, G.transpose(1, 2))  # cosines the cheap way: from the Gram matrices
        n = M.diagonal(dim1=1, dim2=2).sqrt().clamp_min(1e-30)
        return out, M / (n.unsqueeze(2) * n.unsqueeze(1))

    return run


def candidates(dev: torch.device, dtype: torch.dtype, numel: int, compile_ok: bool) -> dict[str, Callable]:
    """name -> fn(G) returning (combined gradients (B, D), cosines (B, K, K))."""
    c: dict[str, Callable] = {}
    for name, status in available_backends().items():
        if status != "available":
            continue
        be = gh.engine.get_backend(name)
        probe = torch.empty(1, 2, 1, device=dev, dtype=dtype)
        if not be.supports(probe):
            continue

        def gh_fn(G: torch.Tensor, n: str = name, rule=gh.PCGrad(order="fixed")):
            r = gh.harmonize(G, rule, backend=n)
            return r.grad, r.cos

        c[f"gh[{name}]"] = gh_fn
    c["reference"] = lambda G: (lambda o: (o[0], o[2]))(reference.fused(G, 1))
    if compile_ok:
        # fresh dynamo caches: past config.recompile_limit (8) shapes/dtypes of the same code
        # object, torch.compile silently runs it eagerly and "compiled" would time the reference
        torch._dynamo.reset()
        comp = torch.compile(reference.fused, dynamic=False)
        c["compiled"] = lambda G: (lambda o: (o[0], o[2]))(comp(G, 1))
    if dev.type == "cuda" or numel <= SLOW_MAX_ELEMS:
        c["loop"] = pcgrad_loop
        tjd = make_torchjd()
        if tjd is not None:
            c["torchjd"] = tjd
    return c


def copy_bandwidth(dev: torch.device) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read + written."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 25)
    src = torch.randn(n // 4, device=dev)
    dst = torch.empty_like(src)
    t = statistics.median(time_fn(lambda: dst.copy_(src), dev, reps=30))
    return 2 * src.numel() * 4 / (t * 1e-3) / 1e9


def run_size(B: int, K: int, D: int, dtype: torch.dtype, dev: torch.device, bw: float,
             reps: int, compile_ok: bool, commit: str, dname: str) -> list[dict]:
    torch.manual_seed(B * 131 + K * 7 + D)
    G = torch.randn(B, K, D, device=dev, dtype=dtype)
    G[:, 1] -= 0.5 * G[:, 0]  # make conflicts common
    ref_o = reference.fused(G, 1)
    ref, ref_cos = ref_o[0].float(), ref_o[2].float()
    one_read_ms = G.numel() * G.element_size() / (bw / 2 * 1e9) * 1e3  # read only: half of copy bytes
    rows = []
    for name, fn in candidates(dev, dtype, G.numel(), compile_ok).items():
        try:
            out, cos = fn(G)
            err = float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            cos_err = float((cos.float() - ref_cos).abs().max())
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            # torchjd visits in a random order: for K > 2 its output cannot be checked (None)
            ok = None if (name == "torchjd" and K > 2 and cos_err < tol) else (err < tol and cos_err < tol)
            slow = name in ("loop", "torchjd")
            with PeakMemory(dev) as pm:
                fn(G)
            t = time_fn(lambda: fn(G), dev, reps=max(5, reps // 10) if slow else reps,
                        warmup=1 if slow else 3, budget_s=4.0 if slow else 8.0)
        except Exception as exc:  # a baseline that cannot run at this size is reported, not fatal;
            # a gradharmony backend that raises fails the run (correct=False)
            rows.append(dict(size=f"{B}x{K}x{D}", impl=name, error=f"{type(exc).__name__}: {exc}"[:200],
                             correct=False if name.startswith("gh[") else None))
            continue
        med, p20, p80 = percentiles(t)
        rows.append(dict(
            size=f"{B}x{K}x{D}", B=B, K=K, D=D, dtype=str(dtype).replace("torch.", ""), impl=name,
            median_ms=med, p20_ms=p20, p80_ms=p80, n=len(t),
            one_read_ms=one_read_ms, x_one_read=med / one_read_ms,
            peak_extra_mb=pm.peak_mb, input_mb=G.numel() * G.element_size() / 2**20,
            max_rel_err=err, max_cos_err=cos_err, correct=ok, device=dname, torch=torch.__version__, commit=commit,
        ))
    base = next((r["median_ms"] for r in rows if r.get("impl") == "reference" and "median_ms" in r), None)
    for r in rows:
        if base and "median_ms" in r:
            r["speedup_vs_reference"] = base / r["median_ms"]
    return rows


OK_TEXT = {True: "yes", False: "NO", None: "unchecked"}


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# harmonize benchmark — {meta['device']}",
        "",
        f"torch {meta['torch']}, commit {meta['commit']}, copy bandwidth {meta['copy_gbps']:.0f} GB/s "
        f"(read + write), {meta['date']}. Per-sample PCGrad + cosines; times in ms "
        "(median [p20, p80]); `x read` = median / one read of G at copy rate.",
        "",
        "| size | dtype | impl | median ms | p20 | p80 | speed-up vs reference | x read | peak extra MiB | input MiB | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | | {r['impl']} | error: {r['error']} | | | | | | | |")
            continue
        pk = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.4f} | {r['p20_ms']:.4f} | "
            f"{r['p80_ms']:.4f} | {r.get('speedup_vs_reference', float('nan')):.2f} | {r['x_one_read']:.2f} | "
            f"{pk} | {r['input_mb']:.1f} | {OK_TEXT[r['correct']]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16,float16")
    p.add_argument("--sizes", default=None, help="comma list of BxKxD, e.g. 256x2x1024,64x2x1048576")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="two small sizes, few repetitions")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default=None, help="file name tag (default: device type)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if a.sizes:
        try:
            sizes = [tuple(int(x) for x in s.lower().split("x")) for s in a.sizes.split(",")]
            assert all(len(s) == 3 for s in sizes)
        except (ValueError, AssertionError):
            p.error(f"--sizes must look like 256x2x1024,64x2x1048576, got {a.sizes!r}")
    else:
        sizes = GPU_SIZES if dev.type == "cuda" else CPU_SIZES
    reps = a.reps
    if a.quick:
        sizes, reps = sizes[:2], 20
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    commit, dname = git_commit(), device_name(dev)
    bw = copy_bandwidth(dev)
    meta = dict(device=dname, torch=torch.__version__, commit=commit, copy_gbps=bw,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                backends=available_backends(), python=sys.version.split()[0])
    print(f"# {dname} | torch {torch.__version__} | commit {commit} | copy {bw:.0f} GB/s")
    print(f"# backends: {meta['backends']}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = a.tag or dev.type
    rows: list[dict] = []
    for dtype in dtypes:
        for (B, K, D) in sizes:
            r = run_size(B, K, D, dtype, dev, bw, reps, not a.no_compile, commit, dname)
            rows += r
            for x in r:
                if "error" in x:
                    print(f"{x['size']:>16} {x['impl']:>12}  error: {x['error']}")
                else:
                    print(f"{x['size']:>16} {x['dtype']:>9} {x['impl']:>12} {x['median_ms']:10.4f} ms "
                          f"[{x['p20_ms']:.4f}, {x['p80_ms']:.4f}]  x{x.get('speedup_vs_reference', 0):6.2f} "
                          f"vs ref  {x['x_one_read']:7.2f}x read  "
                          f"peak+{x['peak_extra_mb'] if x['peak_extra_mb'] is not None else float('nan'):.1f} MiB"
                          f"{'' if x['correct'] is not False else '  MISMATCH err=%.2e cos err=%.2e' % (x['max_rel_err'], x['max_cos_err'])}")
            # rewritten after every size: a run killed by a timeout keeps what it measured
            (out / f"harmonize_{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
            (out / f"harmonize_{tag}.md").write_text(to_markdown(rows, meta))
    print(f"wrote {out / f'harmonize_{tag}.md'}")
    return 0 if all(r.get("correct") is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
