"""Training-step time of the reference VATT trainer: plain VATT vs feature-level harmonization.

Variants (one process, same initial weights, same pre-loaded batches, measured round-robin so
that drifts in machine load hit every variant alike):

    plain            harmony.level=none (no branch op, no gradient measurement)
    sum              Harmonizer("sum") at the video features (plain VATT + conflict statistics)
    pcgrad           Harmonizer("pcgrad")
    gradvac          Harmonizer("gradvac")
    pcgrad+fraction  pcgrad with the hard fraction curriculum
    gradvac+soft     gradvac with a soft threshold curriculum
    [pcgrad@param]   HarmonizedOptimizer(granularity="sample"), with --parameter-level (slow)

A step = zero_grad, forward, losses, (harmonized) backward, Adam step, LR scheduler step,
curriculum step, statistics reduction; the data loading is excluded. Reported: median and
20th/80th percentiles in ms, and the ratio of medians to ``plain`` and to ``sum``. CPU runs the
``tiny`` preset; with CUDA available, a second run uses the ``small`` preset on the GPU.

Wrapper section (``--wrapper``, on by default): the step time of ``gh.HarmonizedOptimizer`` at
both granularities next to plain training (``sum(l.mean()).backward()`` + Adam step) on a small
shared-trunk / two-head MLP with per-sample losses (same initial weights, same batches,
round-robin): ``batch:<rule>`` and ``sample:<rule>`` for the rules "sum" and "pcgrad". A step =
zero_grad, forward, (harmonized) backward, Adam step. Writes ``train_step_wrapper_<device>``.

Usage::

    python bench/bench_train_step.py                  # CPU (and GPU when available)
    python bench/bench_train_step.py --steps 200 --devices cpu --threads 1

Writes ``bench/results/train_step_<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gradharmony.vatt.config import build_config  # noqa: E402
from gradharmony.vatt.data import load_batch  # noqa: E402
from gradharmony.vatt.distributed import DistContext  # noqa: E402
from gradharmony.vatt.trainer import Trainer, build_datasets  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, git_commit, sync  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"harmony.level": "none", "harmony.curriculum": "off"},
    "sum": {"harmony.method": "sum", "harmony.curriculum": "off"},
    "pcgrad": {"harmony.method": "pcgrad", "harmony.curriculum": "off"},
    "gradvac": {"harmony.method": "gradvac", "harmony.curriculum": "off"},
    "pcgrad+fraction": {"harmony.method": "pcgrad", "harmony.curriculum": "fraction"},
    "gradvac+soft": {"harmony.method": "gradvac", "harmony.curriculum": "threshold",
                     "harmony.curriculum_mode": "soft"},
}
PARAM_VARIANT = {"harmony.method": "pcgrad", "harmony.curriculum": "off", "harmony.level": "parameter"}


def build_trainers(preset: str, device: torch.device, batch_size: int | None,
                   variants: dict[str, dict[str, Any]]) -> tuple[dict[str, Trainer], list[dict[str, torch.Tensor]]]:
    """One Trainer per variant (same seed -> same init) and a few pre-loaded batches on ``device``."""
    base = {"train.out": os.path.join("/tmp", "gh_bench_train_step"), "train.progress": False,
            "train.device": str(device)}
    if batch_size is not None:
        base["train.batch_size"] = batch_size
    cfg0 = build_config(preset, overrides=base)
    datasets = build_datasets(cfg0)
    trainers = {name: Trainer(build_config(preset, overrides={**base, **ov}), DistContext(device=device),
                              datasets=datasets, overwrite=True) for name, ov in variants.items()}
    bs = cfg0.train.batch_size
    batches = [{k: v.to(device) for k, v in load_batch(datasets[0], range(i * bs, (i + 1) * bs)).items()}
               for i in range(4)]
    return trainers, batches


def measure(trainers: dict[str, Trainer], batches: list[dict[str, torch.Tensor]], steps: int, warmup: int,
            device: torch.device) -> dict[str, np.ndarray]:
    """Round-robin timing: per round, one step of every variant; returns ms per step (steps,)."""
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for r in range(warmup + steps):
        batch = batches[r % len(batches)]
        for name, tr in trainers.items():
            sync(device)
            t0 = time.perf_counter()
            tr.train_step(batch)
            sync(device)
            if r >= warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {k: np.array(v) for k, v in times.items()}


def summarize(times: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = []
    for k, v in times.items():
        row = {"variant": k, "median_ms": med[k], "p20_ms": float(np.percentile(v, 20)),
               "p80_ms": float(np.percentile(v, 80)), "n": int(len(v))}
        row["vs_plain"] = med[k] / med["plain"]
        if "sum" in med:
            row["vs_sum"] = med[k] / med["sum"]
        rows.append(row)
    return rows


def to_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# VATT training step, {meta['preset']} preset on {meta['device']}", "",
             f"{meta['device_name']}; torch {meta['torch']}; commit {meta['commit']}; batch {meta['batch_size']}; "
             f"{meta['steps']} steps per variant after {meta['warmup']} warm-up, round-robin; {meta['date']}", "",
             "| variant | median ms | p20 ms | p80 ms | x plain | x sum |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_ms']:.2f} | {r['p20_ms']:.2f} | {r['p80_ms']:.2f} | "
                     f"{r['vs_plain']:.3f} | {r.get('vs_sum', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def run(device: torch.device, preset: str, args: argparse.Namespace) -> dict[str, Any]:
    variants = dict(VARIANTS)
    if args.parameter_level:
        variants["pcgrad@param"] = PARAM_VARIANT
    trainers, batches = build_trainers(preset, device, args.batch_size, variants)
    times = measure(trainers, batches, args.steps, args.warmup, device)
    rows = summarize(times)
    tr0 = next(iter(trainers.values()))
    meta = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "commit": git_commit(), "preset": preset, "batch_size": tr0.cfg.train.batch_size,
            "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "backend": tr0.cfg.harmony.backend}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train_step_{device.type}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    md = to_markdown(meta, rows)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return {"meta": meta, "results": rows}


class _TwoHeads(torch.nn.Module):
    """Shared MLP trunk, one linear head per loss; per-sample losses (B,)."""

    def __init__(self, d_in: int = 64, width: int = 256) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(d_in, width), torch.nn.ReLU(),
                                         torch.nn.Linear(width, width), torch.nn.ReLU())
        self.head_a = torch.nn.Linear(width, 1)
        self.head_b = torch.nn.Linear(width, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        la = (self.head_a(h).squeeze(1) - y) ** 2
        lb = torch.nn.functional.cross_entropy(self.head_b(h), c, reduction="none")
        return [la, lb]


WRAPPER_VARIANTS = ("plain", "batch:sum", "batch:pcgrad", "sample:sum", "sample:pcgrad")


def measure_wrapper(device: torch.device, steps: int, warmup: int, batch_size: int = 32,
                    chunk_size: int = 16) -> dict[str, np.ndarray]:
    """ms per training step (steps,) of plain training and of the wrapper, round-robin."""
    import gradharmony as gh

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, 64, generator=g).to(device), torch.randn(batch_size, generator=g).to(device),
                torch.randint(0, 8, (batch_size,), generator=g).to(device)) for _ in range(4)]
    runs = {}
    for name in WRAPPER_VARIANTS:
        torch.manual_seed(0)
        model = _TwoHeads().to(device)
        inner = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name == "plain":
            runs[name] = (model, inner)
        else:
            gran, rule = name.split(":")
            runs[name] = (model, gh.HarmonizedOptimizer(inner, rule, granularity=gran, chunk_size=chunk_size))

    def step(name: str, batch) -> None:
        model, opt = runs[name]
        opt.zero_grad(set_to_none=True)
        losses = model(*batch)
        if name == "plain":
            sum(l.mean() for l in losses).backward()
        elif name.startswith("batch"):
            opt.backward([l.mean() for l in losses])
        else:
            opt.backward(losses)
        opt.step()

    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(warmup + steps):
        batch = batches[r % len(batches)]
        for name in runs:
            sync(device)
            t0 = time.perf_counter()
            step(name, batch)
            sync(device)
            if r >= warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {k: np.array(v) for k, v in times.items()}


def run_wrapper(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    times = measure_wrapper(device, args.steps, args.warmup)
    rows = summarize(times)
    meta = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "commit": git_commit(), "preset": "two-head MLP 64-256-256, heads 1 and 8", "batch_size": 32,
            "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train_step_wrapper_{device.type}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    md = to_markdown(meta, rows).replace("# VATT training step", "# HarmonizedOptimizer training step", 1)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return {"meta": meta, "results": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="auto", help="comma list of cpu,cuda or 'auto' (cpu + cuda if available)")
    p.add_argument("--cpu-preset", default="tiny")
    p.add_argument("--gpu-preset", default="small")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=60, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--parameter-level", action="store_true", help="also time parameter-level pcgrad")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--wrapper", action=argparse.BooleanOptionalAction, default=True,
                   help="also time HarmonizedOptimizer at both granularities next to plain training")
    p.add_argument("--vatt", action=argparse.BooleanOptionalAction, default=True,
                   help="time the VATT trainer variants")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else args.devices.split(",")
    for dev in devices:
        if dev == "cuda" and not torch.cuda.is_available():
            print("cuda requested but not available; skipped")
            continue
        if args.vatt:
            run(torch.device(dev), args.cpu_preset if dev == "cpu" else args.gpu_preset, args)
        if args.wrapper:
            run_wrapper(torch.device(dev), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
