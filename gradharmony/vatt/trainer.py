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

At parameter level (``harmony.level="parameter"``) the per-sample loss vectors go to
``gh.HarmonizedOptimizer(granularity="sample")`` instead. ``harmony.level="none"`` is plain VATT
without any gradient measurement (the speed baseline).

Feature level uses the *path* decomposition of DESIGN.md: the curriculum weight s_i scales the
harmonized gradient reaching the shared video representation of clip i (and hence the backbone
through the video path); the audio and text paths are not re-weighted.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import gradharmony as gh

from .checkpoint import capture_rng, find_latest, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from .config import Config, ConfigError
from .data import ClipDataset, EpochBatchSampler, Subset, load_batch
from .distributed import DistContext, all_gather_tensor, all_reduce_mean, barrier
from .evaluate import ScoreTracker, conflict_auroc, conflict_scores, evaluate
from .losses import gather_features, mil_nce_per_sample, nce_per_sample
from .model import VATT

__all__ = ["TrainState", "Trainer", "NonFiniteLossError", "build_datasets", "warmup_cosine"]

HIST_BINS = 20  # conflict-score histogram bins over [-1, 1]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf."""


@dataclass
class TrainState:
    """Progress counters saved in every checkpoint."""

    step: int = 0
    samples_seen: int = 0
    train_time_s: float = 0.0
    last_checkpoint: Optional[str] = None


@dataclass
class Meter:
    """Sums over the current logging interval."""

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


@dataclass
class StepOutput:
    """What one training step reports (global values, averaged over ranks)."""

    loss: float
    loss_va: float
    loss_vt: float
    conflict_fraction: float = float("nan")
    kept_fraction: float = float("nan")
    scores: Optional[Tensor] = None  # (B_global,) conflict scores (CPU)


# ---------------------------------------------------------------------- builders


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


def _ground_truth(ds: ClipDataset) -> np.ndarray:
    if hasattr(ds, "ground_truth"):
        return ds.ground_truth()[1]
    return np.full(len(ds), -1, dtype=np.int64)


# ---------------------------------------------------------------------- trainer


