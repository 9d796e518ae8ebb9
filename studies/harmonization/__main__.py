"""Command line of the study: ``python -m studies.harmonization {run,report} ...``.

    python -m studies.harmonization run methods            # one claim's grid, then the report
    python -m studies.harmonization run all                # every claim (they share runs), 2 runs at a time
    python -m studies.harmonization run all --smoke        # two steps, one seed: the plumbing only
    python -m studies.harmonization report                 # aggregate the finished runs again

Runs go to ``runs/study/<profile>`` (``--runs``); the report to ``docs/RESULTS.md`` with raw
results and figures in ``docs/results/harmonization/`` (``--docs``; the smoke profile writes
into ``<runs>/docs`` unless ``--docs`` is given). Exit status: 0 all runs finished, 1 a run
failed (the others still ran, the report lists it), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Optional

from .grid import CLAIMS, METHODS, PROFILES, Profile, build_grid, launch_all

PROG = "python -m studies.harmonization"


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The gradient-harmonization study (docs/RESULTS.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--smoke", action="store_true", help="two steps on tiny shapes, one seed (plumbing only)")
        q.add_argument("--runs", help="run folders (default runs/study/<profile>)")
        q.add_argument("--docs", help="report folder: RESULTS.md + results/harmonization/ "
                                      "(default docs, or <runs>/docs with --smoke)")

    r = sub.add_parser("run", help="launch the grid of one or more claims, then write the report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("claims", nargs="+", choices=[*CLAIMS, "all"], help="which claim(s)")
    common(r)
    r.add_argument("--jobs", type=int, help="runs at a time (default 2; 1 with --inprocess)")
    r.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (measured on 2 cores: 2 jobs x 1 thread beats 1 job x 2 threads)")
    r.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    r.add_argument("--seeds", help="comma-separated seeds (default: the profile's)")
    r.add_argument("--misalignment", help="comma-separated misalignment rates (default: the profile's)")
    r.add_argument("--steps", type=int, help="training steps per run (default: the profile's)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra trainer option for every run (changes the run folders)")
    r.add_argument("--inprocess", action="store_true", help="run the trainer in this process (one job; tests)")
    r.add_argument("--dry-run", action="store_true", help="print the runs and their commands, launch nothing")
    r.add_argument("--no-report", action="store_true", help="do not aggregate / write the report afterwards")
    rep = sub.add_parser("report", help="aggregate the run folders and write the report",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(rep)
    return p


def _paths(args: argparse.Namespace) -> tuple[Profile, str, str]:
    profile = PROFILES["smoke" if args.smoke else "full"]
    runs = args.runs or os.path.join("runs", "study", profile.name)
    docs = args.docs or (os.path.join(runs, "docs") if args.smoke else "docs")
    return profile, runs, docs


def _commit() -> str:
    if os.environ.get("GH_COMMIT"):
        return os.environ["GH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _meta(profile: Profile, args: argparse.Namespace, runs: str, results: dict[str, Any]) -> dict[str, Any]:
    import torch

    flags = (" --smoke" if args.smoke else "") + (f" --runs {shlex.quote(args.runs)}" if args.runs else "")
    jobs = getattr(args, "jobs", None)
    seeds = sorted({r["seed"] for r in results["runs"] if r["seed"] is not None})
    options = dict(profile.options)
    steps = sorted({r["steps_planned"] for r in results["runs"] if r["steps_planned"] is not None})
    if steps:
        options["train.steps"] = ",".join(map(str, steps))
    if not jobs:  # `report`: as recorded by the runs' last sessions
        jobs = ",".join(map(str, sorted({r["jobs"] for r in results["runs"] if r.get("jobs")}))) or None
    j = f" --jobs {jobs}" if jobs and "," not in str(jobs) else ""
    return {
        "profile": profile.name, "preset": profile.preset, "options": options, "seeds": seeds,
        "rates": results["rates"], "methods": results["methods"], "runs_folder": runs, "jobs": jobs or "?",
        "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU ({platform.system()})",
        "software": f"torch {torch.__version__}, Python {platform.python_version()}",
        "commands": {c: f"{PROG} run {c}{flags}{j}" for c in CLAIMS},
        "command_all": f"{PROG} run all{flags}{j}",
    }


def report(profile: Profile, args: argparse.Namespace, runs: str, docs: str) -> dict[str, Any]:
    """Aggregate ``runs`` and write raw results, figures and RESULTS.md under ``docs``."""
    from .aggregate import collect
    from .figures import make_figures
    from .report import write_raw, write_report

    res = collect(runs)
    meta = _meta(profile, args, runs, res)
    out = os.path.join(docs, "results", "harmonization")
    raw = write_raw(res, meta, out)
    figs = make_figures(res, out)
    write_report(res, meta, os.path.join(docs, "RESULTS.md"), raw, figs)
    print(f"[{PROG}] {len(res['runs'])} runs aggregated -> {os.path.join(docs, 'RESULTS.md')}, {out}/")
    for msg in res["missing"]:
        print(f"[{PROG}] missing: {msg}")
    return res


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    profile, runs, docs = _paths(args)
    if args.cmd == "report":
        report(profile, args, runs, docs)
        return 0
    try:
        claims = list(CLAIMS) if "all" in args.claims else list(dict.fromkeys(args.claims))
        extra = {}
        for item in args.set:
            if "=" not in item:
                raise ValueError(f"--set: expected SECTION.FIELD=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            extra[k.strip()] = v
        if args.steps is not None:
            if args.steps < 1:
                raise ValueError(f"--steps must be >= 1, got {args.steps}")
            extra["train.steps"] = str(args.steps)
        specs = build_grid(runs, profile, claims, methods=args.methods.split(",") if args.methods else None,
                           seeds=_ints(args.seeds) if args.seeds else None,
                           misalignment=_floats(args.misalignment) if args.misalignment else None, extra=extra)
        if args.jobs is None:
            args.jobs = 1 if args.inprocess else 2
        if args.jobs < 1 or args.threads < 1 or (args.inprocess and args.jobs != 1):
            raise ValueError("--jobs and --threads must be >= 1, and --inprocess needs --jobs 1")
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for s in specs:
            print("gradharmony-pretrain " + " ".join(shlex.quote(a) for a in s.argv(args.threads)))
        return 0
    os.makedirs(runs, exist_ok=True)
    codes = launch_all(specs, jobs=args.jobs, threads=args.threads, inprocess=args.inprocess)
    failed = {k: v for k, v in codes.items() if v != 0}
    if failed:
        print(f"[{PROG}] {len(failed)} run(s) failed: " + ", ".join(f"{k} (exit {v})" for k, v in failed.items()),
              file=sys.stderr)
    if not args.no_report:
        report(profile, args, runs, docs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
