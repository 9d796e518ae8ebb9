"""The study's runs: methods, claims, grid sizes, run folders, and their launch through the trainer's CLI.

A run is one ``gradharmony-pretrain`` invocation (``python -m gradharmony.vatt``) with
``--resume latest``, in a folder named by its method, misalignment rate and seed plus a short hash
of every option, so that:

* claims with the same settings share their runs (same settings -> same folder): claims 2-4 do;
  claim 1 (conflicts) adds the parameter-level measurement and so has its own runs;
* a finished run (``summary.json`` with ``status == "completed"`` at the planned step) is not
  re-run, and an interrupted one continues from its last checkpoint;
* a change of settings (another ``--steps``, the smoke profile) never reuses a folder.

The driver writes ``study_run.json`` into each run folder: the command, and per session the wall
time, exit code, threads and concurrent jobs.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["METHODS", "CLAIMS", "PROFILES", "RunSpec", "Profile", "build_grid", "is_finished", "launch_all"]


@dataclass(frozen=True)
class Method:
    """A compared training method: a label and the trainer options that make it."""

    id: str
    label: str
    options: dict[str, str]


METHODS: dict[str, Method] = {m.id: m for m in (
    Method("sum", "plain VATT (sum)", {"harmony.method": "sum", "harmony.curriculum": "off"}),
    Method("pcgrad", "PCGrad", {"harmony.method": "pcgrad", "harmony.curriculum": "off"}),
    Method("gradvac", "GradVac", {"harmony.method": "gradvac", "harmony.curriculum": "off"}),
    Method("curriculum", "curriculum only (sum + curriculum)",
           {"harmony.method": "sum", "harmony.curriculum": "fraction"}),
    Method("pcgrad+curriculum", "PCGrad + curriculum",
           {"harmony.method": "pcgrad", "harmony.curriculum": "fraction"}),
)}
BASELINE = "sum"


# Parameter-level measurement cadence of the conflicts claim. Measured on the 2-core CPU (tiny preset, batch 32,
# 2 jobs x 1 thread, load average ~7): 40 steps took 5.8 s of training without and 12.3 s with a measurement every
# step, i.e. one measurement costs ~0.16 s (~1.1 training steps); every 5th step adds ~22 % to the training time
# and gives 80 measured batches (2560 per-sample pairs) per 400-step run.
MEASURE_PARAM_EVERY = 5


@dataclass(frozen=True)
class Claim:
    """One claim of the paper as an experiment: the question, and options its runs add."""

    id: str
    question: str
    extra_options: dict[str, str] = field(default_factory=dict)
    methods: tuple[str, ...] = ()  # the methods it runs by default (empty: all of METHODS)


CLAIMS: dict[str, Claim] = {c.id: c for c in (
    Claim("conflicts", "Do gradient conflicts mark noise? Per-sample cosine between the video-audio and "
          "video-text loss gradients, aligned vs misaligned triplets, feature and parameter level.",
          # the parameter-level per-sample cosines measured beside the feature-level ones every MEASURE_PARAM_EVERY
          # steps (samples.jsonl "cos_param"); the measurement leaves the update unchanged, but its runs have their
          # own folders and are kept out of the other claims' cells (aggregate.collect)
          {"harmony.measure_param_every": str(MEASURE_PARAM_EVERY)}, methods=("sum", "pcgrad")),
    Claim("methods", "Do realignment (PCGrad, GradVac) and the conflict curriculum help? Held-out retrieval "
          "and linear probe per method."),
    Claim("score", "Does the curriculum's conflict score find the noise? AUROC and precision at the kept "
          "fraction against the misaligned labels, over training."),
    Claim("scaling", "Does the gap between methods grow with the misalignment rate?"),
)}


@dataclass(frozen=True)
class Profile:
    """Grid size: trainer options common to every run, seeds, misalignment rates."""

    name: str
    options: dict[str, Any]
    seeds: tuple[int, ...]
    misalignment: tuple[float, ...]
    preset: str = "tiny"
    claim_options: dict[str, dict[str, str]] = field(default_factory=dict)  # per claim, over Claim.extra_options


# Full grid: 400 steps of batch 32 on the tiny preset (its default is 600), evaluation at 0, 200 and 400;
# 5 methods x 3 seeds x 3 rates = 45 runs. Measured on the 2-core CPU shared with other jobs (load average
# 5-7): two 600-step runs side by side took 236 s each (~80 min for the grid), too long for the one-hour
# budget; at 400 steps R@10 of `sum` at misalignment 0 is already past 0.9 (0.93-0.95 at step 450 of the
# 600-step runs). The 45 runs of 400 steps took 35 min (12:28-13:03 UTC, load average 2.9-6.8).
FULL = Profile("full", {"train.steps": 400, "train.eval_every": 200, "train.log_every": 10,
                        "train.ckpt_every": 200, "harmony.level": "feature"},
               seeds=(0, 1, 2), misalignment=(0.0, 0.3, 0.6))
# Smoke: two steps on seconds-sized shapes, one seed; proves the plumbing, measures nothing.
SMOKE = Profile("smoke", {
    "data.frames": 4, "data.size": 16, "data.audio_samples": 256, "data.num_narrations": 2,
    "data.max_text_len": 12, "data.train_size": 32, "data.eval_size": 16,
    "model.video_patch": "2,8,8", "model.audio_patch": 32, "model.d_model": 16, "model.depth": 1,
    "model.heads": 2, "model.va_dim": 16, "model.vt_dim": 8, "model.mlp_ratio": 2.0,
    "train.batch_size": 8, "train.steps": 2, "train.warmup_steps": 1, "train.log_every": 1,
    "train.eval_every": 0, "train.ckpt_every": 100, "train.eval_batch_size": 16, "harmony.level": "feature",
}, seeds=(0,), misalignment=(0.0, 0.3, 0.6),
    claim_options={"conflicts": {"harmony.measure_param_every": "1"}})  # two steps: measure both
PROFILES = {"full": FULL, "smoke": SMOKE}


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    method: str
    seed: int
    misalignment: float
    options: tuple[tuple[str, str], ...]  # every --set option, sorted
    preset: str
    folder: str

    @property
    def steps(self) -> int:
        return int(float(dict(self.options)["train.steps"]))

    def argv(self, threads: int) -> list[str]:
        """The trainer's command-line arguments (after ``gradharmony-pretrain``)."""
        args = ["--preset", self.preset, "--out", self.folder, "--resume", "latest", "--no-progress", "--no-plots",
                "--seed", str(self.seed), "--misaligned-fraction", f"{self.misalignment:g}",
                "--threads", str(threads)]
        for k, v in self.options:
            args += ["--set", f"{k}={v}"]
        return args


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    return str(v)


