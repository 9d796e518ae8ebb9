"""PNG figures of a run from its metrics.jsonl (matplotlib, Agg backend).

* ``losses.png``: total loss, NCE video-audio, MIL-NCE video-text over steps.
* ``conflict_hist.png``: share of samples per cosine bin, cos(g_va, g_vt), over steps, with a colour
  bar, the cos = 0 line and the curriculum's score threshold (where logged).
* ``cosine_by_alignment.png``: the cosine distribution of ground-truth aligned vs misaligned training
  triplets (first and second half of training) and the share of negative cosines of each group over
  steps (embedded data, or manifests with a ``misaligned`` column).
* ``kept_fraction.png``: curriculum kept fraction and conflict fraction (cos < 0) over steps.
* ``retrieval.png``: one panel per metric kind (instance R@1, instance R@10, class-level R@1, median
  rank, linear-probe accuracy, conflict-score AUROC), the four directions in each, with chance levels.

Figures are only drawn from what the records hold: a one-record run gives the same files, without
warnings.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

__all__ = ["make_plots", "read_metrics"]

DIRECTIONS = (("v2t", "video→text"), ("t2v", "text→video"), ("v2a", "video→audio"), ("a2v", "audio→video"))
COLOURS = {"v2t": "tab:blue", "t2v": "tab:cyan", "v2a": "tab:red", "a2v": "tab:orange",
           "aligned": "tab:green", "misaligned": "tab:purple"}


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _series(recs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _last(recs: list[dict[str, Any]], key: str) -> Optional[float]:
    for r in reversed(recs):
        if r.get(key) is not None:
            return float(r[key])
    return None


def make_plots(metrics_path: str, folder: str) -> list[str]:
    """Write the PNGs into ``folder`` (created if needed); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    os.makedirs(folder, exist_ok=True)
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        p = os.path.join(folder, name)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for key, lab in (("train/loss", "total (mean of the two)"), ("train/loss_va", "NCE video-audio"),
                     ("train/loss_vt", "MIL-NCE video-text")):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 3 else None, label=lab)
    ax.set(xlabel="training step", ylabel="contrastive loss (nats)", title="Training losses")
    _legend(ax)
    save(fig, "losses.png")

    hist = [(r["step"], r["train/score_hist"]) for r in recs if "train/score_hist" in r]
    if hist:
        _conflict_hist(plt, recs, hist, save)
        _kept_fraction(plt, recs, save)
    if any("train/score_hist_aligned" in r or "train/score_hist_misaligned" in r for r in recs):
        _cosine_by_alignment(plt, recs, save)
    if any(k.startswith("eval/") for r in recs for k in r):
        _retrieval(plt, recs, save)
    return written