class Trainer:
    """Owns model, optimizer, scheduler, harmonizer, data position and logging; see module docstring."""

    def __init__(self, cfg: Config, ctx: Optional[DistContext] = None,
                 datasets: Optional[tuple[ClipDataset, ClipDataset, Optional[ClipDataset]]] = None,
                 overwrite: bool = False):
        self.cfg, self.ctx, self.overwrite = cfg, ctx or DistContext(), overwrite
        if self.ctx.distributed and cfg.harmony.level == "parameter":
            raise ConfigError("harmony.level: 'parameter' is not supported with DDP; use 'feature'")
        if cfg.train.batch_size % self.ctx.world_size:
            raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the world size "
                              f"{self.ctx.world_size}")
        self.device = self.ctx.device
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.train_set, self.eval_set, self.probe_set = datasets or build_datasets(cfg)
        self.model = self._build_model()
        self.optimizer = torch.optim.Adam(self.raw_model.parameters(), lr=cfg.train.lr,
                                          weight_decay=cfg.train.weight_decay)
        t = cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, t.warmup_steps, t.steps, t.min_lr_ratio))
        self.curriculum = build_curriculum(cfg)
        self.harmonizer: Optional[gh.Harmonizer] = None
        self.hopt: Optional[gh.HarmonizedOptimizer] = None
        self._build_harmony()
        self.sampler = EpochBatchSampler(len(self.train_set), t.batch_size, t.seed, self.ctx.rank,
                                         self.ctx.world_size)
        self.tracker = ScoreTracker(_ground_truth(self.train_set))
        self.state = TrainState()
        self.meter = Meter()
        self._last_stats_obj: Optional[Any] = None  # gh.ConflictStats of the last step
        self.run_dir = t.out or time.strftime(f"runs/vatt-{cfg.preset}-%Y%m%d-%H%M%S", time.gmtime())
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")

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
        if self.ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model

    def _build_harmony(self) -> None:
        h = self.cfg.harmony
        if h.level == "feature":
            self.harmonizer = gh.Harmonizer(method=h.method, curriculum=self.curriculum, backend=h.backend,
                                            nonfinite=h.nonfinite)
        elif h.level == "parameter":
            self.hopt = gh.HarmonizedOptimizer(self.optimizer, method=h.method, curriculum=self.curriculum,
                                               granularity="sample", chunk_size=h.chunk_size, backend=h.backend,
                                               nonfinite=h.nonfinite, loss_reduction="sum")

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
        """Forward, harmonized backward, optimizer/scheduler/curriculum step."""
        self.model.train()
        zero_grad = self.hopt.zero_grad if self.hopt is not None else self.optimizer.zero_grad
        zero_grad(set_to_none=True)
        branch = self.harmonizer.branch if self.harmonizer is not None else None
        out = self.model(batch, branch=branch)
        l_va, l_vt = self.compute_losses(out, batch["text_mask"])
        loss = 0.5 * (l_va.mean() + l_vt.mean())
        self._check_finite(loss)
        if self.hopt is not None:  # per-sample terms of the same mean loss: sum_b (l_va_b + l_vt_b) / 2B
            n = l_va.shape[0]
            self.hopt.backward([0.5 * l_va / n, 0.5 * l_vt / n])
        else:
            loss.backward()
        stats = self._last_stats()
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.train.grad_clip)
        (self.hopt or self.optimizer).step()
        self.scheduler.step()
        if self.curriculum is not None and self.hopt is None:
            self.curriculum.step()
        return self._step_output(loss, l_va, l_vt, stats)

    def _check_finite(self, loss: Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if float(all_reduce_mean(bad, self.ctx)) > 0:
            raise NonFiniteLossError(f"non-finite loss ({float(loss.detach()):.4g}) at step {self.state.step + 1}")

    def _last_stats(self) -> Optional[Any]:
        src = self.harmonizer if self.harmonizer is not None else self.hopt
        return None if src is None else src.last_stats

    def _step_output(self, loss: Tensor, l_va: Tensor, l_vt: Tensor, stats: Optional[Any]) -> StepOutput:
        """Global step values with one device->host copy: losses averaged over ranks, scores gathered.

        conflict fraction = share of the global batch with score < 0; kept fraction = mean raw
        curriculum weight (1 without curriculum), as in ``gh.ConflictStats``.
        """
        means = torch.stack([loss.detach(), l_va.detach().mean(), l_vt.detach().mean()]).float()
        means = all_reduce_mean(means, self.ctx)
        if stats is None:
            red = means.cpu().tolist()
            return StepOutput(loss=red[0], loss_va=red[1], loss_vt=red[2])
        score = stats.score.detach().float().reshape(-1)
        cw = stats.curriculum_weights
        kept = (torch.ones_like(score) if cw is None else cw.detach().float().reshape(-1))
        per_sample = all_gather_tensor(torch.stack([score, kept], dim=1), self.ctx)  # (B_global, 2)
        flat = torch.cat([means, per_sample.reshape(-1)]).cpu()
        red, per_sample = flat[:3].tolist(), flat[3:].view(-1, 2)
        self._last_stats_obj = stats
        return StepOutput(loss=red[0], loss_va=red[1], loss_vt=red[2],
                          conflict_fraction=float((per_sample[:, 0] < 0).float().mean()),
                          kept_fraction=float(per_sample[:, 1].mean()), scores=per_sample[:, 0])

    # -------------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or ``stop_after`` steps this session); returns the summary."""
        t = self.cfg.train
        if t.resume == "latest" and find_latest(self.ckpt_dir) is None:
            if self.ctx.is_main:  # first session of a preemptible job: nothing to resume yet
                print(f"--resume latest: no checkpoint in {self.ckpt_dir}; starting from scratch", flush=True)
        elif t.resume:
            self.resume(t.resume)
        elif find_latest(self.ckpt_dir) is not None and not self.overwrite:
            raise ConfigError(f"--out: {self.run_dir} already holds checkpoints; pass --resume latest to continue "
                              f"or --overwrite to start over")
        barrier(self.ctx)
        if self.ctx.is_main:
            self._prepare_run_dir()
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
        if res.scores is not None:
            self.tracker.update(glob, res.scores, self.state.step)
        self._accumulate(res, dt)
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

    def _progress_bar(self, stop_at: int) -> Any:
        if not (self.cfg.train.progress and self.ctx.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.state.step, desc="vatt", dynamic_ncols=True)

    def _accumulate(self, res: StepOutput, dt: float) -> None:
        m = self.meter
        m.n += 1
        m.loss += res.loss
        m.loss_va += res.loss_va
        m.loss_vt += res.loss_vt
        m.time_s += dt
        m.samples += self.cfg.train.batch_size
        if res.scores is not None:
            m.conflict_fraction += res.conflict_fraction
            m.kept_fraction += res.kept_fraction
            s = res.scores.double().clamp(-1, 1).numpy()
            m.score_sum += float(s.sum())
            m.score_n += len(s)
            counts = np.histogram(s, bins=HIST_BINS, range=(-1.0, 1.0))[0]
            m.hist = [a + float(b) for a, b in zip(m.hist, counts)]

    def _log_interval(self) -> None:
        m = self.meter
        rec: dict[str, Any] = {"step": self.state.step, "loss": m.loss / m.n, "train/loss": m.loss / m.n,
                               "train/loss_va": m.loss_va / m.n, "train/loss_vt": m.loss_vt / m.n,
                               "train/lr": self.scheduler.get_last_lr()[0],
                               "train/samples_per_s": m.samples / max(m.time_s, 1e-9),
                               "train/epoch": self.sampler.epoch}
        if m.score_n:
            rec.update({"train/conflict_fraction": m.conflict_fraction / m.n,
                        "train/kept_fraction": m.kept_fraction / m.n,
                        "train/score_mean": m.score_sum / m.score_n, "train/score_hist": m.hist})
            last = self._last_stats_obj
            if last is not None:  # this rank's statistics of the interval's last step
                rec.update({k: float(v) for k, v in last.to_dict(prefix="train/conflict/").items()})
        self.meter = Meter()
        self.log(rec)

    def log(self, rec: dict[str, Any]) -> None:
        """Append one JSON record to metrics.jsonl (rank 0)."""
        if not self.ctx.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

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

    # -------------------------------------------------------------- failure / end

    def _on_nonfinite(self, err: Exception) -> None:
        last = self.state.last_checkpoint or find_latest(self.ckpt_dir)
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
                                   "last_checkpoint": self.state.last_checkpoint}
        if status == "completed":
            summary.update(self.run_eval())
            if self.ctx.is_main and self.cfg.train.plots:
                from .plots import make_plots

                summary["plots"] = make_plots(self.metrics_path, os.path.join(self.run_dir, "plots"))
        if self.ctx.is_main:
            with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        return summary

    # -------------------------------------------------------------- checkpoints

    def _prepare_run_dir(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        if self.state.step == 0:
            for old in list_checkpoints(self.ckpt_dir):  # only reached with --overwrite
                os.unlink(old)
        with open(os.path.join(self.run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.cfg.to_dict(), f, indent=2)
        _truncate_metrics(self.metrics_path, self.state.step)

    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit."""
        harmony = self.harmonizer or self.hopt
        return {
            "config": self.cfg.to_dict(),
            "train_state": asdict(self.state),
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "harmony": harmony.state_dict() if harmony is not None else None,
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
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
            path = save_checkpoint(self.ckpt_dir, self.state.step, self.checkpoint_payload(),
                                   keep=self.cfg.train.keep_checkpoints)
        self.state.last_checkpoint = path or os.path.join(self.ckpt_dir, f"step_{self.state.step:08d}.pt")
        barrier(self.ctx)
        return path

    def _apply_resumed_hyperparameters(self) -> None:
        """This run's --lr and weight decay over the ones in the loaded optimizer/scheduler state.

        ``load_state_dict`` restores the saved peak LR (scheduler ``base_lrs``, the groups'
        ``initial_lr``) and weight decay, which would silently ignore a lower ``--lr`` given to
        continue after a NaN stop. Unchanged values are left alone (bit-for-bit resume).
        """
        t = self.cfg.train
        groups = self.optimizer.param_groups
        changed = False
        for i, g in enumerate(groups):
            if self.scheduler.base_lrs[i] != t.lr:
                old = self.scheduler.base_lrs[i]
                self.scheduler.base_lrs[i] = t.lr
                g["initial_lr"] = t.lr
                g["lr"] = t.lr * warmup_cosine(self.scheduler.last_epoch, t.warmup_steps, t.steps, t.min_lr_ratio)
                changed = True
                if self.ctx.is_main and i == 0:
                    print(f"--resume: peak lr {old:g} -> {t.lr:g} (this run's --lr)", flush=True)
            if g.get("weight_decay") != t.weight_decay:
                g["weight_decay"] = t.weight_decay
        if changed:
            self.scheduler._last_lr = [g["lr"] for g in groups]

    def resume(self, spec: str) -> None:
        """Load ``latest`` (highest step in ``<out>/checkpoints``) or a checkpoint path."""
        path = find_latest(self.ckpt_dir) if spec == "latest" else spec
        if path is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {self.ckpt_dir}")
        ck = load_checkpoint(path)
        _check_resume_config(path, ck.get("config"), self.cfg.to_dict())
        self.raw_model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self._apply_resumed_hyperparameters()
        harmony = self.harmonizer or self.hopt
        if harmony is not None and ck["harmony"] is not None:
            harmony.load_state_dict(ck["harmony"])
        if self.curriculum is not None and ck["curriculum"] is not None:
            self.curriculum.load_state_dict(ck["curriculum"])
        self.sampler.load_state_dict(ck["sampler"])
        self.tracker.load_state_dict(ck["tracker"])
        self.meter = Meter(**ck["meter"])
        self.state = TrainState(**ck["train_state"])
        self.state.last_checkpoint = path
        if self.ctx.world_size == ck.get("world_size", 1):
            restore_rng(ck["rng"])
        if self.ctx.rank:  # only rank 0's RNG is saved: other ranks re-seed deterministically
            torch.manual_seed(self.cfg.train.seed + self.ctx.rank + 7919 * self.state.step)


# Options that may differ between the run that wrote a checkpoint and the one resuming it
# (where to run, how often to log/evaluate/save, the learning rate after a NaN stop, ...).
# Every other model/data/harmony/train field shapes the saved state (parameters, data order,
# LR schedule, curriculum schedule, rule state) and must match.
RESUME_MAY_CHANGE = frozenset({
    "data.eval_manifest", "data.eval_size",
    "harmony.chunk_size", "harmony.backend", "harmony.nonfinite",
    "train.lr", "train.min_lr_ratio", "train.weight_decay", "train.grad_clip", "train.device", "train.threads",
    "train.out", "train.resume", "train.log_every", "train.eval_every", "train.ckpt_every",
    "train.keep_checkpoints", "train.stop_after", "train.progress", "train.plots", "train.eval_batch_size",
})


def _check_resume_config(path: str, saved: Optional[dict[str, Any]], current: dict[str, Any]) -> None:
    """Raise ConfigError naming the options that differ from the checkpoint's run (not loadable)."""
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


def _truncate_metrics(path: str, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint we resume from)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
