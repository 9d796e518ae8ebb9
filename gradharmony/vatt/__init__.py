"""Reference VATT pre-training with cross-modality gradient harmonization (placeholder docstring)."""
from __future__ import annotations

from typing import Any

from .config import Config, ConfigError, DataConfig, HarmonyConfig, ModelConfig, TrainConfig, build_config

__all__ = ["Config", "ConfigError", "ModelConfig", "DataConfig", "HarmonyConfig", "TrainConfig", "build_config",
           "Trainer", "TrainState", "VATT", "main"]


def __getattr__(name: str) -> Any:  # lazy: the trainer imports torch and the gradharmony core
    if name in ("Trainer", "TrainState"):
        from . import trainer

        return getattr(trainer, name)
    if name == "VATT":
        from .model import VATT

        return VATT
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(name)
