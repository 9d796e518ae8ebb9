"""Checkpoints of the trainer: atomic writes, safe loading, a content hash, the resume policy.

Checkpoints are ``<out>/checkpoints/step_XXXXXXXX.pt``, written to a temporary ``.tmp_*`` file in
the same folder, ``fsync``\\ ed and ``os.replace``\\ d, so a crash never leaves a half-written
checkpoint; only the newest ``keep`` are kept, and ``.tmp_*`` files left by a killed write are
removed. ``--resume latest`` picks the highest step.

Loading never runs code from the file: ``torch.load(weights_only=True)`` accepts tensors and
plain containers only (the RNG and tracker states are stored as tensors and lists for that
reason), and a SHA-256 of every stored value (``content_sha256``) is checked, so a flipped
byte inside a stored tensor is an error naming the file rather than a silent resume.

:func:`load_model` rebuilds the trained :class:`~gradharmony.vatt.model.VATT` from a checkpoint.
"""
from __future__ import annotations

import glob
import hashlib
import os
import random
import re
import tempfile
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["save_checkpoint", "find_latest", "list_checkpoints", "load_checkpoint", "load_model",
           "capture_rng", "restore_rng", "content_digest", "remove_stale_tmp", "check_resume_config",
           "apply_resumed_hyperparameters", "RESUME_MAY_CHANGE", "REQUIRED_KEYS"]

_NAME = re.compile(r"step_(\d+)\.pt$")
TMP_PREFIX = ".tmp_"
DIGEST_KEY = "content_sha256"

#: What :meth:`Trainer.resume` reads from a checkpoint.
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "harmony", "rng", "sampler", "tracker", "meter",
                 "train_state", DIGEST_KEY)


# ---------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and plain lists."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(v) for v in internal], gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- content hash


