"""Command line: ``gradharmony-pretrain`` / ``python -m gradharmony.vatt`` (also under ``torchrun``).

Configuration = preset (``--preset``) <- ``--config`` file (JSON, or YAML with PyYAML) <- flags
below <- ``--set section.field=value`` (any config field). Exit codes: 0 done, 1 stopped on a
non-finite loss, 2 bad option / config / data / checkpoint (including an ``--out`` that cannot be
written at the start), 3 a write to the run folder failed during training (disk full, ...); the
message says what was kept.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, Optional

from .config import CURRICULA, LEVELS, METHODS, PRESETS, Config, ConfigError, build_config

__all__ = ["main", "parse_args", "config_from_args"]

PROG = "gradharmony-pretrain"

#: Exit codes (README "Reference VATT pre-training").
EXIT_OK, EXIT_NONFINITE, EXIT_BAD_INPUT, EXIT_IO = 0, 1, 2, 3

# flag -> config key
FLAG_KEYS: dict[str, str] = {
    "steps": "train.steps", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "out": "train.out", "resume": "train.resume", "device": "train.device", "log_every": "train.log_every",
    "eval_every": "train.eval_every", "ckpt_every": "train.ckpt_every", "stop_after": "train.stop_after",
    "method": "harmony.method", "level": "harmony.level", "curriculum": "harmony.curriculum",
    "curriculum_mode": "harmony.curriculum_mode", "curriculum_start": "harmony.curriculum_start",
    "curriculum_end": "harmony.curriculum_end", "data": "data.manifest", "eval_data": "data.eval_manifest",
    "misaligned_fraction": "data.misaligned_fraction", "backbone": "model.backbone",
    "drop_token": "model.drop_token", "threads": "train.threads",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reference VATT pre-training with cross-modality gradient harmonization (gradharmony). "
                    "Defaults shown are the tiny preset's, on the embedded digits data.",
        epilog=f"exit codes: {EXIT_OK} done, {EXIT_NONFINITE} stopped on a non-finite loss (last good checkpoint "
               f"kept), {EXIT_BAD_INPUT} bad option/config/data/checkpoint or unwritable --out, {EXIT_IO} a write "
               f"to the run folder failed during training (the message says what was kept)")
    tiny = build_config("tiny")

    def a(flag: str, help: str, choices: Optional[Sequence[str]] = None, **kw: Any) -> None:  # noqa: A002
        key = FLAG_KEYS.get(flag.lstrip("-").replace("-", "_"))
        if choices:
            help += f"; one of {', '.join(choices)}"
        if key is not None and "default:" not in help:
            sec, name = key.split(".")
            value = getattr(getattr(tiny, sec), name)
            help += f" (default: {'none' if value is None else value})"
        p.add_argument(flag, help=help, **kw)

    a("--config", "JSON (or YAML, needs PyYAML) file with sections model/data/harmony/train")
    a("--preset", "model/data size preset (default: the config file's, else tiny)", choices=list(PRESETS))
    a("--steps", "total optimizer steps")
    a("--batch-size", "global batch size (split over DDP ranks)")
    a("--lr", "peak learning rate (Adam, linear warm-up then cosine decay)")
    a("--method", "realignment rule (sum = plain VATT)", choices=METHODS)
    a("--level", "where conflicts are measured: the shared video features, per-sample parameter "
                 "gradients over all shared parameters (--set harmony.param_decomposition=path|term), or no "
                 "measurement", choices=LEVELS)
    a("--curriculum", "conflict curriculum", choices=CURRICULA)
    a("--curriculum-mode", "hard (drop) or soft (sigmoid weight)", choices=("hard", "soft"))
    a("--curriculum-start", "start value: fraction kept, or cosine threshold (default: 0.5 for fraction, "
                            "0.0 for threshold)")
    a("--curriculum-end", "end value (default: 1.0 for fraction, -1.0 for threshold)")
    a("--data", "training manifest (.jsonl/.csv); default: embedded digits data")
    a("--eval-data", "evaluation manifest (default: the last clips of --data, held out of training; "
                    "data.eval_split)")
    a("--skip-bad", "skip (and count) bad clips instead of failing", action="store_true")
    a("--misaligned-fraction", "embedded data: fraction of misaligned training triplets")
    a("--backbone", "modality-agnostic (one Transformer) or modality-specific", choices=("shared", "specific"))
    a("--drop-token", "DropToken rate for video and audio tokens")
    a("--out", "run folder; default: runs/vatt-<preset>-<UTC time>")
    a("--overwrite", "start over in an --out that holds checkpoints", action="store_true")
    a("--seed", "random seed (data, init, DropToken)")
    a("--resume", "'latest' (highest step in <out>/checkpoints) or a checkpoint path")
    a("--stop-after", "stop (with a checkpoint) after this many steps in this session")
    a("--device", "cpu, cuda, cuda:N or auto")
    a("--threads", "torch CPU threads per process (0 = torch default)")
    a("--log-every", "steps between metrics records")
    a("--eval-every", "steps between evaluations (0 = only at the end)")
    a("--ckpt-every", "steps between checkpoints")
    a("--no-progress", "no tqdm progress bar", action="store_true")
    a("--no-plots", "no PNG plots at the end", action="store_true")
    a("--set", "set any config field (repeatable)", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    a("--print-config", "print the resolved config as JSON and exit", action="store_true")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve preset, file, flags and ``--set`` into a validated :class:`Config`."""
    overrides: dict[str, Any] = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.skip_bad:
        overrides["data.skip_bad"] = True
    if args.no_progress:
        overrides["train.progress"] = False
    if args.no_plots:
        overrides["train.plots"] = False
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set: expected SECTION.FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    given = {flag for flag in FLAG_KEYS if getattr(args, flag) is not None}
    try:
        return build_config(args.preset, args.config, overrides)
    except ConfigError as e:
        raise ConfigError(_flag_name(str(e), given)) from None


