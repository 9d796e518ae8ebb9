"""Reference VATT pre-training with cross-modality gradient harmonization.

The project's end-to-end example of "Scaling Multimodal Pre-Training via Cross-Modality
Gradient Harmonization" (Wu et al., NeurIPS 2022) on top of VATT (Akbari et al. 2021), using
only the public ``gradharmony`` API.

Run::

    python -m gradharmony.vatt                     # tiny preset, embedded data, a few CPU minutes
    gradharmony-pretrain --method gradvac --curriculum threshold --out runs/gv
    gradharmony-pretrain --data clips/train.jsonl --eval-data clips/eval.jsonl --preset small
    torchrun --nproc_per_node=2 -m gradharmony.vatt --steps 200 --out runs/ddp
    gradharmony-pretrain --out runs/gv --resume latest

Modules:

    config        typed Config (model / data / harmony / train), presets tiny | small | base,
                  JSON/YAML files, ``--set section.field=value`` overrides, validation
    model         VATT: Conv3d video patches, Conv1d raw-audio patches, word embeddings, learned
                  positions + aggregation token per modality, DropToken, shared or
                  modality-specific Transformer, FAC heads (video -> va -> vt, audio -> va, text -> vt)
    losses        per-sample NCE (video-audio) and MIL-NCE (video-text), autograd all-gather
    synthetic     embedded data: moving scikit-learn digits, sounds, templated narrations sharing
                  class and instance attributes, a misaligned fraction with ground truth
    manifest      users' clips from a JSONL/CSV manifest (.npy / PyAV video, .wav / .npy audio)
    trainer       TrainState, Trainer: the loop (train_step, fit, eval, save, bit-for-bit resume)
    metering      per-interval sums, the metrics record (conflict statistics from gh.ConflictStats),
                  metrics.jsonl that survives a torn last line
    checkpoint    atomic checkpoints loaded with weights_only=True and checked against a SHA-256,
                  the resume policy (which options may change), load_model (a trained VATT)
    runfolder     the run folder (--out) and its write policy: a bad --out at the start, RunIOError
                  (exit 3) during the run, stale .tmp_* removed, no second final evaluation;
                  samples.jsonl (per-sample cosine, clip index, ground truth; train.log_samples)
    evaluate      retrieval R@1/5/10 + median rank (ties in expectation) with chance levels, linear
                  probe, conflict-score AUROC, held-out split
    distributed   torchrun / DDP helpers (NCCL on GPU, Gloo on CPU)
    plots, cli    PNG plots; ``main(argv)`` for ``gradharmony-pretrain``

Choices where the paper is not explicit (all options):

* conflicts are measured at the shared video representation (the aggregation-token output of the
  backbone, ``harmony.level="feature"``): ``Harmonizer.branch(h_v, 2)`` feeds the NCE
  video-audio path and the MIL-NCE video-text path; ``level="parameter"`` uses
  ``HarmonizedOptimizer(granularity="sample")`` (per-sample parameter gradients, term
  decomposition); ``level="none"`` is plain VATT without measurement;
* default rule ``pcgrad`` with the ``fraction`` curriculum (hard): keep the best-agreeing 50% of
  each batch during the first 10% of steps, ramp linearly to 100% over the next 50%;
  the kept samples' weights are renormalised to mean 1 (the core's default);
* at feature level the curriculum weight scales each clip's harmonized gradient into the video
  backbone path; the audio and text paths are not re-weighted;
* NCE negatives are all pairs that share the anchor's video or audio (both directions), MIL-NCE
  as in Miech et al. (positives: the clip's P narrations; negatives: both directions),
  temperature 0.07, total loss = mean of the two batch means;
* linear common-space heads; Adam with linear warm-up and cosine decay to 5% of the peak LR.
"""
from __future__ import annotations

from typing import Any

from .config import Config, ConfigError, DataConfig, HarmonyConfig, ModelConfig, TrainConfig, build_config

__all__ = ["Config", "ConfigError", "ModelConfig", "DataConfig", "HarmonyConfig", "TrainConfig", "build_config",
           "Trainer", "TrainState", "VATT", "load_model", "main"]


def __getattr__(name: str) -> Any:  # lazy: the trainer imports torch and the gradharmony core
    if name in ("Trainer", "TrainState"):
        from . import trainer

        return getattr(trainer, name)
    if name == "VATT":
        from .model import VATT

        return VATT
    if name == "load_model":
        from .checkpoint import load_model

        return load_model
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(name)
