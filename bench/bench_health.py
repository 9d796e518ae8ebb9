"""Cost of the health check: one ``harmonize`` call (PCGrad, float32, finite input that needs
no repair) with the host check and with the device check (no host sync), per backend.

    flock /tmp/gh_bench.lock python bench/bench_health.py --out bench/results --tag cpu_after

Run it on a checkout without the device check (``gradharmony.engine.core.DEVICE_CHECK``
absent) to time "before": only the host check is timed there. Writes ``health_<tag>.json``
and ``.md``: median and 20th/80th percentile ms per (shape, backend, check), interleaved
rounds so that load on the machine hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, percentiles, time_call  # noqa: E402

import gradharmony as gh  # noqa: E402
from gradharmony.engine import core  # noqa: E402

SHAPES = [(256, 2, 1024), (64, 2, 1 << 18)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="cpp,torch")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--nonfinite", default="skip", help="a sync-free policy (the device check needs one)")
    args = ap.parse_args()
    torch.manual_seed(0)
    has_device_check = hasattr(core, "DEVICE_CHECK")
    checks = ["host", "device"] if has_device_check else ["host"]
    rows = []
    dev = torch.device("cpu")
    for B, K, D in SHAPES:
        G = torch.randn(B, K, D)
        variants = [(be, ck) for be in args.backends.split(",") for ck in checks]
        times: dict = {v: [] for v in variants}

        def call(be: str, ck: str) -> None:
            if has_device_check:
                core.DEVICE_CHECK = ck == "device"
            gh.harmonize(G, "pcgrad", backend=be, nonfinite=args.nonfinite)

        for v in variants:  # warm-up (extension load, allocator)
            for _ in range(3):
                call(*v)
        for _ in range(args.rounds):
            for v in variants:
                times[v].append(time_call(lambda: call(*v), dev))
        for (be, ck), t in times.items():
            med, p20, p80 = percentiles(t)
            rows.append({"shape": [B, K, D], "backend": be, "check": ck, "median_ms": med,
                         "p20_ms": p20, "p80_ms": p80, "rounds": len(t)})
            print(f"{B}x{K}x{D} {be:6s} {ck:6s} {med:9.3f} ms (p20 {p20:.3f}, p80 {p80:.3f})", flush=True)
    meta = {"commit": git_commit(), "torch": torch.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "method": "pcgrad", "dtype": "float32",
            "nonfinite": args.nonfinite, "loadavg_1m_at_end": round(__import__("os").getloadavg()[0], 2)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"health_{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# harmonize cost by health check ({args.tag})", "",
             f"commit {meta['commit']}, torch {meta['torch']}, {meta['machine']}, {meta['threads']} threads, "
             f"PCGrad float32, nonfinite={args.nonfinite!r}, {args.rounds} interleaved rounds, "
             f"load average {meta['loadavg_1m_at_end']} at the end (2-core machine shared with other jobs)", "",
             "| B x K x D | backend | check | median ms | p20 | p80 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['backend']} | {r['check']} | "
                     f"{r['median_ms']:.3f} | {r['p20_ms']:.3f} | {r['p80_ms']:.3f} |")
    (out / f"health_{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