def build_grid(root: str, profile: Profile, claims: list[str], methods: Optional[list[str]] = None,
               seeds: Optional[list[int]] = None, misalignment: Optional[list[float]] = None,
               extra: Optional[dict[str, str]] = None) -> list[RunSpec]:
    """The runs of ``claims`` (deduplicated: claims with the same options share runs). Without ``methods``
    each claim runs its own :attr:`Claim.methods` (all methods when empty); with it, the given ones."""
    unknown = [c for c in claims if c not in CLAIMS]
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; choose from {', '.join(CLAIMS)}")
    bad = [m for m in (methods or []) if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    specs: dict[str, RunSpec] = {}
    for claim in claims:
        for m in (methods or CLAIMS[claim].methods or METHODS):
            for mis in (misalignment if misalignment is not None else profile.misalignment):
                if not 0.0 <= mis <= 1.0:
                    raise ValueError(f"misalignment rate must be in [0, 1], got {mis}")
                for seed in (seeds if seeds is not None else profile.seeds):
                    opts = {k: _fmt(v) for k, v in profile.options.items()}
                    opts.update(METHODS[m].options)
                    opts.update(CLAIMS[claim].extra_options)
                    opts.update(profile.claim_options.get(claim, {}))
                    opts.update(extra or {})
                    items = tuple(sorted(opts.items()))
                    digest = hashlib.sha1(json.dumps([profile.preset, items]).encode()).hexdigest()[:8]
                    name = f"{m}__mis{mis:g}__seed{seed}__{digest}"
                    specs[name] = RunSpec(m, seed, float(mis), items, profile.preset, os.path.join(root, name))
    return list(specs.values())


def is_finished(spec: RunSpec) -> bool:
    """A completed ``summary.json`` at the planned step: the run is not launched again."""
    try:
        with open(os.path.join(spec.folder, "summary.json"), encoding="utf-8") as f:
            s = json.load(f)
    except (OSError, ValueError):
        return False
    return s.get("status") == "completed" and s.get("step") == spec.steps


def _record(spec: RunSpec, argv: list[str], session: dict[str, Any]) -> None:
    path = os.path.join(spec.folder, "study_run.json")
    rec: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
        except ValueError:
            rec = {}
    rec.update({"method": spec.method, "seed": spec.seed, "misalignment": spec.misalignment,
                "preset": spec.preset, "options": dict(spec.options), "argv": argv})
    rec.setdefault("sessions", []).append(session)
    rec["wall_s"] = sum(s["wall_s"] for s in rec["sessions"])
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=2)
    os.replace(tmp, path)


