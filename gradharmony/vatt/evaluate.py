"""Evaluation: zero-shot retrieval, linear probe, noise-detection AUROC of the conflict score.

* retrieval video->text, text->video (first narration of each clip), video->audio, audio->video
  on the eval clips: instance-level R@1/5/10 and median rank (1-based) of the paired item among N
  (ties broken at random, in expectation), plus the class-level R@1 (top-1 item has the query's
  class) when labels are known, each with its chance level (``eval/chance/...``) and, for R@k,
  the within-class chance (``eval/chance_within_class/...``); see :func:`retrieval_metrics`;
* linear probe: scikit-learn logistic regression on frozen video features h_v (backbone
  aggregation token, no DropToken) fit on a probe-train split, accuracy on the eval split;
* AUROC of ``-score`` (low gradient cosine = noisy) against the ground-truth misalignment of the
  training clips, from the per-sample scores collected during training (:class:`ScoreTracker`),
  and from an eval pass (:func:`conflict_scores`: frozen model, no DropToken, one backward to the
  video features per batch).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .data import ClipDataset, DataError, Subset, load_batch

__all__ = ["encode_dataset", "retrieval_metrics", "linear_probe", "ScoreTracker", "evaluate", "conflict_scores",
           "conflict_auroc", "holdout_split", "describe_eval_data"]

HIST_BINS = 20  # bins of the per-sample cosine histograms over [-1, 1] (as gh.ConflictStats.histogram)


@torch.no_grad()
def encode_dataset(model: nn.Module, dataset: ClipDataset, batch_size: int, device: torch.device,
                   limit: Optional[int] = None) -> dict[str, np.ndarray]:
    """Embeddings of the first ``limit`` clips in eval mode: h_v (N, d), z_* (N, D), label (N,)."""
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        batch = load_batch(dataset, range(start, min(n, start + batch_size)))
        out = model({k: v.to(device) for k, v in batch.items()})
        first = batch["text_mask"].float().argmax(1)  # first real narration
        out["z_t_vt"] = out["z_t_vt"][torch.arange(len(first)), first.to(device)]
        for key in ("h_v", "z_v_va", "z_a_va", "z_v_vt", "z_t_vt"):
            parts.setdefault(key, []).append(out[key].float().cpu().numpy())
        parts.setdefault("label", []).append(batch["label"].numpy())
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in parts.items()}


TIE_TOL = 1e-5  # similarities this close to the positive's count as tied (float32 encoding noise)


def retrieval_metrics(query: np.ndarray, gallery: np.ndarray, labels: Optional[np.ndarray] = None,
                      prefix: str = "", ks: Sequence[int] = (1, 5, 10), tie_tol: float = TIE_TOL) -> dict[str, float]:
    """Instance- and class-level retrieval where query i's match is gallery i, with chance levels.

    query, gallery: (N, D) L2-normalised; labels: (N,) classes or None / negative when unknown.

    Ties (gallery items whose similarity to the query is within ``tie_tol`` of the positive's, e.g.
    clips with the same narration) are broken uniformly at random, *in expectation*: with ``g``
    items strictly above the positive and ``t`` other items tied with it, the positive's rank is
    uniform on ``g+1 .. g+t+1``, so ``R@k`` is the exact expectation ``clip((k - g) / (t + 1), 0, 1)``
    and the median rank is taken over the expected ranks ``g + 1 + t / 2``. (Scoring a tied rank as
    ``g + 1 + t / 2`` before thresholding, as a single rank, would give R@1 = 0 whenever the
    positive has any tie.) The class-level ``class_R@1`` is the expected share of top-1 items
    (ties at the top broken uniformly) with the query's class.

    Returns ``{prefix}R@k`` in [0, 1], ``{prefix}median_rank`` (1-based), ``{prefix}class_R@1`` (when
    labels are known), and for each of them a chance level under a random ranking:
    ``chance/{prefix}R@k = k / N``, ``chance/{prefix}median_rank = (N + 1) / 2``,
    ``chance/{prefix}class_R@1 = mean_i n_{c_i} / N``, and the *within-class* chance of a ranking
    that is perfect at class level and random within the class,
    ``chance_within_class/{prefix}R@k = mean_i min(1, k / n_{c_i})`` (n_c: clips of class c).
    The chance keys put ``chance/`` after the leading ``eval/`` of ``prefix``, if any.

    >>> import numpy as np
    >>> same = np.full((2, 2), 0.5 ** 0.5)  # two identical gallery items: each positive is tied once
    >>> retrieval_metrics(np.eye(2), same)["R@1"]  # rank 1 or 2, equally likely
    0.5
    """
    sim = np.asarray(query, dtype=np.float64) @ np.asarray(gallery, dtype=np.float64).T
    n = sim.shape[0]
    if sim.shape != (n, n) or n == 0:
        raise ValueError(f"query and gallery must both be (N, D) with N >= 1, got {query.shape} and {gallery.shape}")
    pos = sim[np.arange(n), np.arange(n)][:, None]
    above = (sim > pos + tie_tol).sum(1)
    tied = (np.abs(sim - pos) <= tie_tol).sum(1) - 1  # other items tied with the positive
    head, _, tail = prefix.rpartition("eval/")
    chance = f"{head}{_}chance/{tail}"
    within = f"{head}{_}chance_within_class/{tail}"
    known = labels is not None and len(labels) == n and bool((np.asarray(labels) >= 0).all())
    out: dict[str, float] = {}
    for k in ks:
        out[f"{prefix}R@{k}"] = float(np.clip((k - above) / (tied + 1), 0.0, 1.0).mean())
        out[f"{chance}R@{k}"] = min(1.0, k / n)
    out[f"{prefix}median_rank"] = float(np.median(above + 1 + tied / 2))
    out[f"{chance}median_rank"] = (n + 1) / 2
    if known:
        lab = np.asarray(labels)
        counts = np.bincount(lab)[lab]  # n_c of each query's class
        top = sim >= sim.max(1, keepdims=True) - tie_tol  # (N, N) top-1 set of each query
        out[f"{prefix}class_R@1"] = float(((top & (lab[None, :] == lab[:, None])).sum(1) / top.sum(1)).mean())
        out[f"{chance}class_R@1"] = float((counts / n).mean())
        for k in ks:
            out[f"{within}R@{k}"] = float(np.minimum(1.0, k / counts).mean())
    return out


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0) -> float:
    """Accuracy of a standardised multinomial logistic regression on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=1.0, random_state=seed))
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