def _flag_name(msg: str, given: set[str]) -> str:
    """Name the command-line flag in a message about a config key it set (``train.steps: ...``)."""
    for flag, key in FLAG_KEYS.items():
        if flag in given and msg.startswith(key + ":"):
            return f"--{flag.replace('_', '-')} ({key}){msg[len(key):]}"
    return msg


def _report(summary: dict[str, Any]) -> None:
    keys = ("eval/v2t_R@1", "eval/v2t_R@10", "eval/t2v_R@10", "eval/v2a_R@10", "eval/a2v_R@10", "eval/v2t_class_R@1",
            "eval/v2a_class_R@1", "eval/probe_acc", "eval/auroc_conflict", "eval/auroc_conflict_pass")
    print(f"[{PROG}] {summary['status']} at step {summary['step']} "
          f"({summary['train_time_s']:.1f}s in training steps)")
    if summary.get("data/skipped"):
        print(f"  {'data/skipped':24s} {summary['data/skipped']} bad clips skipped (--skip-bad)")
    for k in keys:
        if k in summary:
            chance = summary.get(k.replace("eval/", "eval/chance/", 1), 0.5 if "auroc" in k else None)
            within = summary.get(k.replace("eval/", "eval/chance_within_class/", 1))
            note = "" if chance is None else f"   (chance {chance:.4f}" + (
                "" if within is None else f", within-class chance {within:.4f}") + ")"
            print(f"  {k:24s} {summary[k]:.4f}{note}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 non-finite loss, 2 bad option/config/data, 3 I/O failure)."""
    args = parse_args(argv)
    from .data import DataError

    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return EXIT_OK
        return _run(cfg, overwrite=args.overwrite)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(cfg: Config, overwrite: bool = False) -> int:
    import gc

    from .distributed import cleanup, init_distributed
    from .trainer import RunIOError, Trainer

    try:
        ctx = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    trainer = None
    try:
        trainer = Trainer(cfg, ctx, overwrite=overwrite)
        try:
            summary = trainer.fit()
        except RunIOError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return EXIT_IO
        if ctx.is_main:
            _report(summary)
            print(f"[{PROG}] run folder: {trainer.run_dir}")
        return EXIT_NONFINITE if summary["status"] == "nonfinite" else EXIT_OK
    finally:
        del trainer  # the DDP wrapper must go before its process group
        gc.collect()
        cleanup(ctx)