def _run_subprocess(spec: RunSpec, argv: list[str], threads: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(os.path.join(spec.folder, "stdout.log"), "a", encoding="utf-8") as log:
        return subprocess.call([sys.executable, "-m", "gradharmony.vatt", *argv], stdout=log,
                               stderr=subprocess.STDOUT, env=env)


def _run_inprocess(spec: RunSpec, argv: list[str], threads: int) -> int:
    from gradharmony.vatt.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(argv)
        except Exception as e:  # recorded as a failed run, the grid goes on
            print(f"{type(e).__name__}: {e}")
            rc = 3
    with open(os.path.join(spec.folder, "stdout.log"), "a", encoding="utf-8") as log:
        log.write(buf.getvalue())
    return rc


def launch_one(spec: RunSpec, threads: int, jobs: int, inprocess: bool = False) -> dict[str, Any]:
    """Run (or continue) one run; returns its session record."""
    os.makedirs(spec.folder, exist_ok=True)
    argv = spec.argv(threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tic = time.perf_counter()
    rc = (_run_inprocess if inprocess else _run_subprocess)(spec, argv, threads)
    session = {"started": started, "wall_s": time.perf_counter() - tic, "rc": rc, "threads": threads, "jobs": jobs}
    _record(spec, argv, session)
    return session


def launch_all(specs: list[RunSpec], jobs: int = 2, threads: int = 1, inprocess: bool = False,
               log: Callable[[str], None] = print) -> dict[str, int]:
    """Launch every unfinished run, ``jobs`` at a time with ``threads`` torch threads each.

    Returns {run folder name: exit code} of the runs launched. On the 2-core development machine,
    2 jobs x 1 thread finished two 600-step runs in 127 s, 1 job x 1 thread in 143 s and 1 job x 2
    threads in 511 s (shared machine, load average ~5; the tiny model does not scale with threads).
    """
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got {jobs} and {threads}")
    if inprocess and jobs != 1:
        raise ValueError("the in-process launcher runs one job at a time (--jobs 1)")
    todo = [s for s in specs if not is_finished(s)]
    log(f"{len(specs)} runs in the grid, {len(specs) - len(todo)} finished, {len(todo)} to run "
        f"({jobs} job(s) x {threads} thread(s))")
    results: dict[str, int] = {}

    def one(i_spec: tuple[int, RunSpec]) -> None:
        i, spec = i_spec
        sess = launch_one(spec, threads, jobs, inprocess)
        results[os.path.basename(spec.folder)] = sess["rc"]
        log(f"[{i + 1}/{len(todo)}] {os.path.basename(spec.folder)}: exit {sess['rc']}, {sess['wall_s']:.1f} s")

    if jobs == 1:
        for item in enumerate(todo):
            one(item)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, enumerate(todo)))
    return results
