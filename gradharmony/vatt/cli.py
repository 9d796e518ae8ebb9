"""Command line: ``gradharmony-pretrain`` / ``python -m gradharmony.vatt`` (also under ``torchrun``).

Configuration = preset (``--preset``) <- ``--config`` file (JSON, or YAML with PyYAML) <- flags
below <- ``--set section.field=value`` (any config field). Exit codes: 0 done, 1 stopped on a
non-finite loss, 2 bad option / config / data.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, Optional

from .config import PRESETS, Config, ConfigError, build_config

__all__ = ["main", "parse_args", "config_from_args"]

PROG = "gradharmony-pretrain"

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
    p = argparse.ArgumentParser(prog=PROG, description="Reference VATT pre-training with cross-modality "
                                "gradient harmonization (gradharmony). Defaults: the tiny preset on the "
                                "embedded digits data.")
    a = p.add_argument
    a("--config", help="JSON (or YAML, needs PyYAML) file with sections model/data/harmony/train")
    a("--preset", help=f"one of {', '.join(PRESETS)} (default: the config file's, else tiny)")
    a("--steps", help="total optimizer steps")
    a("--batch-size", help="global batch size (split over DDP ranks)")
    a("--lr", help="peak learning rate (Adam, linear warm-up then cosine decay)")
    a("--method", help="realignment rule: sum (plain VATT), pcgrad, gradvac, cagrad, mgda")
    a("--level", help="where conflicts are measured: feature (shared video features, default), "
                      "parameter (per-sample parameter gradients), none (no measurement)")
    a("--curriculum", help="off, fraction or threshold")
    a("--curriculum-mode", help="hard (drop) or soft (sigmoid weight)")
    a("--curriculum-start", help="start value (fraction kept, or cosine threshold)")
    a("--curriculum-end", help="end value")
    a("--data", help="training manifest (.jsonl/.csv); default: embedded digits data")
    a("--eval-data", help="evaluation manifest (default: the last clips of --data, held out of training; "
                           "data.eval_split)")
    a("--skip-bad", action="store_true", help="skip (and count) bad clips instead of failing")
    a("--misaligned-fraction", help="embedded data: fraction of misaligned training triplets")
    a("--backbone", help="shared (modality-agnostic) or specific (one Transformer per modality)")
    a("--drop-token", help="DropToken rate for video and audio tokens")
    a("--out", help="run folder (default runs/vatt-<preset>-<time>)")
    a("--overwrite", action="store_true", help="start over in an --out that holds checkpoints")
    a("--seed", help="random seed (data, init, DropToken)")
    a("--resume", help="'latest' (highest step in <out>/checkpoints) or a checkpoint path")
    a("--stop-after", help="stop (with a checkpoint) after this many steps in this session")
    a("--device", help="cpu, cuda, cuda:N or auto")
    a("--threads", help="torch CPU threads per process (0 = torch default; tiny preset: 1)")
    a("--log-every", help="steps between metrics records")
    a("--eval-every", help="steps between evaluations (0 = only at the end)")
    a("--ckpt-every", help="steps between checkpoints")
    a("--no-progress", action="store_true", help="no tqdm progress bar")
    a("--no-plots", action="store_true", help="no PNG plots at the end")
    a("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="set any config field")
    a("--print-config", action="store_true", help="print the resolved config as JSON and exit")
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
    for k in keys:
        if k in summary:
            chance = summary.get(k.replace("eval/", "eval/chance/", 1), 0.5 if "auroc" in k else None)
            within = summary.get(k.replace("eval/", "eval/chance_within_class/", 1))
            note = "" if chance is None else f"   (chance {chance:.4f}" + (
                "" if within is None else f", within-class chance {within:.4f}") + ")"
            print(f"  {k:24s} {summary[k]:.4f}{note}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 non-finite loss, 2 bad option/config/data)."""
    args = parse_args(argv)
    from .data import DataError

    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        return _run(cfg, overwrite=args.overwrite)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _run(cfg: Config, overwrite: bool = False) -> int:
    import gc

    from .distributed import cleanup, init_distributed
    from .trainer import Trainer

    try:
        ctx = init_distributed(cfg.train.device)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    trainer = None
    try:
        trainer = Trainer(cfg, ctx, overwrite=overwrite)
        summary = trainer.fit()
        if ctx.is_main:
            _report(summary)
            print(f"[{PROG}] run folder: {trainer.run_dir}")
        return 1 if summary["status"] == "nonfinite" else 0
    finally:
        del trainer  # the DDP wrapper must go before its process group
        gc.collect()
        cleanup(ctx)
