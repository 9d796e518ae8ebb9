"""Evaluation: zero-shot retrieval, linear probe, noise-detection AUROC of the conflict score.

* retrieval video->text, text->video (first narration of each clip), video->audio, audio->video
  on the eval clips: R@1/5/10 and median rank (1-based) of the paired item among N, plus the
  class-level R@1 (top-1 item has the same latent class) when labels are known;
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

from .data import ClipDataset, load_batch

__all__ = ["encode_dataset", "retrieval_metrics", "linear_probe", "ScoreTracker", "evaluate", "conflict_scores",
           "conflict_auroc"]


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


def retrieval_metrics(query: np.ndarray, gallery: np.ndarray, labels: Optional[np.ndarray] = None,
                      prefix: str = "") -> dict[str, float]:
    """Query i's match is gallery i. query, gallery: (N, D) normalised. R@k in [0, 1], median rank.

    Ties (identical gallery items, e.g. two clips with the same narration) count half, the
    expected rank under random tie-breaking.
    """
    sim = query @ gallery.T
    n = sim.shape[0]
    pos = sim[np.arange(n), np.arange(n)][:, None]
    ranks = 1 + (sim > pos).sum(1) + 0.5 * ((sim == pos).sum(1) - 1)
    out = {f"{prefix}R@{k}": float((ranks <= k).mean()) for k in (1, 5, 10)}
    out[f"{prefix}median_rank"] = float(np.median(ranks))
    if labels is not None and (labels >= 0).all():
        out[f"{prefix}class_R@1"] = float((labels[sim.argmax(1)] == labels).mean())
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
    """Latest per-sample conflict score (gradient cosine, higher = cleaner) of every training clip.

    ``update`` is called every step with the global batch indices and scores; ``auroc`` scores
    ``-score`` against the ground-truth misalignment for the clips seen in the last ``window`` steps.
    """

    def __init__(self, misaligned: np.ndarray):
        self.misaligned = np.asarray(misaligned)
        self.score = np.full(len(self.misaligned), np.nan, dtype=np.float64)
        self.step = np.full(len(self.misaligned), -1, dtype=np.int64)

    def update(self, indices: Tensor | np.ndarray, scores: Tensor | np.ndarray, step: int) -> None:
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
        sc = np.asarray(scores.detach().float().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64)
        self.score[idx] = sc
        self.step[idx] = step

    def auroc(self, since_step: int = 0) -> Optional[float]:
        """ROC AUC of -score for misaligned clips (None if undefined)."""
        from sklearn.metrics import roc_auc_score

        sel = (self.step >= since_step) & np.isfinite(self.score) & (self.misaligned >= 0)
        y = self.misaligned[sel]
        if sel.sum() < 2 or y.min() == y.max():
            return None
        return float(roc_auc_score(y, -self.score[sel]))

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.score.copy(), "step": self.step.copy()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.score, self.step = np.array(sd["score"]), np.array(sd["step"])


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
    return out


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
