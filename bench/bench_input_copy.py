"""What taking the K per-loss gradients as separate tensors costs: ``harmonize`` stacks them
into one new (B, K, D) tensor before the kernels run.

Times, per size, ``harmonize(G)`` on a (B, K, D) tensor, ``harmonize([g_1, ..., g_K])`` on K
(B, D) tensors (what the branch op passes), and the stack alone (``torch.stack(gs, 1)``), with
the peak extra memory of each (bench/_common.py). Median and 20th / 80th percentiles in ms.

    python bench/bench_input_copy.py [--device cpu|cuda] [--reps 50]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gradharmony as gh  # noqa: E402
from _common import PeakMemory, device_name, git_commit, percentiles, time_fn  # noqa: E402

SIZES = [(256, 2, 1024), (256, 3, 1024), (1024, 2, 4096), (64, 2, 1 << 18)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    print(f"# {device_name(dev)}, torch {torch.__version__}, commit {git_commit()}, "
          f"backend {gh.available_backends()}")
    print("| B x K x D | input | median ms | p20 | p80 | peak extra MiB |")
    print("|---|---|---|---|---|---|")
    for B, K, D in SIZES:
        G = torch.randn(B, K, D, device=dev)
        gs = [G[:, k].clone() for k in range(K)]
        cases = {
            "(B, K, D) tensor": lambda: gh.harmonize(G, "pcgrad"),
            "K tensors (B, D)": lambda: gh.harmonize(gs, "pcgrad"),
            "stack alone": lambda: torch.stack(gs, 1),
        }
        for name, fn in cases.items():
            med, p20, p80 = percentiles(time_fn(fn, dev, a.reps))
            with PeakMemory(dev) as pm:
                fn()
            mem = "-" if pm.peak_mb is None else f"{pm.peak_mb:.1f}"
            print(f"| {B}x{K}x{D} | {name} | {med:.3f} | {p20:.3f} | {p80:.3f} | {mem} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
