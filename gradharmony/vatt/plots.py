"""PNG plots of a run from its metrics.jsonl (matplotlib, Agg backend).

``losses.png`` (total, NCE video-audio, MIL-NCE video-text), ``conflict_hist.png`` (histogram of the
per-sample gradient cosine over time), ``kept_fraction.png`` (curriculum kept fraction and
conflict fraction), ``retrieval.png`` (eval R@10, class-level R@1, probe accuracy, AUROC).
"""
from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["make_plots", "read_metrics"]


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _series(recs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def make_plots(metrics_path: str, folder: str) -> list[str]:
    """Write the PNGs into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = read_metrics(metrics_path)
    os.makedirs(folder, exist_ok=True)
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        p = os.path.join(folder, name)
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, lab in (("train/loss", "total"), ("train/loss_va", "NCE video-audio"), ("train/loss_vt", "MIL-NCE video-text")):
        ax.plot(*_series(recs, key), label=lab)
    ax.set(xlabel="step", ylabel="loss", title="training losses")
    ax.legend()
    save(fig, "losses.png")

    hist = [(r["step"], r["train/score_hist"]) for r in recs if "train/score_hist" in r]
    if hist:
        h = np.array([x[1] for x in hist], dtype=float)
        h = h / np.maximum(h.sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.imshow(h.T, aspect="auto", origin="lower", extent=(hist[0][0], hist[-1][0], -1, 1), cmap="viridis")
        ax.set(xlabel="step", ylabel="cos(g_va, g_vt) per sample", title="conflict-cosine histogram over time")
        save(fig, "conflict_hist.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*_series(recs, "train/kept_fraction"), label="kept fraction (curriculum)")
        ax.plot(*_series(recs, "train/conflict_fraction"), label="conflict fraction (cos < 0)")
        ax.set(xlabel="step", ylim=(-0.02, 1.02), title="curriculum")
        ax.legend()
        save(fig, "kept_fraction.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("eval/v2t_R@10", "eval/t2v_R@10", "eval/v2a_R@10", "eval/v2t_class_R@1", "eval/v2a_class_R@1",
                "eval/probe_acc", "eval/auroc_conflict", "eval/auroc_conflict_pass"):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, marker="o", label=key[5:])
    ax.set(xlabel="step", ylim=(0, 1.02), title="evaluation")
    ax.legend(fontsize=8)
    save(fig, "retrieval.png")
    return written
