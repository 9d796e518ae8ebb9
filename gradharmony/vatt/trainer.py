"""The VATT pre-training loop with cross-modality gradient harmonization.

One step (feature level, the default)::

    h_v = backbone(video)                                  (B, d)
    h_va, h_vt = harmonizer.branch(h_v, 2)                 autograd-aware identity
    l_va = NCE(g_v->va(h_va), g_a->va(h_a))                (B,)
    l_vt = MIL-NCE(g_va->vt(g_v->va(h_vt)), g_t->vt(h_t))  (B,)
    loss = (mean(l_va) + mean(l_vt)) / 2; loss.backward()
        # in backward, per sample i: dL_va/dh_i and dL_vt/dh_i -> rule (pcgrad, ...) ->
        # curriculum weight s_i -> one gradient for h_i -> backbone
    optimizer.step(); scheduler.step(); curriculum.step()

At parameter level (``harmony.level="parameter"``) the harmonization covers every shared
parameter: by default (``harmony.param_decomposition="path"``) with ``gh.ParameterHarmonizer``
(the forward runs under its ``capture``; the two per-sample loss vectors go to its ``backward``;
DDP included: the model is not wrapped, the harmonizer averages the combined gradients over
ranks), or (``"term"``, single process) with ``gh.HarmonizedOptimizer(granularity="sample")``.
``harmony.level="none"`` is plain VATT without any gradient measurement (the speed baseline).

``harmony.measure_param_every=N`` (feature level) also measures, every N steps, the per-sample
parameter-level cosines of the same batch without changing the update
(:meth:`Trainer.measure_param_cosines`; ``StepOutput.cos_param``).

Feature level uses the *path* decomposition of DESIGN.md: the curriculum weight s_i scales the
harmonized gradient reaching the shared video representation of clip i (and hence the backbone
through the video path); the audio and text paths are not re-weighted.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import gradharmony as gh

from .checkpoint import apply_resumed_hyperparameters, capture_rng, check_resume_config, load_checkpoint, restore_rng
from .config import Config, ConfigError
from .data import ClipDataset, DataError, EpochBatchSampler, Subset, load_batch
from .distributed import DistContext, all_gather_tensor, all_reduce_mean, barrier
from .evaluate import ScoreTracker, conflict_auroc, conflict_scores, describe_eval_data, evaluate
from .losses import gather_features, mil_nce_per_sample, nce_per_sample
from .metering import Meter, StepOutput
from .model import VATT
from .runfolder import RunFolder, RunIOError

__all__ = ["TrainState", "Trainer", "NonFiniteLossError", "RunIOError", "build_datasets", "warmup_cosine"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf."""


@dataclass
class TrainState:
    """Progress counters saved in every checkpoint."""

    step: int = 0
    samples_seen: int = 0
    train_time_s: float = 0.0
    last_checkpoint: Optional[str] = None


# ---------------------------------------------------------------------- builders


def _check_one_batch(train: ClipDataset, cfg: Config) -> None:
    """DataError when fewer usable training clips than one batch remain."""
    if len(train) < cfg.train.batch_size:
        where = cfg.data.manifest or "the training data"
        skipped = len(skipped_clips(train))
        raise DataError(f"{where}: {len(train)} usable clips ({skipped} skipped) is fewer than one batch "
                        f"(--batch-size {cfg.train.batch_size})")