def _legend(ax: Any, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _conflict_hist(plt: Any, recs: list[dict[str, Any]], hist: list[tuple[int, list[float]]], save: Any) -> None:
    import numpy as np

    h = np.array([x[1] for x in hist], dtype=float)
    h = h / np.maximum(h.sum(1, keepdims=True), 1)
    steps = [x[0] for x in hist]
    x0, x1 = (steps[0] - 0.5, steps[-1] + 0.5) if len(steps) == 1 else (steps[0], steps[-1])
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    im = ax.imshow(h.T, aspect="auto", origin="lower", extent=(x0, x1, -1, 1), cmap="viridis",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of samples in the logging interval")
    ax.axhline(0.0, color="white", linestyle="--", linewidth=1, label="cos = 0 (conflict below)")
    xs, ys = _series(recs, "train/conflict/threshold")
    if xs:
        ax.plot(xs, ys, color="tab:red", marker="." if len(xs) < 3 else None, linewidth=1.5,
                label="curriculum threshold (samples below are dropped)")
    ax.set(xlabel="training step", ylabel="per-sample cos(∇L_va, ∇L_vt)", ylim=(-1, 1),
           title="Per-sample gradient cosine over training")
    _legend(ax, fontsize=8, loc="lower right")
    save(fig, "conflict_hist.png")


def _kept_fraction(plt: Any, recs: list[dict[str, Any]], save: Any) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for key, lab, style in (("train/kept_fraction", "kept fraction (curriculum)", "-"),
                            ("train/conflict_fraction", "conflict fraction (cos < 0), all", "-"),
                            ("train/conflict_fraction_aligned", "conflict fraction, aligned triplets", "--"),
                            ("train/conflict_fraction_misaligned", "conflict fraction, misaligned triplets", "--")):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, style, marker="." if len(xs) < 3 else None, label=lab,
                    color=COLOURS.get(key.rsplit("_", 1)[-1]))
    ax.set(xlabel="training step", ylabel="fraction (of the batch, or of the group)", ylim=(-0.02, 1.02),
           title="Curriculum and conflicts")
    _legend(ax, fontsize=8)
    save(fig, "kept_fraction.png")


def _cosine_by_alignment(plt: Any, recs: list[dict[str, Any]], save: Any) -> None:
    import numpy as np

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    rows = [r for r in recs if "train/score_hist_aligned" in r or "train/score_hist_misaligned" in r]
    half = max(1, len(rows) // 2)
    phases = (("first half", rows[:half], ":"), ("second half", rows[half:], "-")) if len(rows) > 1 else \
        (("all steps", rows, "-"),)
    for group in ("aligned", "misaligned"):
        key = f"train/score_hist_{group}"
        for phase, part, style in phases:
            hs = [r[key] for r in part if key in r]
            if not hs:
                continue
            counts = np.sum(np.array(hs, dtype=float), axis=0)
            edges = np.linspace(-1, 1, len(counts) + 1)
            dens = counts / max(counts.sum(), 1) / (edges[1] - edges[0])
            ax.stairs(dens, edges, linestyle=style, color=COLOURS[group], linewidth=1.6,
                      label=f"{group} ({phase}, n={int(counts.sum())})")
        xs, ys = _series(recs, f"train/conflict_fraction_{group}")
        if xs:
            bx.plot(xs, ys, marker="." if len(xs) < 3 else None, color=COLOURS[group], label=f"{group} triplets")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1, label="cos = 0")
    thr = [r["train/conflict/threshold"] for r in rows if r.get("train/conflict/threshold") is not None]
    if thr:
        ax.axvline(float(np.median(thr)), color="tab:red", linewidth=1,
                   label="curriculum threshold (median over training)")
    ax.set(xlabel="per-sample cos(∇L_va, ∇L_vt)", ylabel="density", xlim=(-1, 1),
           title="Cosine by ground truth: aligned vs misaligned")
    _legend(ax, fontsize=7, loc="upper left")
    bx.set(xlabel="training step", ylabel="fraction with cos < 0", ylim=(-0.02, 1.02),
           title="Conflicting share per group")
    _legend(bx, fontsize=8)
    save(fig, "cosine_by_alignment.png")


def _retrieval(plt: Any, recs: list[dict[str, Any]], save: Any) -> None:
    panels = (("R@1", "instance-level R@1", "recall"), ("R@10", "instance-level R@10", "recall"),
              ("class_R@1", "class-level R@1 (top-1 of the query's class)", "recall"),
              ("median_rank", "instance-level median rank", "rank (1 = best, log scale)"))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), layout="constrained")
    flat = axes.ravel()
    for ax, (metric, title, ylabel) in zip(flat, panels):
        for d, name in DIRECTIONS:
            xs, ys = _series(recs, f"eval/{d}_{metric}")
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, color=COLOURS[d], label=name)
        chance = _last(recs, f"eval/chance/v2t_{metric}")
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.3g})")
        within = _last(recs, f"eval/chance_within_class/v2t_{metric}")
        if within is not None:
            ax.axhline(within, color="black", linestyle="--", linewidth=1,
                       label=f"within-class chance ({within:.3g})")
        if metric == "median_rank":
            ys = [y for ln in ax.get_lines() for y in ln.get_ydata()]
            if ys and min(ys) > 0 and max(ys) / min(ys) > 10:  # log scale only where it spans a decade
                from matplotlib.ticker import FuncFormatter, NullFormatter

                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                ylabel = "rank (1 = best)"
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set(xlabel="training step", ylabel=ylabel, title=title)
        _legend(ax, fontsize=7)
    ax = flat[4]
    xs, ys = _series(recs, "eval/probe_acc")
    if xs:
        ax.plot(xs, ys, marker="o", markersize=3, color="tab:green", label="linear probe on h_v")
    chance = _last(recs, "eval/chance/probe_acc")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance: majority class ({chance:.3g})")
    ax.set(xlabel="training step", ylabel="accuracy", ylim=(-0.02, 1.02), title="Linear-probe accuracy (eval clips)")
    _legend(ax, fontsize=7)
    ax = flat[5]
    for key, lab, colour in (("eval/auroc_conflict", "scores seen in training", "tab:purple"),
                             ("eval/auroc_conflict_pass", "eval pass over training clips", "tab:brown")):
        xs, ys = _series(recs, key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, color=colour, label=lab)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    ax.set(xlabel="training step", ylabel="ROC AUC (misaligned = positive)", ylim=(-0.02, 1.02),
           title="Conflict score vs ground-truth misalignment")
    _legend(ax, fontsize=7)
    save(fig, "retrieval.png")
