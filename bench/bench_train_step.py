"""Training-step time of the reference VATT trainer: plain VATT vs feature-level harmonization.

Variants (one process, same initial weights, same pre-loaded batches, measured round-robin so
that drifts in machine load hit every variant alike):

    plain            harmony.level=none (no branch op, no gradient measurement)
    sum              Harmonizer("sum") at the video features (plain VATT + conflict statistics)
    pcgrad           Harmonizer("pcgrad")
    gradvac          Harmonizer("gradvac")
    pcgrad+fraction  pcgrad with the hard fraction curriculum
    gradvac+soft     gradvac with a soft threshold curriculum
    [pcgrad@param]   level parameter, term decomposition: HarmonizedOptimizer(granularity="sample"),
                     with --parameter-level (slow)
    [pcgrad@ghost]   level parameter, path decomposition (the default): ParameterHarmonizer, with --ghost

With ``--ghost``, rows of a step written directly against ``gradharmony.vatt``'s model and
losses (no trainer; zero_grad, forward, losses, backward, Adam step, one host sync on the loss):

    loop:plain         plain backward of the mean loss (the reference of the three rows below)
    loop:pcgrad@ghost  ParameterHarmonizer (path decomposition, ghost Grams, every parameter)
    loop:pcgrad@vmap   torch.func.jacrev (vmap of vector-Jacobian products) of the K x B per-sample
                       loss terms -> (B, K, P) per-sample gradients (term decomposition), then
                       ``harmonize(G, "pcgrad", reduction="sum")``: what a user would write
    ``--profile`` adds, per preset, the time of each phase of loop:plain and loop:pcgrad@ghost
    (torch.profiler over ``record_function`` ranges; mean ms per step over the profiled steps)
    in ``ghost_phases_<device>.txt``.
    ``--memory`` adds each variant's peak resident-memory growth over a step (a fresh process per
    variant with a fixed glibc mmap threshold, VmHWM reset after a warm-up step) next to B*P*4
    bytes (one float32 per sample and parameter); ``--memory-only`` skips the timing.

A step = zero_grad, forward, losses, (harmonized) backward, Adam step, LR scheduler step,
curriculum step, statistics reduction; the data loading is excluded. Reported: median and
20th/80th percentiles in ms, and the ratio of medians to ``plain`` and to ``sum``. CPU runs the
``tiny`` preset (``--cpu-preset tiny,small``: each, one after the other in one process); with CUDA
available, a second run uses the ``small`` preset on the GPU.

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
from _common import device_name, git_commit, percentiles, sync, time_call  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"harmony.level": "none", "harmony.curriculum": "off"},
    "sum": {"harmony.method": "sum", "harmony.curriculum": "off"},
    "pcgrad": {"harmony.method": "pcgrad", "harmony.curriculum": "off"},
    "gradvac": {"harmony.method": "gradvac", "harmony.curriculum": "off"},
    "pcgrad+fraction": {"harmony.method": "pcgrad", "harmony.curriculum": "fraction"},
    "gradvac+soft": {"harmony.method": "gradvac", "harmony.curriculum": "threshold",
                     "harmony.curriculum_mode": "soft"},
}
PARAM_VARIANT = {"harmony.method": "pcgrad", "harmony.curriculum": "off", "harmony.level": "parameter",
                 "harmony.param_decomposition": "term"}
GHOST_VARIANT = {"harmony.method": "pcgrad", "harmony.curriculum": "off", "harmony.level": "parameter",
                 "harmony.param_decomposition": "path"}


class LoopVariant:
    """A training step on ``gradharmony.vatt``'s model and losses, without the trainer."""

    def __init__(self, cfg: Any, vocab: int, kind: str, device: torch.device) -> None:
        import gradharmony as gh
        from gradharmony.vatt.model import VATT

        torch.manual_seed(cfg.train.seed)  # the trainers' initial weights
        self.model = VATT(cfg, vocab).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)
        self.kind, self.tau = kind, cfg.model.temperature
        self.ph = gh.ParameterHarmonizer(self.model, "pcgrad", optimizer=self.opt) if kind == "ghost" else None

    def losses(self, out: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from gradharmony.vatt.losses import mil_nce_per_sample, nce_per_sample

        return (nce_per_sample(out["z_v_va"], out["z_a_va"], temperature=self.tau),
                mil_nce_per_sample(out["z_v_vt"], out["z_t_vt"], mask, temperature=self.tau))

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        B = batch["video"].shape[0]
        if self.kind == "plain":
            rf = torch.autograd.profiler.record_function
            with rf("plain.forward"):
                l_va, l_vt = self.losses(self.model(batch), batch["text_mask"])
                loss = 0.5 * (l_va.mean() + l_vt.mean())
            with rf("plain.backward"):
                loss.backward()
        elif self.kind == "ghost":
            assert self.ph is not None
            with self.ph.capture(batch_size=B), torch.autograd.profiler.record_function("ghost.forward"):
                out = self.model(batch)
            l_va, l_vt = self.losses(out, batch["text_mask"])
            loss = 0.5 * (l_va.mean() + l_vt.mean())
            self.ph.backward([0.5 * l_va.mean(), 0.5 * l_vt.mean()])
        else:
            loss = self._vmap_step(batch, B)
        self.opt.step()
        return float(loss.detach())

    def _vmap_step(self, batch: dict[str, torch.Tensor], B: int) -> torch.Tensor:
        import gradharmony as gh
        from torch.func import functional_call, jacrev

        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        box: dict[str, torch.Tensor] = {}

        def terms(p: dict[str, torch.Tensor]) -> torch.Tensor:
            l_va, l_vt = self.losses(functional_call(self.model, p, (batch,)), batch["text_mask"])
            box["loss"] = (0.5 * (l_va.mean() + l_vt.mean())).detach()
            return torch.stack([0.5 * l_va / B, 0.5 * l_vt / B])  # (K, B) loss terms

        J = jacrev(terms)(params)  # name -> (K, B, *shape)
        G = torch.cat([J[n].reshape(2, B, -1) for n in names], dim=2).transpose(0, 1)  # (B, K, P)
        flat = gh.harmonize(G, "pcgrad", reduction="sum").grad
        off = 0
        for n, p in self.model.named_parameters():
            if n in params:
                p.grad = flat[off:off + p.numel()].view_as(p).clone()
                off += p.numel()
        return box["loss"]


LOOP_VARIANTS = {"loop:plain": "plain", "loop:pcgrad@ghost": "ghost", "loop:pcgrad@vmap": "vmap"}


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
            t = time_call(lambda: tr.train_step(batch), device)
            if r >= warmup:
                times[name].append(t)
    return {k: np.array(v) for k, v in times.items()}


def summarize(times: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = []
    for k, v in times.items():
        _, p20, p80 = percentiles(list(v))
        row = {"variant": k, "median_ms": med[k], "p20_ms": p20, "p80_ms": p80, "n": int(len(v))}
        row["vs_plain"] = med[k] / med["plain"]
        if "sum" in med:
            row["vs_sum"] = med[k] / med["sum"]
        rows.append(row)
    return rows


def to_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    has_sum = all("vs_sum" in r for r in rows)  # a "sum" variant to compare with
    lines = [f"# VATT training step, {meta['preset']} preset on {meta['device']}", "",
             f"{meta['device_name']}; torch {meta['torch']}; commit {meta['commit']}; batch {meta['batch_size']}; "
             f"{meta['steps']} steps per variant after {meta['warmup']} warm-up, round-robin; {meta['date']}", "",
             "| variant | median ms | p20 ms | p80 ms | x plain |" + (" x sum |" if has_sum else ""),
             "|---|---|---|---|---|" + ("---|" if has_sum else "")]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_ms']:.2f} | {r['p20_ms']:.2f} | {r['p80_ms']:.2f} | "
                     f"{r['vs_plain']:.3f} |" + (f" {r['vs_sum']:.3f} |" if has_sum else ""))
    return "\n".join(lines) + "\n"


def add_loop_variants(trainers: dict[str, Any], device: torch.device, names: list[str]) -> None:
    """Loop variants (see the module docstring) on the config and vocabulary of the first trainer."""
    tr0 = next(iter(trainers.values()))
    vocab = len(tr0.train_set.tokenizer)
    for name in names:
        trainers[name] = LoopVariant(tr0.cfg, vocab, LOOP_VARIANTS[name], device)


def peak_memory_row(device: torch.device, preset: str, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Peak resident-memory growth of one step of variant ``name`` in a fresh process (CPU, Linux)."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--memory-variant", name, "--devices", device.type,
           "--cpu-preset", preset, "--gpu-preset", preset]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # a fixed mmap threshold: glibc otherwise raises it after the first frees and keeps freed
    # activations in its heap, so the resident set of later steps no longer shows their peak
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _vm_kib(key: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return int(ln.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory_here(device: torch.device, preset: str, args: argparse.Namespace, name: str) -> None:
    """Child of :func:`peak_memory_row`: build, one warm-up step, reset VmHWM, two steps, print JSON."""
    import gc

    spec = {**VARIANTS, "pcgrad@param": PARAM_VARIANT, "pcgrad@ghost": GHOST_VARIANT}
    trainers, batches = build_trainers(preset, device, args.batch_size,
                                       {"plain": VARIANTS["plain"]} if name in LOOP_VARIANTS else {name: spec[name]})
    if name in LOOP_VARIANTS:
        add_loop_variants(trainers, device, [name])
    tr = trainers[name]
    tr.train_step(batches[0])
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    base = _vm_kib("VmRSS")
    for b in batches[1:3]:
        tr.train_step(b)
    peak = _vm_kib("VmHWM")
    model = tr.model if isinstance(tr, LoopVariant) else tr.raw_model
    P = sum(p.numel() for p in model.parameters())
    B = batches[0]["video"].shape[0]
    print(json.dumps({"variant": name, "step_peak_mib": (peak - base) / 1024, "B": B, "P": P,
                      "BP_float32_mib": B * P * 4 / 2**20}))


PHASES = ("plain.forward", "plain.backward", "ghost.forward", "ghost.output_grads", "ghost.prepare", "ghost.gram",
          "ghost.solve", "ghost.combine")


def profile_phases(trainers: dict[str, Any], batches: list[dict[str, torch.Tensor]], steps: int) -> dict[str, float]:
    """Mean ms per step of each ``record_function`` phase of loop:plain and loop:pcgrad@ghost."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, float] = {}
    for name in ("loop:plain", "loop:pcgrad@ghost"):
        tr = trainers[name]
        tr.train_step(batches[0])  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for r in range(steps):
                tr.train_step(batches[r % len(batches)])
            total = (time.perf_counter() - t0) * 1e3 / steps
        for ev in prof.key_averages():
            if ev.key in PHASES:
                out[ev.key] = out.get(ev.key, 0.0) + ev.cpu_time_total / 1e3 / steps
        out[name.split(":")[1].split("@")[-1] + " total (profiled)"] = total
    return out


def run(device: torch.device, preset: str, args: argparse.Namespace) -> dict[str, Any]:
    variants = dict(VARIANTS)
    if args.parameter_level:
        variants["pcgrad@param"] = PARAM_VARIANT
    if args.ghost:  # the comparison the parameter-level rows need, without the six feature rows
        variants = {k: v for k, v in variants.items() if k in ("plain", "pcgrad", "pcgrad@param")}
        variants["pcgrad@ghost"] = GHOST_VARIANT
    trainers, batches = build_trainers(preset, device, args.batch_size, variants)
    if args.ghost:
        add_loop_variants(trainers, device, [k for k in LOOP_VARIANTS if k not in args.skip])
    for k in args.skip:
        trainers.pop(k, None)
    if args.memory_only:
        args.memory = True
        rows = [{"variant": k, "median_ms": float("nan"), "p20_ms": float("nan"), "p80_ms": float("nan"), "n": 0,
                 "vs_plain": float("nan")} for k in trainers]
    else:
        rows = summarize(measure(trainers, batches, args.steps, args.warmup, device))
    tr0 = next(iter(trainers.values()))
    meta = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "commit": git_commit(), "preset": preset, "batch_size": tr0.cfg.train.batch_size,
            "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "backend": tr0.cfg.harmony.backend}
    os.makedirs(args.out, exist_ok=True)
    if args.memory:
        mem = {r["variant"]: r for r in (peak_memory_row(device, preset, args, k) for k in trainers)}
        for row in rows:
            row.update({k: v for k, v in mem.get(row["variant"], {}).items() if k != "variant"})
    if args.profile and args.ghost:
        phases = profile_phases(trainers, batches, max(3, args.steps // 2))
        text = (f"# ParameterHarmonizer phases vs plain (record_function, torch.profiler), {meta['device_name']}, "
                f"commit {meta['commit']}\n# {preset}, batch {meta['batch_size']}, {meta['threads']} thread(s), "
                f"torch {meta['torch']}; mean ms per step over {max(3, args.steps // 2)} profiled steps\n")
        text += "".join(f"{k:<28}{v:9.1f}\n" for k, v in phases.items())
        with open(os.path.join(args.out, f"ghost_phases_{device.type}_{preset}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        print(text)
    stem = os.path.join(args.out, f"train_step_{device.type}" + (f"_ghost_{preset}" if args.ghost else "")
                        + ("_memory" if args.memory_only else ""))
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    md = to_markdown(meta, rows)
    if args.memory:
        md += "\n| variant | step peak RSS growth MiB | B*P float32 MiB |\n|---|---|---|\n" + "\n".join(
            f"| {r['variant']} | {r.get('step_peak_mib', float('nan')):.1f} | {r.get('BP_float32_mib', float('nan')):.1f} |"
            for r in rows) + "\n"
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
    p.add_argument("--ghost", action="store_true",
                   help="parameter-level rows: loop:plain, loop:pcgrad@ghost, loop:pcgrad@vmap (+ plain, pcgrad, "
                        "and pcgrad@param with --parameter-level)")
    p.add_argument("--memory", action="store_true", help="also each variant's peak memory (a process each)")
    p.add_argument("--profile", action="store_true", help="with --ghost: per-phase times (ghost_phases_*.txt)")
    p.add_argument("--memory-only", action="store_true", help="only the peak memory rows (no timing)")
    p.add_argument("--skip", default="", type=lambda v: [x for x in v.split(",") if x],
                   help="comma list of variants to leave out (e.g. the slow loop:pcgrad@vmap on a bigger preset)")
    p.add_argument("--memory-variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--wrapper", action=argparse.BooleanOptionalAction, default=True,
                   help="also time HarmonizedOptimizer at both granularities next to plain training")
    p.add_argument("--vatt", action=argparse.BooleanOptionalAction, default=True,
                   help="time the VATT trainer variants")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_variant:
        dev = torch.device(args.devices if args.devices != "auto" else "cpu")
        measure_memory_here(dev, args.cpu_preset if dev.type == "cpu" else args.gpu_preset, args, args.memory_variant)
        return 0
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else args.devices.split(",")
    for dev in devices:
        if dev == "cuda" and not torch.cuda.is_available():
            print("cuda requested but not available; skipped")
            continue
        if args.vatt:
            for preset in (args.cpu_preset if dev == "cpu" else args.gpu_preset).split(","):
                run(torch.device(dev), preset, args)
        if args.wrapper:
            run_wrapper(torch.device(dev), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