def build_datasets(cfg: Config) -> tuple[ClipDataset, ClipDataset, Optional[ClipDataset]]:
    """(train, eval, probe-train) data sets for the config."""
    d = cfg.data
    if d.manifest is None:
        from .synthetic import DigitsAVT

        seed = cfg.train.seed
        return DigitsAVT(d, "train", seed), DigitsAVT(d, "eval", seed), DigitsAVT(d, "probe", seed)
    from .manifest import ManifestDataset

    train = ManifestDataset(d.manifest, d, skip_bad=d.skip_bad)
    if d.eval_manifest is not None:
        ev: ClipDataset = ManifestDataset(d.eval_manifest, d, tokenizer=train.tokenizer, skip_bad=d.skip_bad)
    elif d.eval_split == "holdout":
        from .evaluate import holdout_split

        _check_one_batch(train, cfg)  # before the held-out split takes clips away
        train, ev = holdout_split(train, d.eval_size, cfg.train.batch_size)
    else:
        ev = Subset(train, range(min(d.eval_size, len(train))))
    half = len(ev) // 2
    if half >= 2:  # probe fits on the first half, retrieval / probe accuracy on the second
        return train, Subset(ev, range(half, len(ev))), Subset(ev, range(half))
    return train, ev, None


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_curriculum(cfg: Config) -> Optional[gh.ConflictCurriculum]:
    h = cfg.harmony
    if h.curriculum == "off":
        return None
    start, end = cfg.curriculum_values()
    return gh.ConflictCurriculum(schedule=h.curriculum, start=start, end=end,
                                 warmup_steps=int(round(h.curriculum_warmup * cfg.train.steps)),
                                 ramp_steps=max(1, int(round(h.curriculum_ramp * cfg.train.steps))),
                                 mode=h.curriculum_mode, temperature=h.curriculum_temperature)


def _backend_needs_build() -> bool:
    """Whether the first harmonization will JIT-compile the C++ ops (no prebuilt module, not yet loaded)."""
    import importlib.util

    from ..kernels import ext

    if ext.ops_source() is not None or os.environ.get("GRADHARMONY_NO_JIT", "") not in ("", "0"):
        return False
    if importlib.util.find_spec("gradharmony._C") is not None:
        return False
    try:  # a JIT build cached by an earlier run loads in about a second
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory("gradharmony_C", verbose=False)
        return not any(f.endswith(".so") for f in os.listdir(folder))
    except Exception:  # noqa: BLE001 - private torch helper; when unsure, announce
        return True


def _ground_truth(ds: ClipDataset) -> np.ndarray:
    if hasattr(ds, "ground_truth"):
        return ds.ground_truth()[1]
    return np.full(len(ds), -1, dtype=np.int64)


# ---------------------------------------------------------------------- trainer


def skipped_clips(*datasets: Optional[ClipDataset]) -> list[str]:
    """Why each bad manifest clip was skipped (``--skip-bad``), over distinct data sets (a Subset counts its base)."""
    seen: list[Any] = []
    for ds in datasets:
        while ds is not None and hasattr(ds, "base"):
            ds = ds.base
        if ds is not None and not any(ds is b for b in seen):
            seen.append(ds)
    return [reason for b in seen for reason in getattr(b, "skipped", ())]


