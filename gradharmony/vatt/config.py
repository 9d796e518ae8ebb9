"""Typed configuration of the reference VATT trainer: dataclasses, presets, file loading, overrides.

A :class:`Config` is made of four sections (``model``, ``data``, ``harmony``, ``train``).
It is built from a preset (``tiny``/``small``/``base``), then a JSON (or YAML, when PyYAML is
importable) file, then command-line overrides; :meth:`Config.validate` checks every value and
raises :class:`ConfigError` naming the offending option.

Example::

    >>> cfg = build_config("tiny", overrides={"train.steps": 10})
    >>> cfg.train.steps, cfg.model.d_model
    (10, 64)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..rules import NONFINITE_POLICIES, RULE_NAMES

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "HarmonyConfig",
    "TrainConfig",
    "Config",
    "PRESETS",
    "build_config",
    "load_config_file",
]

METHODS = RULE_NAMES  # the rule registry's names
LEVELS = ("feature", "parameter", "none")
CURRICULA = ("off", "fraction", "threshold")
PARAM_DECOMPOSITIONS = ("path", "term")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option."""


@dataclass
class ModelConfig:
    """VATT model: raw-signal tokenizers, Transformer backbone(s), common-space heads."""

    backbone: str = "shared"  # "shared" (modality-agnostic, one Transformer) | "specific" (three)
    d_model: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    drop_token: float = 0.5  # fraction of video/audio tokens dropped in training (DropToken)
    video_patch: tuple[int, int, int] = (2, 8, 8)  # (t, h, w) kernel = stride of the Conv3d
    audio_patch: int = 64  # kernel = stride of the Conv1d over the raw waveform
    va_dim: int = 64  # video-audio common space (512 at full size)
    vt_dim: int = 32  # video-text common space (256 at full size)
    temperature: float = 0.07


@dataclass
class DataConfig:
    """Data: the embedded digits data set (``manifest=None``) or a user manifest (JSONL/CSV)."""

    manifest: Optional[str] = None  # training manifest; None = embedded synthetic digits clips
    eval_manifest: Optional[str] = None  # evaluation manifest (user data); None = see eval_split
    # without eval_manifest: "holdout" = the last min(eval_size, max(4, N/5)) clips of the manifest are
    # held out of training and evaluated on; "train" = evaluate on the first eval_size training clips
    eval_split: str = "holdout"
    frames: int = 8
    size: int = 32  # square frame side
    channels: int = 3
    audio_samples: int = 2048
    sample_rate: int = 8000
    num_narrations: int = 3  # candidate narrations per clip (MIL-NCE positives)
    max_text_len: int = 12
    train_size: int = 2048  # embedded data only
    eval_size: int = 512  # embedded data only (and probe-train split of the same size)
    misaligned_fraction: float = 0.3  # embedded data only: audio or narration from another class
    skip_bad: bool = False  # user data: skip (and count) bad clips instead of failing


@dataclass
class HarmonyConfig:
    """Gradient harmonization: realignment rule, level, curriculum."""

    method: str = "pcgrad"  # one of gradharmony.rules.RULE_NAMES
    level: str = "feature"  # feature (Harmonizer.branch) | parameter (see param_decomposition) | none
    curriculum: str = "fraction"  # off | fraction | threshold
    curriculum_mode: str = "hard"  # hard | soft
    curriculum_start: Optional[float] = None  # None: 0.5 for fraction, 0.0 for threshold
    curriculum_end: Optional[float] = None  # None: 1.0 for fraction, -1.0 for threshold
    curriculum_warmup: float = 0.1  # fraction of train.steps before the schedule starts
    curriculum_ramp: float = 0.5  # fraction of train.steps for start -> end
    curriculum_temperature: float = 0.1  # soft mode
    # parameter level: "path" = ParameterHarmonizer (ghost Grams, DDP too) | "term" = HarmonizedOptimizer
    # (granularity="sample", per-sample gradients of each loss term in chunks; single process)
    param_decomposition: str = "path"
    chunk_size: int = 16  # parameter level, term decomposition
    # feature level: every N steps also measure the per-sample parameter-level (path) cosines of the
    # same batch without changing the update (StepOutput.cos_param); 0 = off
    measure_param_every: int = 0
    backend: str = "auto"
    nonfinite: str = "raise"  # NaN/inf gradient policy of the core: raise | skip | zero | propagate


