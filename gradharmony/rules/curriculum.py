"""Gradient-conflict curriculum: train on the triplets whose loss gradients agree first.

The noisiness score of sample b is the cosine between its loss gradients
(``cos[b, 0, 1]`` for K = 2; for K > 2 the minimum over pairs by default, or the mean).
High score = the losses agree = likely a clean, semantically aligned triplet. A zero
gradient has score 0 (it conflicts with nothing and agrees with nothing).

Schedules (training progress ``t`` = number of :meth:`ConflictCurriculum.step` calls):

- ``"fraction"``: keep the top ``q(t)`` fraction of the batch by score, ``q`` going
  linearly from ``start`` (default 0.5) to ``end`` (default 1.0) over ``ramp_steps``
  after ``warmup_steps`` (during warm-up ``q = start``). The threshold is the batch
  quantile, so it adapts to the score distribution.
- ``"threshold"``: keep samples with ``score >= tau(t)``, ``tau`` going from ``start``
  (default 0.0: drop conflicting samples) to ``end`` (default -1.0: keep everything).

Modes: ``"hard"`` weights are 0/1; ``"soft"`` weights are
``sigmoid((score - tau) / temperature)``.

Normalization (``normalize=True``, the default): the applied weights are
``s_b * B / sum_b s_b``, so their mean over the batch is 1 and dropping samples does not
silently shrink the step. The raw weights in [0, 1] are reported as
``ConflictStats.curriculum_weights``.

With ``torch.distributed`` initialized (and ``sync=True``) the scores are gathered from
all ranks, so the quantile, the kept set and the normalization use the global batch.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["ConflictCurriculum", "conflict_score"]


def conflict_score(cos: Tensor, reduce: str = "min") -> Tensor:
    """Per-sample agreement score from pairwise cosines.

    Args:
        cos: (B, K, K) cosines.
        reduce: "min" (the worst pair) or "mean" over the K(K-1)/2 pairs.
    Returns:
        (B,) scores in [-1, 1].
    """
    B, K, _ = cos.shape
    iu = torch.triu_indices(K, K, offset=1, device=cos.device)
    pairs = cos[:, iu[0], iu[1]]  # (B, P)
    if reduce == "min":
        return pairs.amin(-1)
    if reduce == "mean":
        return pairs.mean(-1)
    raise ValueError(f"reduce must be 'min' or 'mean', got {reduce!r}")


def _gather(x: Tensor) -> Tensor:
    import torch.distributed as dist

    world = dist.get_world_size()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class ConflictCurriculum:
    """Turns conflict scores and training progress into per-sample weights.

    Example:
        >>> import torch, gradharmony as gh
        >>> cur = gh.ConflictCurriculum(schedule="fraction", start=0.5, ramp_steps=100)
        >>> w = cur.weights(torch.tensor([0.9, -0.5, 0.1, 0.3]))
        >>> w.tolist()  # the two best-aligned samples, normalized to mean 1
        [2.0, 0.0, 0.0, 2.0]
    """

    def __init__(
        self,
        schedule: str = "fraction",
        start: Optional[float] = None,
        end: Optional[float] = None,
        warmup_steps: int = 0,
        ramp_steps: int = 1000,
        mode: str = "hard",
        temperature: float = 0.1,
        normalize: bool = True,
        reduce: str = "min",
        sync: bool = True,
    ) -> None:
        if schedule not in ("fraction", "threshold"):
            raise ValueError(f"schedule must be 'fraction' or 'threshold', got {schedule!r}")
        if mode not in ("hard", "soft"):
            raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
        if reduce not in ("min", "mean"):
            raise ValueError(f"reduce must be 'min' or 'mean', got {reduce!r}")
        d_start, d_end = (0.5, 1.0) if schedule == "fraction" else (0.0, -1.0)
        start = d_start if start is None else float(start)
        end = d_end if end is None else float(end)
        lo, hi = (0.0, 1.0) if schedule == "fraction" else (-1.0, 1.0)
        for nm, v in (("start", start), ("end", end)):
            if not lo <= v <= hi or math.isnan(v):
                raise ValueError(f"{nm} must be in [{lo}, {hi}] for schedule {schedule!r}, got {v}")
        if schedule == "fraction" and min(start, end) <= 0:
            raise ValueError(f"a kept fraction must be > 0, got start={start}, end={end}")
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(f"warmup_steps and ramp_steps must be >= 0, got {warmup_steps}, {ramp_steps}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.schedule, self.start, self.end = schedule, start, end
        self.warmup_steps, self.ramp_steps = int(warmup_steps), int(ramp_steps)
        self.mode, self.temperature, self.normalize = mode, float(temperature), normalize
        self.reduce, self.sync = reduce, sync
        self.step_count = 0
        self.last_threshold: Optional[float] = None
        self._last_threshold_t: Optional[Tensor] = None

    # -- schedule ---------------------------------------------------------------
    def value(self, step: Optional[int] = None) -> float:
        """The kept fraction ("fraction") or the threshold ("threshold") at ``step``."""
        t = self.step_count if step is None else step
        if t < self.warmup_steps:
            return self.start
        r = 1.0 if self.ramp_steps == 0 else min(1.0, (t - self.warmup_steps) / self.ramp_steps)
        return self.start + (self.end - self.start) * r

    def step(self) -> None:
        """Advance training progress by one step (call once per optimizer step)."""
        self.step_count += 1

    # -- weights ----------------------------------------------------------------
    def weights_from_cos(self, cos: Tensor) -> Tensor:
        """Raw weights (B,) in [0, 1] from cosines (B, K, K)."""
        return self.raw_weights(conflict_score(cos, self.reduce))

    def raw_weights(self, score: Tensor) -> Tensor:
        """Raw weights (B,) in [0, 1] from scores (B,), before normalization."""
        if score.ndim != 1:
            raise ValueError(f"score must have shape (B,), got {tuple(score.shape)}")
        score = score.float()
        dist_on = self.sync and torch.distributed.is_available() and torch.distributed.is_initialized()
        all_scores = _gather(score) if dist_on else score
        n = all_scores.numel()
        if n == 0:
            # no threshold for an empty batch (do not report the previous call's)
            self._last_threshold_t, self.last_threshold = None, None
            return score.new_zeros(0)
        v = self.value()
        if self.schedule == "fraction":
            n_keep = min(n, max(1, math.ceil(v * n - 1e-9)))
            # the n_keep-th largest score; ties at the threshold are all kept
            tau = torch.topk(all_scores, n_keep, sorted=True).values[-1]
        else:
            tau = torch.tensor(v, dtype=score.dtype, device=score.device)
        self._last_threshold_t = tau
        if self.mode == "hard":
            w = (score >= tau).to(score.dtype)
        else:
            w = torch.sigmoid((score - tau) / self.temperature)
        return w

    def normalized(self, raw: Tensor) -> Tensor:
        """Apply the normalization (mean applied weight 1 over the global batch)."""
        if not self.normalize or raw.numel() == 0:
            return raw
        total = raw.sum()
        count = torch.tensor(float(raw.numel()), device=raw.device)
        if self.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            buf = torch.stack([total, count])
            torch.distributed.all_reduce(buf)
            total, count = buf[0], buf[1]
        return torch.where(total > 0, raw * count / total.clamp_min(1e-30), raw)

    def weights(self, score: Tensor) -> Tensor:
        """Applied weights (B,) from scores (B,): raw weights, normalized if enabled."""
        return self.normalized(self.raw_weights(score))

    @property
    def threshold_tensor(self) -> Optional[Tensor]:
        """Score threshold of the last call as a 0-d tensor on the scores' device (no sync)."""
        if self._last_threshold_t is not None:
            return self._last_threshold_t
        return None if self.last_threshold is None else torch.tensor(self.last_threshold)

    @property
    def threshold(self) -> Optional[float]:
        """Score threshold used by the last call (a host sync on first read)."""
        if self._last_threshold_t is not None:
            self.last_threshold = float(self._last_threshold_t)
            self._last_threshold_t = None
        return self.last_threshold

    # -- state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "config": self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = state.get("config")
        if cfg is not None and cfg != self._config():
            raise ValueError(f"curriculum state was saved with config {cfg}, this one is {self._config()}")
        self.step_count = int(state["step_count"])

    def _config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule, "start": self.start, "end": self.end,
            "warmup_steps": self.warmup_steps, "ramp_steps": self.ramp_steps, "mode": self.mode,
            "temperature": self.temperature, "normalize": self.normalize, "reduce": self.reduce,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"ConflictCurriculum({args})"