class Trainer:
    """Owns model, optimizer, scheduler, harmonizer, data position and the loop; see module docstring.

    Metering and the metrics file are in :mod:`.metering`; checkpoint files and the resume
    policy in :mod:`.checkpoint`; the run folder and its write policy in :mod:`.runfolder`.
    """

    def __init__(self, cfg: Config, ctx: Optional[DistContext] = None,
                 datasets: Optional[tuple[ClipDataset, ClipDataset, Optional[ClipDataset]]] = None,
                 overwrite: bool = False):
        self.cfg, self.ctx, self.overwrite = cfg, ctx or DistContext(), overwrite
        if self.ctx.distributed and cfg.harmony.level == "parameter" and cfg.harmony.param_decomposition == "term":
            raise ConfigError("harmony.param_decomposition: 'term' (level 'parameter') is not supported with DDP; "
                              "use 'path' (the default) or level 'feature'")
        if cfg.train.batch_size % self.ctx.world_size:
            raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the world size "
                              f"{self.ctx.world_size}")
        self.device = self.ctx.device
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.train_set, self.eval_set, self.probe_set = datasets or build_datasets(cfg)
        t = cfg.train
        _check_one_batch(self.train_set, cfg)
        self.skipped_reasons = skipped_clips(self.train_set, self.eval_set, self.probe_set)
        self.skipped = len(self.skipped_reasons)
        self.model = self._build_model()
        self.optimizer = torch.optim.Adam(self.raw_model.parameters(), lr=cfg.train.lr,
                                          weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: self._lr_at(s))
        self.curriculum = build_curriculum(cfg)
        self.harmonizer: Optional[gh.Harmonizer] = None
        self.hopt: Optional[gh.HarmonizedOptimizer] = None
        self.ph: Optional[gh.ParameterHarmonizer] = None  # parameter level, path decomposition
        self._measurer: Optional[gh.ParameterHarmonizer] = None  # harmony.measure_param_every
        self._build_harmony()
        self.sampler = EpochBatchSampler(len(self.train_set), t.batch_size, t.seed, self.ctx.rank,
                                         self.ctx.world_size)
        self.tracker = ScoreTracker(_ground_truth(self.train_set))
        self.state = TrainState()
        self.meter = Meter()
        self._last_stats_obj: Optional[gh.ConflictStats] = None  # global statistics of the last step
        self.run_dir = t.out or time.strftime(f"runs/vatt-{cfg.preset}-%Y%m%d-%H%M%S", time.gmtime())
        self.folder = RunFolder(self.run_dir, is_main=self.ctx.is_main)
        self.metrics_path, self.ckpt_dir = self.folder.metrics_path, self.folder.ckpt_dir
        self.backend_load_s = 0.0

    def _lr_at(self, step: int) -> float:
        t = self.cfg.train
        return warmup_cosine(step, t.warmup_steps, t.steps, t.min_lr_ratio)

    # -------------------------------------------------------------- construction

    def _build_model(self) -> nn.Module:
        seed = self.cfg.train.seed
        torch.manual_seed(seed)  # identical init on every rank
        model = VATT(self.cfg, len(self.train_set.tokenizer)).to(self.device)
        rank_seed = seed + self.ctx.rank
        torch.manual_seed(rank_seed)
        np.random.seed(rank_seed)
        random.seed(rank_seed)
        self.raw_model = model
        h = self.cfg.harmony
        if self.ctx.distributed and not (h.level == "parameter" and h.param_decomposition == "path"):
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model

    def _build_harmony(self) -> None:
        h = self.cfg.harmony
        if h.level == "feature":
            self.harmonizer = gh.Harmonizer(method=h.method, curriculum=self.curriculum, backend=h.backend,
                                            nonfinite=h.nonfinite)
        elif h.level == "parameter" and h.param_decomposition == "path":
            self.ph = gh.ParameterHarmonizer(self.raw_model, h.method, curriculum=self.curriculum,
                                             optimizer=self.optimizer, nonfinite=h.nonfinite)
        elif h.level == "parameter":
            self.hopt = gh.HarmonizedOptimizer(self.optimizer, method=h.method, curriculum=self.curriculum,
                                               granularity="sample", chunk_size=h.chunk_size, backend=h.backend,
                                               nonfinite=h.nonfinite, loss_reduction="sum")
        if h.measure_param_every:
            # measures only: its rule is never solved and it holds no curriculum or optimizer
            self._measurer = gh.ParameterHarmonizer(self.raw_model, "sum", nonfinite="propagate")

    @property
    def harmony(self) -> Optional[Any]:
        """The harmonizer (feature level), parameter harmonizer or harmonized optimizer (parameter level).

        It owns the curriculum (and its ``state_dict`` holds the curriculum's state).
        """
        for h in (self.harmonizer, self.ph, self.hopt):
            if h is not None:
                return h
        return None

    def load_backend(self) -> float:
        """Load the harmonization backend before the timer starts (the first use JIT-compiles the C++ ops).

        Runs one tiny harmonization of the configured rule and backend on the device, leaving every
        RNG untouched. Returns the seconds it took (``backend_load_s`` in the summary).
        """
        h = self.cfg.harmony
        if h.level == "none" or (h.level == "parameter" and h.param_decomposition == "path"):
            return 0.0  # the parameter harmonizer solves with the reference engine (nothing to compile)
        if self.ctx.is_main and h.backend in ("auto", "cpp", "cuda") and _backend_needs_build():
            print("[gradharmony-pretrain] compiling the C++ extension of the harmonization backend (first use "
                  "only, ~30 s; not counted as training time)...", flush=True)
        tic = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            g = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(0)).to(self.device)
            gh.harmonize(g, h.method, backend=h.backend)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - tic

    # -------------------------------------------------------------- one step

    def next_batch(self) -> tuple[dict[str, Tensor], np.ndarray]:
        """This rank's batch (on device) and the global batch indices (B,)."""
        glob, local = self.sampler.next_indices()
        batch = load_batch(self.train_set, local)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, glob

    def compute_losses(self, out: dict[str, Tensor], text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample (l_va (B,), l_vt (B,)) with negatives gathered over ranks."""
        tau = self.cfg.model.temperature
        v_va, off = gather_features(out["z_v_va"])
        a_va, _ = gather_features(out["z_a_va"])
        v_vt, _ = gather_features(out["z_v_vt"])
        t_vt, _ = gather_features(out["z_t_vt"])
        m_all, _ = gather_features(text_mask)
        l_va = nce_per_sample(out["z_v_va"], out["z_a_va"], v_va, a_va, off, tau)
        l_vt = mil_nce_per_sample(out["z_v_vt"], out["z_t_vt"], text_mask, v_vt, t_vt, m_all, off, tau)
        return l_va, l_vt

    def train_step(self, batch: dict[str, Tensor]) -> StepOutput:
        """Forward, harmonized backward, optimizer/scheduler step; the harmonizer steps its curriculum."""
        self.model.train()
        every = self.cfg.harmony.measure_param_every
        cos_param = None
        if every and (self.state.step + 1) % every == 0:
            cos_param = self.measure_param_cosines(batch)
        opt = self.hopt or self.ph or self.optimizer  # the harmonized ones also step their curriculum
        opt.zero_grad(set_to_none=True)
        branch = self.harmonizer.branch if self.harmonizer is not None else None
        b = batch["video"].shape[0]
        with self.ph.capture(batch_size=b) if self.ph is not None else contextlib.nullcontext():
            out = self.model(batch, branch=branch)
        l_va, l_vt = self.compute_losses(out, batch["text_mask"])
        loss = 0.5 * (l_va.mean() + l_vt.mean())
        self._check_finite(loss)
        if self.hopt is not None or self.ph is not None:
            # per-sample terms of the same mean loss: sum_b (l_va_b + l_vt_b) / 2B
            (self.hopt or self.ph).backward([0.5 * l_va / b, 0.5 * l_vt / b])
        else:
            loss.backward()
        harmony = self.harmony
        stats = None if harmony is None else harmony.last_stats
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.train.grad_clip)
        opt.step()
        self.scheduler.step()
        if self.harmonizer is not None:
            self.harmonizer.step()  # the curriculum, once per step
        res = self._step_output(loss, l_va, l_vt, stats)
        if cos_param is not None:
            res.cos_param = all_gather_tensor(cos_param, self.ctx).cpu()
        return res

    def measure_param_cosines(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-sample parameter-level cosine of the two losses on ``batch``, leaving the training step unchanged.

        A forward pass of the raw model (no branch op) under a :class:`gh.ParameterHarmonizer`
        capture, the two per-sample loss vectors of the step (same scaling), and
        :meth:`gh.ParameterHarmonizer.measure`: the cosine of ``g_va,i`` and ``g_vt,i``, sample
        i's path-decomposition gradients of the two losses over every parameter reached by both
        (``shared_only``). Every RNG (DropToken, dropout) is forked and restored, so the training
        forward that follows draws the same noise, and nothing is written to ``.grad``, the
        rule state or the curriculum: the update is unchanged bit for bit. Costs one forward
        pass, two backward passes to the layer outputs and the per-sample Grams.

        Returns:
            (B_local,) float32 cosines in [-1, 1], this rank's samples in batch order (0 for a
            sample whose gradient of either loss is zero). Under DDP the losses include every
            rank's negatives, as in training.
        """
        if self._measurer is None:
            self._measurer = gh.ParameterHarmonizer(self.raw_model, "sum", nonfinite="propagate")
        b = batch["video"].shape[0]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with self._measurer.capture(batch_size=b):
                out = self.raw_model(batch)
            l_va, l_vt = self.compute_losses(out, batch["text_mask"])
            _, cos = self._measurer.measure([0.5 * l_va / b, 0.5 * l_vt / b])
        return cos[:, 0, 1].detach().float()

    def _check_finite(self, loss: Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if float(all_reduce_mean(bad, self.ctx)) > 0:
            raise NonFiniteLossError(f"non-finite loss ({float(loss.detach()):.4g}) at step {self.state.step + 1}")

    def _step_output(self, loss: Tensor, l_va: Tensor, l_vt: Tensor,
                     stats: Optional[gh.ConflictStats]) -> StepOutput:
        """Global step values with one device->host copy: losses averaged over ranks, statistics gathered.

        The per-sample score, curriculum weight, applied weight and cosines of every rank are
        gathered into one ``gh.ConflictStats`` of the global batch (CPU), which gives the
        conflict fraction, kept fraction and histogram.
        """
        threshold = None if stats is None else stats.threshold  # a float, or a 0-d tensor on the device
        thr = torch.as_tensor(float("nan") if threshold is None else threshold, device=loss.device).float()
        means = torch.stack([loss.detach().float(), l_va.detach().mean().float(), l_vt.detach().mean().float(),
                             thr.detach().reshape(())])
        means = all_reduce_mean(means, self.ctx)  # the threshold is the same on every rank (global curriculum)
        if stats is None:
            red = means.cpu().tolist()
            return StepOutput(loss=red[0], loss_va=red[1], loss_vt=red[2])
        score = stats.score.detach().float().reshape(-1)
        b, k = score.shape[0], stats.cos.shape[-1]
        cw = stats.curriculum_weights
        cols = [score, torch.ones_like(score) if cw is None else cw.detach().float().reshape(-1),
                stats.sample_weights.detach().float().reshape(-1), stats.cos.detach().float().reshape(b, k * k)]
        per_sample = all_gather_tensor(torch.cat([c.reshape(b, -1) for c in cols], dim=1), self.ctx)
        width = per_sample.shape[1]
        flat = torch.cat([means, per_sample.reshape(-1)]).cpu()
        red, per_sample = flat[:4].tolist(), flat[4:].view(-1, width)
        glob = gh.ConflictStats(cos=per_sample[:, 3:].reshape(-1, k, k), score=per_sample[:, 0],
                                sample_weights=per_sample[:, 2],
                                curriculum_weights=None if cw is None else per_sample[:, 1],
                                threshold=None if threshold is None else red[3])
        self._last_stats_obj = glob
        return StepOutput(loss=red[0], loss_va=red[1], loss_vt=red[2], stats=glob)

    # -------------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or ``stop_after`` steps this session); returns the summary.

        Raises :class:`ConfigError` naming ``--out`` when the run folder cannot be written at the
        start, and :class:`RunIOError` when a write fails during training.
        """
        t = self.cfg.train
        if t.resume == "latest" and self.folder.latest() is None:
            if self.ctx.is_main:  # first session of a preemptible job: nothing to resume yet
                print(f"--resume latest: no checkpoint in {self.ckpt_dir}; starting from scratch", flush=True)
        elif t.resume:
            self.resume(t.resume)
        elif self.folder.latest() is not None and not self.overwrite:
            raise ConfigError(f"--out: {self.run_dir} already holds checkpoints; pass --resume latest to continue "
                              f"or --overwrite to start over")
        barrier(self.ctx)
        if self.ctx.is_main:
            self.folder.prepare(self.cfg.to_dict(), self.state.step, {"step": 0, "data/skipped": self.skipped})
        if self.ctx.is_main and self.skipped:
            print(f"[gradharmony-pretrain] --skip-bad: {self.skipped} bad clips skipped "
                  f"(first: {self.skipped_reasons[0]})", flush=True)
        self.backend_load_s = self.load_backend()
        if self.state.step == 0 and t.eval_every:  # the untrained model: a baseline for every curve
            self.run_eval()
        stop_at = t.steps if t.stop_after is None else min(t.steps, self.state.step + t.stop_after)
        self._stop_at = stop_at
        status = "completed" if stop_at == t.steps else "stopped"
        bar = self._progress_bar(stop_at)
        try:
            while self.state.step < stop_at:
                self._one_iteration(bar)
        except (NonFiniteLossError, gh.NonFiniteGradientError) as e:  # NaN loss, or NaN/inf gradients
            status = "nonfinite"
            self._on_nonfinite(e)
        finally:
            if bar is not None:
                bar.close()
        return self._finish(status)

    def _one_iteration(self, bar: Any) -> None:
        t = self.cfg.train
        tic = time.perf_counter()
        batch, glob = self.next_batch()
        res = self.train_step(batch)
        self.state.step += 1
        dt = time.perf_counter() - tic
        self.state.samples_seen += t.batch_size
        self.state.train_time_s += dt
        if res.stats is not None:
            self.tracker.update(glob, res.stats.score, self.state.step)
            if t.log_samples and self.ctx.is_main:
                self._log_samples(glob, res.stats, res.cos_param)
        self.meter.add(res, dt, t.batch_size)
        step = self.state.step
        if step % t.log_every == 0 or step == t.steps:
            self._log_interval()
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            self.run_eval()
        if step % t.ckpt_every == 0 or step == self._stop_at:
            self.save()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.3f}", conflict=f"{res.conflict_fraction:.2f}",
                            sps=f"{t.batch_size / max(dt, 1e-9):.0f}")

    def _log_samples(self, glob: np.ndarray, stats: gh.ConflictStats, cos_param: Optional[Tensor] = None) -> None:
        """One ``samples.jsonl`` record of the global batch: clip indices, ground-truth misaligned flag
        (1, 0, or -1 for unknown), the conflict score (cosine between the video-audio and video-text loss
        gradients, 4 decimals) and the curriculum weight (1 without a curriculum); on steps measured by
        ``harmony.measure_param_every`` also ``cos_param``, the parameter-level per-sample cosine
        (:meth:`measure_param_cosines`, 4 decimals), in the same sample order as ``cos``."""
        idx = np.asarray(glob, dtype=np.int64)
        score = stats.score.detach().double().reshape(-1).tolist()
        cw = stats.curriculum_weights
        weight = [1.0] * len(score) if cw is None else cw.detach().double().reshape(-1).tolist()
        rec = {"step": self.state.step, "index": idx.tolist(),
               "misaligned": [int(m) for m in self.tracker.misaligned[idx]],
               "cos": [round(c, 4) if math.isfinite(c) else None for c in score],
               "weight": [round(w, 4) for w in weight]}
        if cos_param is not None:
            cp = cos_param.detach().double().reshape(-1).tolist()
            if len(cp) != len(score):
                raise RuntimeError(f"cos_param has {len(cp)} samples, the feature-level score {len(score)}")
            rec["cos_param"] = [round(c, 4) if math.isfinite(c) else None for c in cp]
        self.folder.log_samples(rec, self.state.last_checkpoint)

    def _progress_bar(self, stop_at: int) -> Any:
        if not (self.cfg.train.progress and self.ctx.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.state.step, desc="vatt", dynamic_ncols=True)

    def _log_interval(self) -> None:
        rec = self.meter.record(self.state.step, self.scheduler.get_last_lr()[0], self.sampler.epoch,
                                self._last_stats_obj)
        if "train/score_hist" in rec:
            rec.update(self.tracker.interval_record("train/"))  # cosines split by ground-truth alignment
        self.meter = Meter()
        self.log(rec)

    def log(self, rec: dict[str, Any]) -> None:
        """Append one JSON record to metrics.jsonl (rank 0)."""
        self.folder.log(rec, self.state.last_checkpoint)

    def run_eval(self) -> dict[str, float]:
        """Evaluation on rank 0 (others wait); also the conflict-score AUROC. Logged as ``eval/``."""
        metrics: dict[str, float] = {}
        if self.ctx.is_main:
            metrics = evaluate(self.raw_model, self.eval_set, self.probe_set, self.device,
                               self.cfg.train.eval_batch_size, seed=self.cfg.train.seed)
            window = max(1, len(self.train_set) // self.cfg.train.batch_size)
            auc = self.tracker.auroc(since_step=self.state.step - window + 1)
            if auc is not None:
                metrics["eval/auroc_conflict"] = auc
            auc = self._eval_pass_auroc()
            if auc is not None:
                metrics["eval/auroc_conflict_pass"] = auc
            self.log({"step": self.state.step, **metrics})
        barrier(self.ctx)
        return metrics

    def _eval_pass_auroc(self) -> Optional[float]:
        """AUROC of the conflict score from an eval pass over the first ``data.eval_size`` training clips."""
        limit = min(len(self.train_set), self.cfg.data.eval_size)
        if (self.tracker.misaligned[:limit] < 0).all():
            return None
        scores = conflict_scores(self.raw_model, self.train_set, self.cfg.train.batch_size, self.device,
                                 self.cfg.model.temperature, limit)
        return conflict_auroc(scores, self.tracker.misaligned[:limit])

    def _final_eval(self) -> dict[str, float]:
        """The final evaluation, or the one already logged for this step (a finished run resumed again)."""
        if self.ctx.is_main:
            done = self.folder.logged_eval(self.state.step)
            if done is not None:
                barrier(self.ctx)
                return done
        return self.run_eval()

    # -------------------------------------------------------------- failure / end

    def _on_nonfinite(self, err: Exception) -> None:
        last = self.state.last_checkpoint or self.folder.latest()
        msg = (f"error: {err}; stopping. The last good checkpoint is "
               f"{last if last else '(none written yet)'}; resume with --resume latest after fixing the cause "
               f"(e.g. a lower --lr)")
        self.nonfinite_message = msg
        self.log({"step": self.state.step + 1, "train/nonfinite": 1.0})
        if self.ctx.is_main:
            print(msg, flush=True)

    def _finish(self, status: str) -> dict[str, Any]:
        summary: dict[str, Any] = {"status": status, "step": self.state.step,
                                   "train_time_s": self.state.train_time_s,
                                   "backend_load_s": self.backend_load_s,
                                   "data/skipped": self.skipped,
                                   "last_checkpoint": self.state.last_checkpoint}
        summary["eval_data"] = describe_eval_data(self.cfg, len(self.train_set), len(self.eval_set))
        if status == "completed":
            summary.update(self._final_eval())
            if self.ctx.is_main and self.cfg.train.plots:
                summary["plots"] = self.folder.plots(self.state.step, self.state.last_checkpoint)
        if self.ctx.is_main:
            self.folder.write_summary(summary, self.state.step, self.state.last_checkpoint)
        return summary

    # -------------------------------------------------------------- checkpoints

    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit, as tensors and plain data (``weights_only`` loadable).

        The curriculum state is inside ``harmony`` (the harmonizer or harmonized optimizer owns it).
        """
        harmony = self.harmony
        return {
            "config": self.cfg.to_dict(),
            "vocab": list(self.train_set.tokenizer.vocab),
            "train_state": asdict(self.state),
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "harmony": harmony.state_dict() if harmony is not None else None,
            "rng": capture_rng(),
            "sampler": self.sampler.state_dict(),
            "tracker": self.tracker.state_dict(),
            "meter": asdict(self.meter),
            "world_size": self.ctx.world_size,
        }

    def save(self) -> Optional[str]:
        """Atomic checkpoint on rank 0 (RNG state of rank 0; other ranks keep theirs)."""
        path = None
        if self.ctx.is_main:
            path = self.folder.save(self.state.step, self.checkpoint_payload(), self.cfg.train.keep_checkpoints,
                                    self.state.last_checkpoint)
        self.state.last_checkpoint = path or os.path.join(self.ckpt_dir, f"step_{self.state.step:08d}.pt")
        barrier(self.ctx)
        return path

    def resume(self, spec: str) -> None:
        """Load ``latest`` (highest step in ``<out>/checkpoints``) or a checkpoint path."""
        path = self.folder.latest() if spec == "latest" else spec
        if path is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {self.ckpt_dir}")
        ck = load_checkpoint(path)
        check_resume_config(path, ck.get("config"), self.cfg.to_dict())
        self.raw_model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        t = self.cfg.train
        apply_resumed_hyperparameters(self.optimizer, self.scheduler, t.lr, t.weight_decay, self._lr_at,
                                      verbose=self.ctx.is_main)
        harmony = self.harmony
        if harmony is not None and ck["harmony"] is not None:
            harmony.load_state_dict(ck["harmony"])  # rule state and curriculum
        self.sampler.load_state_dict(ck["sampler"])
        self.tracker.load_state_dict(ck["tracker"])
        self.meter = Meter(**ck["meter"])
        self.state = TrainState(**ck["train_state"])
        self.state.last_checkpoint = path
        if self.ctx.world_size == ck.get("world_size", 1):
            restore_rng(ck["rng"])
        if self.ctx.rank:  # only rank 0's RNG is saved: other ranks re-seed deterministically
            torch.manual_seed(self.cfg.train.seed + self.ctx.rank + 7919 * self.state.step)