@dataclass
class TrainConfig:
    """Optimisation, logging, checkpointing."""

    steps: int = 600
    batch_size: int = 32  # global batch (split evenly over DDP ranks)
    lr: float = 2e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch CPU threads per process; 0 = torch's default
    out: Optional[str] = None  # run folder; None = runs/vatt-<preset>-<UTC time>
    resume: Optional[str] = None  # "latest" or a checkpoint path
    log_every: int = 10
    eval_every: int = 150  # 0 = only at the end
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    stop_after: Optional[int] = None  # stop after this many steps in this session (preemptible jobs)
    progress: bool = True
    plots: bool = True
    log_samples: bool = True  # samples.jsonl: per-sample training cosine, clip index, ground-truth misaligned flag
    eval_batch_size: int = 128
    dist_timeout_s: float = 600.0  # DDP: seconds a collective waits for a stopped rank before failing


@dataclass
class Config:
    """Full trainer configuration."""

    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harmony: HarmonyConfig = field(default_factory=HarmonyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def curriculum_values(self) -> tuple[float, float]:
        """(start, end) of the curriculum schedule after applying the schedule-specific defaults."""
        h = self.harmony
        if h.curriculum == "threshold":
            return (0.0 if h.curriculum_start is None else h.curriculum_start,
                    -1.0 if h.curriculum_end is None else h.curriculum_end)
        return (0.5 if h.curriculum_start is None else h.curriculum_start,
                1.0 if h.curriculum_end is None else h.curriculum_end)

    def validate(self) -> "Config":
        """Check every value; raise :class:`ConfigError` naming the option. Returns self."""
        _validate(self)
        return self


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # trains in minutes on 2 CPU cores, on the embedded digits data
    "tiny": {"train": {"threads": 1}},
    # a bigger CPU/GPU model, still on small clips
    "small": {
        "model": {"d_model": 256, "depth": 4, "heads": 4, "mlp_ratio": 4.0, "video_patch": (4, 16, 16),
                  "audio_patch": 128, "va_dim": 256, "vt_dim": 128, "dropout": 0.1},
        "data": {"frames": 16, "size": 64, "audio_samples": 8192, "sample_rate": 16000, "max_text_len": 16,
                 "train_size": 8192, "eval_size": 1024},
        "train": {"steps": 3000, "batch_size": 64, "lr": 5e-4, "warmup_steps": 300, "eval_every": 1000,
                  "ckpt_every": 500, "log_every": 20},
    },
    # VATT-Base-sized (Akbari et al. 2021): for GPUs and real data (--data manifest)
    "base": {
        "model": {"d_model": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0, "video_patch": (4, 16, 16),
                  "audio_patch": 128, "va_dim": 512, "vt_dim": 256, "dropout": 0.1},
        "data": {"frames": 32, "size": 224, "audio_samples": 153600, "sample_rate": 48000, "max_text_len": 16,
                 "num_narrations": 5, "train_size": 65536, "eval_size": 2048},
        "train": {"steps": 500000, "batch_size": 2048, "lr": 1e-4, "warmup_steps": 10000, "eval_every": 10000,
                  "ckpt_every": 5000, "log_every": 100, "device": "cuda"},
    },
}


def build_config(preset: Optional[str] = None, file: Optional[str] = None,
                 overrides: Optional[dict[str, Any]] = None) -> Config:
    """Preset, then config file, then ``{"section.field": value}`` overrides; validated.

    The preset is ``preset`` if given, else the file's ``"preset"`` key, else ``"tiny"``.
    """
    data = load_config_file(file) if file is not None else {}
    file_preset = data.pop("preset", None)
    name = preset or file_preset or "tiny"
    if name not in PRESETS:
        where = "--preset" if preset else f"{file}: preset"
        raise ConfigError(f"{where}: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    cfg = Config(preset=name)
    _apply_nested(cfg, copy.deepcopy(PRESETS[name]), "")
    _apply_nested(cfg, data, "", source=file or "config")
    for key, value in (overrides or {}).items():
        set_option(cfg, key, value)
    return cfg.validate()


def load_config_file(path: str) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML) config file into a dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # type: ignore[import-not-found]
        except ImportError as e:
            raise ConfigError(f"--config: {path} is YAML but PyYAML is not installed; use JSON") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path}: invalid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config: {path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path}: top level must be a mapping")
    return data


