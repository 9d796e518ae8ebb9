"""Atomic checkpoints and RNG state capture.

Checkpoints are ``<out>/checkpoints/step_XXXXXXXX.pt``, written to a temporary file in the same
folder and ``os.replace``d, so a crash never leaves a half-written checkpoint; only the newest
``keep`` are kept. ``--resume latest`` picks the highest step.
"""
from __future__ import annotations

import glob
import os
import random
import re
import tempfile
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["save_checkpoint", "find_latest", "load_checkpoint", "capture_rng", "restore_rng"]

_NAME = re.compile(r"step_(\d+)\.pt$")


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str, step: int, payload: dict[str, Any], keep: int = 2) -> str:
    """Write ``payload`` atomically as ``folder/step_{step:08d}.pt``; prune older ones; return the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:08d}.pt")
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for old in list_checkpoints(folder)[:-keep]:
        os.unlink(old)
    return path


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoint paths sorted by step."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(folder, "step_*.pt"))
             if (m := _NAME.search(p))]
    return [p for _, p in sorted(found)]


def find_latest(folder: str) -> Optional[str]:
    ckpts = list_checkpoints(folder)
    return ckpts[-1] if ckpts else None


#: What :meth:`Trainer.resume` reads from a checkpoint.
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "harmony", "curriculum", "rng", "sampler", "tracker",
                 "meter", "train_state")


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a trainer checkpoint; a missing, unreadable or foreign file raises naming it."""
    from .config import ConfigError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / not a torch file: a bad --resume, not a crash
        raise ConfigError(f"--resume: {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ConfigError(f"--resume: {path}: not a gradharmony-pretrain checkpoint (missing {', '.join(missing)})")
    return ck