def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of a checkpoint payload: every tensor's dtype, shape and bytes, every plain value.

    Dict keys are visited in sorted order (of ``repr``), so the digest does not depend on insertion order.
    """
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[" if isinstance(x, list) else b"(")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


# ---------------------------------------------------------------------- files


def remove_stale_tmp(folder: str) -> list[str]:
    """Delete ``.tmp_*`` files (left by a write that was killed); returns their paths."""
    removed = []
    for p in glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + "*")):
        try:
            os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def save_checkpoint(folder: str, step: int, payload: dict[str, Any], keep: int = 2) -> str:
    """Write ``payload`` (+ its ``content_sha256``) atomically as ``folder/step_{step:08d}.pt``.

    Older checkpoints beyond the newest ``keep`` and stale ``.tmp_*`` files are removed.
    Returns the path. Raises ``OSError`` when the folder cannot be written (nothing is replaced then).
    """
    os.makedirs(folder, exist_ok=True)
    remove_stale_tmp(folder)
    path = os.path.join(folder, f"step_{step:08d}.pt")
    body = {k: v for k, v in payload.items() if k != DIGEST_KEY}
    body[DIGEST_KEY] = content_digest(body)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(body, f)
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
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(glob.escape(folder), "step_*.pt"))
             if (m := _NAME.search(p))]
    return [p for _, p in sorted(found)]


def find_latest(folder: str) -> Optional[str]:
    ckpts = list_checkpoints(folder)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str, what: str = "--resume") -> dict[str, Any]:
    """Load a trainer checkpoint without running code from it, and check its content hash.

    Raises ``FileNotFoundError`` for a missing file and :class:`ConfigError` naming ``path``
    for a file that is unreadable, holds anything but tensors and plain data (a pickle that
    would run code), is not a trainer checkpoint, or whose content does not match its hash.
    """
    from .config import ConfigError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, or refused by weights_only
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            msg = "it holds objects other than tensors and plain data, which are not loaded (weights_only)"
        raise ConfigError(f"{what}: {path}: not a readable checkpoint ({type(e).__name__}: {msg})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ConfigError(f"{what}: {path}: not a gradharmony-pretrain checkpoint (missing {', '.join(missing)})")
    stored = ck.pop(DIGEST_KEY)
    if content_digest(ck) != stored:
        raise ConfigError(f"{what}: {path}: content does not match its stored SHA-256 (the file is corrupt); "
                          f"resume from an older checkpoint or start over")
    return ck


def load_model(path: str, device: str = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """Rebuild the trained model from a trainer checkpoint (safe load, hash checked).

    Returns ``(model, cfg, tokenizer)``: the :class:`~gradharmony.vatt.model.VATT` in eval mode on
    ``device``, the :class:`~gradharmony.vatt.config.Config` of the run that wrote it, and the
    :class:`~gradharmony.vatt.data.WordTokenizer` the text tower was trained with. Encode clips
    with ``model(batch)`` on a batch from :func:`~gradharmony.vatt.data.collate`. Errors as
    :func:`load_checkpoint`.
    """
    from .config import Config, ConfigError, build_config
    from .data import WordTokenizer
    from .model import VATT

    ck = load_checkpoint(path, what="load_model")
    saved = ck.get("config")
    if not isinstance(saved, dict) or "vocab" not in ck:
        raise ConfigError(f"load_model: {path}: the checkpoint holds no config or vocabulary")
    saved = dict(saved)
    preset = saved.pop("preset", "tiny")
    overrides = {f"{sec}.{k}": v for sec, values in saved.items() for k, v in values.items()
                 if k not in ("out", "resume")}
    cfg: Config = build_config(preset, overrides=overrides)
    tokenizer = WordTokenizer(list(ck["vocab"]))
    model = VATT(cfg, len(tokenizer))
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), cfg, tokenizer


# ---------------------------------------------------------------------- resume policy

# Options that may differ between the run that wrote a checkpoint and the one resuming it
# (where to run, how often to log/evaluate/save, the learning rate after a NaN stop, ...).
# Every other model/data/harmony/train field shapes the saved state (parameters, data order,
# LR schedule, curriculum schedule, rule state) and must match.
RESUME_MAY_CHANGE = frozenset({
    "data.eval_manifest", "data.eval_size",
    "harmony.chunk_size", "harmony.backend", "harmony.nonfinite", "harmony.measure_param_every",
    "train.lr", "train.min_lr_ratio", "train.weight_decay", "train.grad_clip", "train.device", "train.threads",
    "train.out", "train.resume", "train.log_every", "train.eval_every", "train.ckpt_every",
    "train.keep_checkpoints", "train.stop_after", "train.progress", "train.plots", "train.eval_batch_size",
    "train.dist_timeout_s",
})


def check_resume_config(path: str, saved: Optional[dict[str, Any]], current: dict[str, Any]) -> None:
    """Raise ConfigError naming the options that differ from the checkpoint's run (not loadable)."""
    from .config import ConfigError

    if not saved:
        return
    diffs = []
    for section in ("model", "data", "harmony", "train"):
        old, new = saved.get(section, {}), current.get(section, {})
        for name in new:
            key = f"{section}.{name}"
            if key in RESUME_MAY_CHANGE or name not in old:
                continue
            a, b = old[name], new[name]
            if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
                a, b = list(a), list(b)
            if a != b:
                diffs.append(f"{key}={b!r} (checkpoint: {old[name]!r})")
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ConfigError(
            f"--resume: {path} was written by a run with other options: {'; '.join(diffs[:3])}{more}. "
            "Resume with the options of that run (its config.json: --config <out>/config.json) "
            "or start over with --overwrite"
        )


def apply_resumed_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float,
                                  weight_decay: float, lr_at: Any, verbose: bool = False) -> None:
    """This run's peak ``lr`` and ``weight_decay`` over the ones in the loaded optimizer/scheduler state.

    ``load_state_dict`` restores the saved peak LR (scheduler ``base_lrs``, the groups'
    ``initial_lr``) and weight decay, which would silently ignore a lower ``--lr`` given to
    continue after a NaN stop. ``lr_at(step)`` is the LR multiplier of the schedule. Unchanged
    values are left alone (bit-for-bit resume).
    """
    groups = optimizer.param_groups
    changed = False
    for i, g in enumerate(groups):
        if scheduler.base_lrs[i] != lr:
            old = scheduler.base_lrs[i]
            scheduler.base_lrs[i] = lr
            g["initial_lr"] = lr
            g["lr"] = lr * lr_at(scheduler.last_epoch)
            changed = True
            if verbose and i == 0:
                print(f"--resume: peak lr {old:g} -> {lr:g} (this run's --lr)", flush=True)
        if g.get("weight_decay") != weight_decay:
            g["weight_decay"] = weight_decay
    if changed:
        scheduler._last_lr = [g["lr"] for g in groups]