def set_option(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.field`` (e.g. ``"train.steps"``) with type conversion/checking."""
    parts = key.split(".")
    if len(parts) != 2 or not hasattr(cfg, parts[0]) or not dataclasses.is_dataclass(getattr(cfg, parts[0])):
        raise ConfigError(f"unknown option {key!r} (expected section.field, sections: model, data, harmony, train)")
    section = getattr(cfg, parts[0])
    _set_field(section, parts[1], value, key)


# --------------------------------------------------------------------------- helpers


def _apply_nested(cfg: Config, data: dict[str, Any], prefix: str, source: str = "preset") -> None:
    for sec, values in data.items():
        if not hasattr(cfg, sec) or not dataclasses.is_dataclass(getattr(cfg, sec)):
            raise ConfigError(f"{source}: unknown section {sec!r}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {sec!r} must be a mapping")
        for name, value in values.items():
            try:
                _set_field(getattr(cfg, sec), name, value, f"{sec}.{name}")
            except ConfigError as e:
                if source == "preset":
                    raise
                raise ConfigError(f"{source}: {e}") from None  # name the file that holds the key


def _set_field(section: Any, name: str, value: Any, key: str) -> None:
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(f"unknown option {key!r}")
    setattr(section, name, _coerce(value, hints[name], key))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (possibly a command-line string) to type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    # types.UnionType (``X | Y``) is Python 3.10+; the package supports 3.9
    if origin is Union or origin is getattr(types, "UnionType", Union):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):  # no option means anything at inf/nan (e.g. --lr inf: NaN at step 1)
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _validate(cfg: Config) -> None:
    m, d, h, t = cfg.model, cfg.data, cfg.harmony, cfg.train
    _check(m.backbone in ("shared", "specific"), "model.backbone", f"must be 'shared' or 'specific', got {m.backbone!r}")
    for k in ("d_model", "depth", "heads", "va_dim", "vt_dim", "audio_patch"):
        _check(getattr(m, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(m, k)}")
    _check(m.d_model % m.heads == 0, "model.heads", f"d_model={m.d_model} must be divisible by heads={m.heads}")
    _check(0.0 <= m.drop_token < 1.0, "model.drop_token", f"must be in [0, 1), got {m.drop_token}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _check(m.temperature > 0, "model.temperature", f"must be > 0, got {m.temperature}")
    _check(all(p >= 1 for p in m.video_patch), "model.video_patch", f"must be positive, got {m.video_patch}")
    _check(d.frames % m.video_patch[0] == 0, "model.video_patch",
           f"temporal patch {m.video_patch[0]} must divide data.frames={d.frames}")
    _check(d.size % m.video_patch[1] == 0 and d.size % m.video_patch[2] == 0, "model.video_patch",
           f"spatial patch {m.video_patch[1:]} must divide data.size={d.size}")
    _check(d.audio_samples % m.audio_patch == 0, "model.audio_patch",
           f"must divide data.audio_samples={d.audio_samples}, got {m.audio_patch}")
    for k in ("frames", "size", "channels", "audio_samples", "sample_rate", "num_narrations", "max_text_len",
              "train_size", "eval_size"):
        _check(getattr(d, k) >= 1, f"data.{k}", f"must be >= 1, got {getattr(d, k)}")
    _check(d.eval_split in ("holdout", "train"), "data.eval_split",
           f"must be 'holdout' or 'train', got {d.eval_split!r}")
    _check(0.0 <= d.misaligned_fraction <= 1.0, "data.misaligned_fraction",
           f"must be in [0, 1], got {d.misaligned_fraction}")
    _check(h.method in METHODS, "harmony.method", f"must be one of {', '.join(METHODS)}, got {h.method!r}")
    _check(h.level in LEVELS, "harmony.level", f"must be one of {', '.join(LEVELS)}, got {h.level!r}")
    _check(h.curriculum in CURRICULA, "harmony.curriculum",
           f"must be one of {', '.join(CURRICULA)}, got {h.curriculum!r}")
    _check(h.curriculum_mode in ("hard", "soft"), "harmony.curriculum_mode", f"must be hard or soft, got {h.curriculum_mode!r}")
    _check(not (h.level == "none" and h.curriculum != "off"), "harmony.curriculum",
           "needs harmony.level feature or parameter (level 'none' measures no gradients)")
    start, end = cfg.curriculum_values()
    if h.curriculum == "fraction":
        _check(0.0 < start <= 1.0, "harmony.curriculum_start", f"fraction must be in (0, 1], got {start}")
        _check(0.0 < end <= 1.0, "harmony.curriculum_end", f"fraction must be in (0, 1], got {end}")
    if h.curriculum == "threshold":
        _check(-1.0 <= start <= 1.0, "harmony.curriculum_start", f"threshold must be in [-1, 1], got {start}")
        _check(-1.0 <= end <= 1.0, "harmony.curriculum_end", f"threshold must be in [-1, 1], got {end}")
    _check(0.0 <= h.curriculum_warmup <= 1.0, "harmony.curriculum_warmup", f"must be in [0, 1], got {h.curriculum_warmup}")
    _check(0.0 <= h.curriculum_ramp <= 1.0, "harmony.curriculum_ramp", f"must be in [0, 1], got {h.curriculum_ramp}")
    _check(h.curriculum_temperature > 0, "harmony.curriculum_temperature", "must be > 0")
    _check(h.nonfinite in NONFINITE_POLICIES, "harmony.nonfinite",
           f"must be one of {', '.join(NONFINITE_POLICIES)}, got {h.nonfinite!r}")
    _check(h.param_decomposition in PARAM_DECOMPOSITIONS, "harmony.param_decomposition",
           f"must be one of {', '.join(PARAM_DECOMPOSITIONS)}, got {h.param_decomposition!r}")
    _check(h.measure_param_every >= 0, "harmony.measure_param_every", f"must be >= 0, got {h.measure_param_every}")
    _check(h.measure_param_every == 0 or h.level == "feature", "harmony.measure_param_every",
           f"needs harmony.level feature (at level {h.level!r} there is no feature-level update to compare with), "
           f"got {h.measure_param_every}")
    _check(h.chunk_size >= 1, "harmony.chunk_size", f"must be >= 1, got {h.chunk_size}")
    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(t.batch_size >= 2, "train.batch_size", f"must be >= 2 (contrastive negatives), got {t.batch_size}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _check(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _check(t.ckpt_every >= 1, "train.ckpt_every", f"must be >= 1, got {t.ckpt_every}")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    _check(t.stop_after is None or t.stop_after >= 1, "train.stop_after", f"must be >= 1, got {t.stop_after}")
    _check(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", f"must be > 0, got {t.grad_clip}")
    _check(t.threads >= 0, "train.threads", f"must be >= 0, got {t.threads}")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    _check(t.dist_timeout_s > 0, "train.dist_timeout_s", f"must be > 0, got {t.dist_timeout_s}")
    _check(t.device == "cpu" or t.device.startswith("cuda") or t.device == "auto", "train.device",
           f"must be cpu, cuda, cuda:N or auto, got {t.device!r}")
    _check(t.out is None or not os.path.exists(t.out) or os.path.isdir(t.out), "train.out",
           f"{t.out!r} exists and is not a folder")
    if d.manifest is None:
        # the embedded data has its own eval split, and a user eval manifest needs the
        # vocabulary of a user training manifest: without --data it would be ignored
        _check(d.eval_manifest is None, "data.eval_manifest",
               f"needs data.manifest (--data); the embedded data has its own eval split, got {d.eval_manifest!r}")
        _check(d.eval_size >= 10, "data.eval_size", f"must be >= 10 for the embedded data, got {d.eval_size}")
        _check(d.train_size >= t.batch_size, "data.train_size",
               f"must be >= train.batch_size={t.batch_size}, got {d.train_size}")
