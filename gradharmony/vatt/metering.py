"""Metering and logging of the trainer: per-interval sums, the metrics record, ``metrics.jsonl``.

One training step reports a :class:`StepOutput` (losses averaged over ranks, and the global
batch's :class:`gradharmony.ConflictStats`); a :class:`Meter` sums them over a logging interval
and turns them into one ``metrics.jsonl`` record (keys ``train/...``, see README). The conflict
fraction, kept fraction and score histogram come from ``ConflictStats``
(``conflict_fraction``, ``kept_fraction``, ``histogram()`` over ``HIST_EDGES``).

:class:`MetricsLog` appends records (rank 0) and reads them back tolerantly: an unparseable
*last* line (a write torn by a power loss, or NUL padding) is dropped with a warning; an
unparseable line before it is an error naming the file and line.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import gradharmony as gh

__all__ = ["HIST_BINS", "StepOutput", "Meter", "MetricsLog", "read_metrics"]

HIST_BINS = 20  # conflict-score histogram bins over [-1, 1] (gh.api.stats.HIST_EDGES)


@dataclass
class StepOutput:
    """What one training step reports (global values, averaged over ranks).

    ``stats``: the conflict statistics of the global batch (CPU tensors), None at level "none".
    ``cos_param``: on steps measured by ``harmony.measure_param_every``, the per-sample
    parameter-level cosines of the two losses (global batch (B,), CPU, the order of ``stats``);
    else None (see ``Trainer.measure_param_cosines``).
    """

    loss: float
    loss_va: float
    loss_vt: float
    stats: Optional[gh.ConflictStats] = None
    cos_param: Optional[Any] = None

    @property
    def conflict_fraction(self) -> float:
        return float("nan") if self.stats is None else self.stats.conflict_fraction

    @property
    def kept_fraction(self) -> float:
        return float("nan") if self.stats is None else self.stats.kept_fraction


@dataclass
class Meter:
    """Sums over the current logging interval (saved in checkpoints as plain numbers)."""

    n: int = 0
    loss: float = 0.0
    loss_va: float = 0.0
    loss_vt: float = 0.0
    conflict_fraction: float = 0.0
    kept_fraction: float = 0.0
    score_sum: float = 0.0
    score_n: int = 0
    hist: list[float] = field(default_factory=lambda: [0.0] * HIST_BINS)
    time_s: float = 0.0
    samples: int = 0

    def add(self, res: StepOutput, dt: float, batch_size: int) -> None:
        """Add one step of ``batch_size`` samples that took ``dt`` seconds."""
        self.n += 1
        self.loss += res.loss
        self.loss_va += res.loss_va
        self.loss_vt += res.loss_vt
        self.time_s += dt
        self.samples += batch_size
        s = res.stats
        if s is not None:
            self.conflict_fraction += s.conflict_fraction
            self.kept_fraction += s.kept_fraction
            score = s.score.double().clamp(-1, 1)
            self.score_sum += float(score.sum())
            self.score_n += int(score.numel())
            self.hist = [a + float(b) for a, b in zip(self.hist, s.histogram().tolist())]

    def record(self, step: int, lr: float, epoch: int,
               last_stats: Optional[gh.ConflictStats] = None) -> dict[str, Any]:
        """The interval's ``metrics.jsonl`` record; ``last_stats`` adds ``train/conflict/...`` of the last step."""
        n = max(self.n, 1)
        rec: dict[str, Any] = {"step": step, "train/loss": self.loss / n,
                               "train/loss_va": self.loss_va / n, "train/loss_vt": self.loss_vt / n,
                               "train/lr": lr, "train/samples_per_s": self.samples / max(self.time_s, 1e-9),
                               "train/epoch": epoch}
        if self.score_n:
            rec.update({"train/conflict_fraction": self.conflict_fraction / n,
                        "train/kept_fraction": self.kept_fraction / n,
                        "train/score_mean": self.score_sum / self.score_n, "train/score_hist": self.hist})
            if last_stats is not None:
                rec.update({k: float(v) for k, v in last_stats.to_dict(prefix="train/conflict/").items()})
        return rec


def read_metrics(path: str, warn: bool = True) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; an unparseable last line is dropped (with a warning on stderr).

    Raises ``ValueError`` naming the file and line for an unparseable line before the last one.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.decode("utf-8", errors="replace").split("\n")
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip().strip("\x00").strip()]
    recs: list[dict[str, Any]] = []
    for k, (lineno, ln) in enumerate(numbered):
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if k == len(numbered) - 1:
                if warn:
                    print(f"warning: {path} line {lineno}: unparseable last record dropped (a write torn by a "
                          f"crash or power loss): {ln[:60]!r}", file=sys.stderr, flush=True)
                break
            raise ValueError(f"{path} line {lineno}: unparseable metrics record ({e})") from None
        recs.append(rec)
    return recs


class MetricsLog:
    """``metrics.jsonl`` of a run: one JSON record per line, written by rank 0 only."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def append(self, rec: dict[str, Any]) -> None:
        """Append one record (raises ``OSError`` when the file cannot be written)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path, warn=False)

    def truncate(self, step: int) -> None:
        """Keep the records up to ``step`` (drop those written after the checkpoint resumed from).

        The file is rewritten atomically (temporary file + ``os.replace``).
        """
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp_metrics_", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
