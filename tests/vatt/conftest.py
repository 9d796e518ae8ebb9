"""Shared tiny configurations for the VATT trainer tests (all CPU, seconds each)."""
from __future__ import annotations

import json
import os
from typing import Any

import pytest

from gradharmony.vatt.config import Config, build_config

TINY: dict[str, Any] = {
    "data.frames": 4, "data.size": 16, "data.audio_samples": 256, "data.num_narrations": 2,
    "data.max_text_len": 8, "data.train_size": 32, "data.eval_size": 16,
    "model.video_patch": (2, 8, 8), "model.audio_patch": 32, "model.d_model": 16, "model.depth": 1,
    "model.heads": 2, "model.va_dim": 16, "model.vt_dim": 8, "model.mlp_ratio": 2.0,
    "train.batch_size": 8, "train.steps": 2, "train.warmup_steps": 1, "train.log_every": 1,
    "train.eval_every": 0, "train.ckpt_every": 100, "train.progress": False, "train.plots": False,
    "train.eval_batch_size": 16,
}


def tiny_overrides(out: str, **extra: Any) -> dict[str, Any]:
    d = dict(TINY)
    d["train.out"] = str(out)
    d.update({k.replace("__", "."): v for k, v in extra.items()})
    return d


def tiny_config(out: str, **extra: Any) -> Config:
    """A seconds-long config; ``extra`` keys use ``section__field``."""
    return build_config("tiny", overrides=tiny_overrides(out, **extra))


def tiny_argv(out: str, **extra: Any) -> list[str]:
    """The same as command-line ``--set`` arguments."""
    argv = []
    for k, v in tiny_overrides(out, **extra).items():
        if isinstance(v, tuple):
            v = ",".join(map(str, v))
        argv += ["--set", f"{k}={v}"]
    return argv


def read_metrics(out: str) -> list[dict[str, Any]]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


@pytest.fixture(autouse=True)
def _few_threads():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add noise; keeps results reproducible
    yield
    torch.set_num_threads(n)