class ScoreTracker:
    """Per-sample conflict scores (gradient cosine, higher = cleaner) of the training clips.

    ``update`` is called every step with the global batch indices and scores. It keeps the latest
    score of every clip (``auroc`` scores ``-score`` against the ground-truth misalignment for the
    clips seen in the last ``window`` steps) and, until :meth:`interval_record` is called, histograms
    of the scores split by ground truth (aligned / misaligned clips; clips with unknown truth,
    ``misaligned == -1``, are left out).
    """

    def __init__(self, misaligned: np.ndarray, bins: int = HIST_BINS):
        self.misaligned = np.asarray(misaligned)
        self.score = np.full(len(self.misaligned), np.nan, dtype=np.float64)
        self.step = np.full(len(self.misaligned), -1, dtype=np.int64)
        self.bins = bins
        self.hist = {"aligned": [0] * bins, "misaligned": [0] * bins}

    def update(self, indices: Tensor | np.ndarray, scores: Tensor | np.ndarray, step: int) -> None:
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
        sc = np.asarray(scores.detach().float().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64)
        self.score[idx] = sc
        self.step[idx] = step
        truth = self.misaligned[idx]
        for name, flag in (("aligned", 0), ("misaligned", 1)):
            s = sc[(truth == flag) & np.isfinite(sc)]
            if len(s):
                counts = np.histogram(np.clip(s, -1.0, 1.0), bins=self.bins, range=(-1.0, 1.0))[0]
                self.hist[name] = [a + int(b) for a, b in zip(self.hist[name], counts)]

    def interval_record(self, prefix: str = "") -> dict[str, Any]:
        """Histograms since the last call, then reset: ``{prefix}score_hist_aligned`` (counts per bin
        of [-1, 1]), ``{prefix}score_hist_misaligned``, and ``{prefix}conflict_fraction_aligned`` /
        ``_misaligned`` (share with cosine < 0). Empty when no clip of known truth was seen."""
        out: dict[str, Any] = {}
        for name, h in self.hist.items():
            if sum(h):
                out[f"{prefix}score_hist_{name}"] = list(h)
                out[f"{prefix}conflict_fraction_{name}"] = sum(h[: self.bins // 2]) / sum(h)
        self.hist = {k: [0] * self.bins for k in self.hist}
        return out

    def auroc(self, since_step: int = 0) -> Optional[float]:
        """ROC AUC of -score for misaligned clips (None if undefined)."""
        from sklearn.metrics import roc_auc_score

        sel = (self.step >= since_step) & np.isfinite(self.score) & (self.misaligned >= 0)
        y = self.misaligned[sel]
        if sel.sum() < 2 or y.min() == y.max():
            return None
        return float(roc_auc_score(y, -self.score[sel]))

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain lists only (checkpoints are loaded with ``weights_only=True``)."""
        return {"score": torch.from_numpy(self.score.copy()), "step": torch.from_numpy(self.step.copy()),
                "hist": {k: [int(x) for x in v] for k, v in self.hist.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        def arr(v: Any, dtype: Any) -> np.ndarray:
            return (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(dtype, copy=True)

        self.score, self.step = arr(sd["score"], self.score.dtype), arr(sd["step"], self.step.dtype)
        if "hist" in sd:
            self.hist = {k: [int(x) for x in v] for k, v in sd["hist"].items()}


def evaluate(model: nn.Module, eval_set: ClipDataset, probe_set: Optional[ClipDataset], device: torch.device,
             batch_size: int, seed: int = 0, limit: Optional[int] = None) -> dict[str, float]:
    """All retrieval metrics and the linear probe, keys prefixed ``eval/``."""
    emb = encode_dataset(model, eval_set, batch_size, device, limit)
    lab = emb["label"]
    out: dict[str, float] = {}
    pairs: Sequence[tuple[str, str, str]] = (("v2t", "z_v_vt", "z_t_vt"), ("t2v", "z_t_vt", "z_v_vt"),
                                              ("v2a", "z_v_va", "z_a_va"), ("a2v", "z_a_va", "z_v_va"))
    for name, q, g in pairs:
        out.update(retrieval_metrics(emb[q], emb[g], lab, prefix=f"eval/{name}_"))
    out["eval/num_clips"] = float(len(lab))
    if probe_set is not None and (lab >= 0).all():
        tr = encode_dataset(model, probe_set, batch_size, device, limit)
        if len(np.unique(tr["label"])) > 1:
            out["eval/probe_acc"] = linear_probe(tr["h_v"], tr["label"], emb["h_v"], lab, seed)
            out["eval/chance/probe_acc"] = float(np.bincount(lab).max() / len(lab))  # majority class
    return out


def holdout_split(dataset: ClipDataset, eval_size: int, batch_size: int) -> tuple[ClipDataset, ClipDataset]:
    """(train, held-out eval): the last ``min(eval_size, max(4, N // 5))`` clips are held out of training.

    At least one batch of ``batch_size`` clips stays for training; raises :class:`DataError` when fewer
    than 2 clips would be left to evaluate on.
    """
    n = len(dataset)
    k = min(eval_size, max(4, n // 5), n - batch_size)
    if k < 2:
        raise DataError(f"--data: {n} clips are too few to hold out an evaluation split and keep one batch of "
                        f"{batch_size} for training; pass --eval-data, or --set data.eval_split=train to evaluate "
                        f"on training clips")
    return Subset(dataset, range(n - k)), Subset(dataset, range(n - k, n))


def describe_eval_data(cfg: Any, n_train: int, n_eval: int) -> str:
    """One line saying which clips the ``eval/`` metrics were measured on (for summary.json)."""
    d = cfg.data
    if d.manifest is None:
        return (f"embedded eval split: {n_eval} clips generated apart from the {n_train} training clips, digit "
                f"images held out of training, none misaligned")
    if d.eval_manifest is not None:
        return f"--eval-data {d.eval_manifest}: {n_eval} clips for retrieval"
    if d.eval_split == "holdout":
        return (f"held out: the last clips of --data {d.manifest}, never trained on ({n_eval} for retrieval, "
                f"{n_train} for training)")
    return f"training clips: the first clips of --data {d.manifest} (data.eval_split=train), also trained on"


def conflict_scores(model: nn.Module, dataset: ClipDataset, batch_size: int, device: torch.device,
                    temperature: float, limit: Optional[int] = None) -> np.ndarray:
    """Per-clip conflict score (B,) of the first ``limit`` clips, batch by batch in index order.

    The cosine between dL_va/dh_i and dL_vt/dh_i at the video features h (``gh.Harmonizer("sum")``),
    with the model frozen in eval mode: only the heads are differentiated, the backbone is not.
    """
    import gradharmony as gh

    from .losses import mil_nce_per_sample, nce_per_sample

    was_training = model.training
    model.eval()
    harm = gh.Harmonizer("sum")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    out: list[np.ndarray] = []
    for start in range(0, n - 1, batch_size):
        batch = {k: v.to(device) for k, v in load_batch(dataset, range(start, min(n, start + batch_size))).items()}
        with torch.no_grad():
            h_v, h_a, h_t = model.encode_video(batch["video"]), model.encode_audio(batch["audio"]), \
                model.encode_text(batch["text"])
        h = h_v.detach().requires_grad_()
        z = model.heads(*harm.branch(h, 2), h_a, h_t)
        loss = nce_per_sample(z["z_v_va"], z["z_a_va"], temperature=temperature).mean() + \
            mil_nce_per_sample(z["z_v_vt"], z["z_t_vt"], batch["text_mask"], temperature=temperature).mean()
        torch.autograd.grad(loss, h)
        out.append(harm.last_stats.score.float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def conflict_auroc(scores: np.ndarray, misaligned: np.ndarray) -> Optional[float]:
    """ROC AUC of ``-scores`` for ``misaligned == 1`` (None when undefined or labels unknown)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(misaligned)[: len(scores)]
    sel = (y >= 0) & np.isfinite(scores)
    if sel.sum() < 2 or y[sel].min() == y[sel].max():
        return None
    return float(roc_auc_score(y[sel], -scores[sel]))
