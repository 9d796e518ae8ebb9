"""The run folder (``--out``) and its write policy.

Layout: ``config.json``, ``metrics.jsonl``, ``samples.jsonl`` (``train.log_samples``), ``checkpoints/step_XXXXXXXX.pt``, ``plots/*.png``,
``summary.json``. Only rank 0 writes. Policy:

* at the start (:meth:`RunFolder.prepare`) the folder is created and ``config.json`` written; a
  folder that cannot be written (read-only, under a file, disk full) is a bad ``--out``
  (:class:`~gradharmony.vatt.config.ConfigError`, exit 2); ``.tmp_*`` files of interrupted
  checkpoint writes are removed; metrics and per-sample records after the step resumed from are
  dropped (an unparseable last line with a warning);
* during the run a failed write raises :class:`RunIOError` (exit 3) naming the file and what was
  kept (the last checkpoint and the metrics up to it);
* a finished run resumed again reuses its logged final evaluation (:meth:`RunFolder.logged_eval`).
"""
from __future__ import annotations

import errno
import json
import os
from typing import Any, Optional

from .checkpoint import find_latest, list_checkpoints, remove_stale_tmp, save_checkpoint
from .config import ConfigError
from .metering import MetricsLog

__all__ = ["RunFolder", "RunIOError"]


class RunIOError(RuntimeError):
    """Writing the run folder failed during training (disk full, folder removed, ...).

    The message says what failed and what was kept. The command line exits with code 3 for it.
    """


class RunFolder:
    """Paths and writes of one run folder (writes happen on rank 0 only: ``is_main``)."""

    def __init__(self, path: str, is_main: bool = True):
        self.path, self.is_main = path, is_main
        self.metrics_path = os.path.join(path, "metrics.jsonl")
        self.samples_path = os.path.join(path, "samples.jsonl")
        self.ckpt_dir = os.path.join(path, "checkpoints")
        self.metrics = MetricsLog(self.metrics_path, enabled=is_main)
        self.samples = MetricsLog(self.samples_path, enabled=is_main)  # one record per step, same policy

    def latest(self) -> Optional[str]:
        """The highest-step checkpoint, or None."""
        return find_latest(self.ckpt_dir)

    def prepare(self, config: dict[str, Any], step: int, first_record: Optional[dict[str, Any]] = None) -> None:
        """Create the folder, write ``config.json``, tidy up; ``step`` is where this session starts.

        At step 0 old checkpoints (``--overwrite``) are removed and ``first_record`` is logged.
        Raises :class:`ConfigError` naming ``--out`` when the folder cannot be written.
        """
        try:
            os.makedirs(self.path, exist_ok=True)
            with open(os.path.join(self.path, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
            if step == 0:
                for old in list_checkpoints(self.ckpt_dir):  # only reached with --overwrite
                    os.unlink(old)
            for folder in (self.path, self.ckpt_dir):  # checkpoint and metrics rewrites
                if os.path.isdir(folder):
                    for p in remove_stale_tmp(folder):
                        print(f"removed {p} (left by an interrupted write)", flush=True)
            self.metrics.truncate(step if step else -1)  # a fresh start keeps no old record
            self.samples.truncate(step if step else -1)
            if step == 0 and first_record is not None:
                self.metrics.append(first_record)
        except OSError as e:
            raise ConfigError(f"--out: {self.path}: cannot write the run folder "
                              f"({e.strerror or e}{': ' + e.filename if e.filename else ''})") from None
        except ValueError as e:  # an unparseable metrics line before the last
            raise ConfigError(f"--out: {e}") from None

    def io_error(self, path: str, err: OSError, step: int, last_checkpoint: Optional[str]) -> RunIOError:
        """The :class:`RunIOError` for a failed write of ``path`` at ``step``, saying what was kept."""
        last = last_checkpoint or self.latest()
        why = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        kept = (f"kept: the checkpoint {last} and the metrics in {self.metrics_path} up to it; "
                f"free space and continue with --resume latest" if last else
                "kept: nothing (no checkpoint written yet); free space and start again")
        return RunIOError(f"--out: cannot write {path} at step {step} ({why}); {kept}")

    def log(self, rec: dict[str, Any], last_checkpoint: Optional[str] = None) -> None:
        """Append one metrics record; raises :class:`RunIOError` when it cannot be written."""
        try:
            self.metrics.append(rec)
        except OSError as e:
            raise self.io_error(self.metrics_path, e, rec.get("step", -1), last_checkpoint) from None

    def log_samples(self, rec: dict[str, Any], last_checkpoint: Optional[str] = None) -> None:
        """Append one per-sample record to ``samples.jsonl``; :class:`RunIOError` when it cannot be written."""
        try:
            self.samples.append(rec)
        except OSError as e:
            raise self.io_error(self.samples_path, e, rec.get("step", -1), last_checkpoint) from None

    def logged_eval(self, step: int) -> Optional[dict[str, float]]:
        """The ``eval/`` metrics already logged for ``step`` (a finished run resumed again), or None."""
        done = [r for r in self.metrics.records()
                if r.get("step") == step and any(k.startswith("eval/") for k in r)]
        return {k: v for k, v in done[-1].items() if k.startswith("eval/")} if done else None

    def save(self, step: int, payload: dict[str, Any], keep: int, last_checkpoint: Optional[str]) -> str:
        """Atomic checkpoint of ``step`` (see :func:`save_checkpoint`); :class:`RunIOError` on failure."""
        try:
            return save_checkpoint(self.ckpt_dir, step, payload, keep=keep)
        except OSError as e:
            target = os.path.join(self.ckpt_dir, f"step_{step:08d}.pt")
            raise self.io_error(target, e, step, last_checkpoint) from None

    def write_summary(self, summary: dict[str, Any], step: int, last_checkpoint: Optional[str]) -> None:
        """``summary.json``; the plots go to :meth:`plots` first."""
        path = os.path.join(self.path, "summary.json")
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        except OSError as e:
            raise self.io_error(path, e, step, last_checkpoint) from None

    def plots(self, step: int, last_checkpoint: Optional[str]) -> list[str]:
        """Write ``plots/*.png`` from ``metrics.jsonl``; returns their paths."""
        from .plots import make_plots

        folder = os.path.join(self.path, "plots")
        try:
            return make_plots(self.metrics_path, folder)
        except OSError as e:
            raise self.io_error(folder, e, step, last_checkpoint) from None
