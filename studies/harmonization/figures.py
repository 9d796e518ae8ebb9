"""PNG figures of the aggregated results (matplotlib, Agg backend): every axis labelled, chance lines drawn.

* ``cosine_distributions.png``: per misalignment rate (columns) and training phase (rows: first,
  middle, last window), the per-sample cosine distribution of aligned vs misaligned triplets,
  plain VATT (``sum``) runs pooled over seeds, with the cosine = 0 line;
* ``metrics_vs_misalignment.png``: each primary metric vs the misalignment rate, one line per
  method, error bars = standard deviation over seeds, dashed chance level;
* ``feature_vs_parameter.png``: per method (rows) and misalignment rate (columns), the per-sample
  parameter-level cosine against the feature-level one on the same run (runs with
  ``harmony.measure_param_every``; a random subsample of each seed's measured samples, aligned and
  misaligned coloured), with the Spearman correlation over all measured samples (mean +- std over seeds);
* ``auroc_over_training.png``: the conflict score's AUROC against the misaligned labels over
  training, per method (mean +- std over seeds), one panel per misalignment rate > 0, chance 0.5.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .aggregate import METRIC_BY_ID, PRIMARY
from .grid import BASELINE, METHODS

__all__ = ["make_figures"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, folder: str, name: str, written: list[str]) -> None:
    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    written.append(path)


def cosine_distributions(res: dict[str, Any], folder: str, written: list[str]) -> None:
    runs = [r for r in res["runs"] if r["method"] == BASELINE and r["histograms"] and r["status"] == "completed"
            and not r.get("measure_param_every")]
    rates = sorted({float(r["misalignment"]) for r in runs if float(r["misalignment"]) > 0})
    if not rates:
        return
    plt = _plt()
    phases = ("first", "middle", "last")
    fig, axes = plt.subplots(len(phases), len(rates), figsize=(4.2 * len(rates), 2.6 * len(phases)), squeeze=False)
    for j, rate in enumerate(rates):
        group = [r for r in runs if float(r["misalignment"]) == rate]
        for i, phase in enumerate(phases):
            ax = axes[i][j]
            al, ms, steps = None, None, []
            for r in group:
                h = r["histograms"]
                pick = h[{"first": 0, "middle": len(h) // 2, "last": len(h) - 1}[phase]]
                a, m = np.asarray(pick["aligned"], float), np.asarray(pick["misaligned"], float)
                al, ms = (a, m) if al is None else (al + a, ms + m)
                steps.append(pick["step"])
            edges = np.linspace(-1, 1, len(al) + 1)
            for counts, lab, col in ((al, "aligned", "tab:blue"), (ms, "misaligned", "tab:red")):
                dens = counts / max(counts.sum(), 1) / np.diff(edges)
                ax.stairs(dens, edges, label=f"{lab} (n={int(counts.sum())})", color=col, fill=False, linewidth=1.5)
            ax.axvline(0.0, color="k", linestyle=":", linewidth=1, label="cos = 0")
            ax.set(xlabel="per-sample cos(g_va, g_vt)", ylabel="density",
                   title=f"misalignment {rate:g}, {phase} window (step ~{np.mean(steps):.0f})")
            ax.legend(fontsize=7)
    fig.suptitle(f"{METHODS[BASELINE].label}: gradient cosine, aligned vs misaligned triplets (seeds pooled)",
                 fontsize=10)
    _save(fig, folder, "cosine_distributions.png", written)


def cosine_by_method(res: dict[str, Any], folder: str, written: list[str]) -> None:
    """Last-window cosine distributions, aligned vs misaligned, one column per method, one row per rate > 0."""
    runs = [r for r in res["runs"] if r["histograms"] and r["status"] == "completed" and r["method"] in res["methods"]
            and not r.get("measure_param_every")]
    rates = sorted({float(r["misalignment"]) for r in runs if float(r["misalignment"]) > 0})
    methods = [m for m in res["methods"] if any(r["method"] == m for r in runs)]
    if not rates or not methods:
        return
    plt = _plt()
    fig, axes = plt.subplots(len(rates), len(methods), figsize=(3.2 * len(methods), 2.5 * len(rates)),
                             squeeze=False, sharex=True)
    for i, rate in enumerate(rates):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            group = [r for r in runs if r["method"] == m and float(r["misalignment"]) == rate]
            if not group:
                ax.axis("off")
                continue
            al = sum(np.asarray(r["histograms"][-1]["aligned"], float) for r in group)
            ms = sum(np.asarray(r["histograms"][-1]["misaligned"], float) for r in group)
            edges = np.linspace(-1, 1, len(al) + 1)
            for counts, lab, col in ((al, "aligned", "tab:blue"), (ms, "misaligned", "tab:red")):
                neg = counts[: len(counts) // 2].sum() / max(counts.sum(), 1)
                dens = counts / max(counts.sum(), 1) / np.diff(edges)
                ax.stairs(dens, edges, label=f"{lab} ({100 * neg:.0f}% < 0)", color=col, linewidth=1.3)
            ax.axvline(0.0, color="k", linestyle=":", linewidth=1)
            ax.set_title(f"{m}, misalignment {rate:g}", fontsize=8)
            ax.legend(fontsize=6)
            if i == len(rates) - 1:
                ax.set_xlabel("per-sample cos(g_va, g_vt)", fontsize=8)
    fig.suptitle("gradient cosine in the last training window, aligned vs misaligned, per method (seeds pooled)",
                 fontsize=9)
    _save(fig, folder, "cosine_by_method.png", written)


def metrics_vs_misalignment(res: dict[str, Any], folder: str, written: list[str]) -> None:
    metrics = [m for m in PRIMARY if any(math.isfinite(c[m]["mean"]) for c in res["cells"])]
    if not metrics:
        return
    plt = _plt()
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    offsets = np.linspace(-0.012, 0.012, max(1, len(res["methods"])))
    for idx, mid in enumerate(metrics):
        ax = axes[idx // cols][idx % cols]
        chance = []
        for off, m in zip(offsets, res["methods"]):
            cells = sorted((c for c in res["cells"] if c["method"] == m), key=lambda c: c["misalignment"])
            x = np.array([c["misalignment"] for c in cells]) + off
            y = np.array([c[mid]["mean"] for c in cells])
            e = np.nan_to_num(np.array([c[mid]["std"] for c in cells]))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=METHODS[m].label)
            chance += [c[mid]["chance"] for c in cells if math.isfinite(c[mid]["chance"])]
        if chance:
            ax.axhline(float(np.mean(chance)), color="gray", linestyle="--", linewidth=1, label="chance")
        within = [c[mid]["chance_within_class"] for c in res["cells"]
                  if math.isfinite(c[mid].get("chance_within_class", float("nan")))]
        if within:
            ax.axhline(float(np.mean(within)), color="gray", linestyle=":", linewidth=1, label="within-class chance")
        ax.set(xlabel="misalignment rate (training triplets)", ylabel=mid, title=METRIC_BY_ID[mid].label)
    for idx in range(len(metrics), rows * cols):
        axes[idx // cols][idx % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("held-out metrics vs misalignment (mean +- std over seeds)", fontsize=10)
    _save(fig, folder, "metrics_vs_misalignment.png", written)


def auroc_over_training(res: dict[str, Any], folder: str, written: list[str]) -> None:
    rates = [r for r in res["rates"] if r > 0]
    if not any(c["auroc_series"] for c in res["cells"]) or not rates:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, len(rates), figsize=(4.6 * len(rates), 3.4), squeeze=False)
    for j, rate in enumerate(rates):
        ax = axes[0][j]
        for m in res["methods"]:
            c = next((c for c in res["cells"] if c["method"] == m and c["misalignment"] == rate), None)
            if c is None or not c["auroc_series"]:
                continue
            s = c["auroc_series"]
            x = np.array([p["step"] for p in s])
            y = np.array([p["mean"] for p in s])
            e = np.nan_to_num(np.array([p["std"] for p in s]))
            ax.plot(x, y, marker="o", label=METHODS[m].label)
            ax.fill_between(x, y - e, y + e, alpha=0.15)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance (0.5)")
        ax.set(xlabel="training step", ylabel="AUROC of -cos vs misaligned", ylim=(0.0, 1.02),
               title=f"misalignment {rate:g}")
        ax.legend(fontsize=7)
    fig.suptitle("does the conflict score find the noise? (mean +- std over seeds)", fontsize=10)
    _save(fig, folder, "auroc_over_training.png", written)


def feature_vs_parameter(res: dict[str, Any], folder: str, written: list[str]) -> None:
    cells = res.get("level_cells") or []
    runs = [r for r in res["runs"] if r.get("measure_param_every") and r.get("levels", {}).get("scatter")]
    if not cells or not runs:
        return
    plt = _plt()
    methods = [m for m in METHODS if any(c["method"] == m for c in cells)]
    rates = sorted({c["misalignment"] for c in cells})
    fig, axes = plt.subplots(len(methods), len(rates), figsize=(3.6 * len(rates), 3.4 * len(methods)),
                             squeeze=False)
    for i, m in enumerate(methods):
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            c = next((c for c in cells if c["method"] == m and c["misalignment"] == rate), None)
            group = [r for r in runs if r["method"] == m and float(r["misalignment"]) == rate]
            if c is None or not group:
                ax.axis("off")
                continue
            pts = np.concatenate([np.asarray(r["levels"]["scatter"], float) for r in group])
            for flag, lab, col in ((0, "aligned", "tab:blue"), (1, "misaligned", "tab:red")):
                sel = pts[:, 2] == flag
                if sel.any():
                    ax.scatter(pts[sel, 0], pts[sel, 1], s=3, alpha=0.35, color=col, label=lab, rasterized=True)
            ax.axhline(0.0, color="k", linestyle=":", linewidth=0.8)
            ax.axvline(0.0, color="k", linestyle=":", linewidth=0.8)
            sp = c["spearman_all"]
            sd = f" +- {sp['std']:.2f}" if math.isfinite(sp["std"]) else ""
            ax.set(xlim=(-1, 1), ylim=(-1, 1), xlabel="feature-level cos", ylabel="parameter-level cos",
                   title=f"{m}, misalignment {rate:g}: Spearman {sp['mean']:.2f}{sd}")
            ax.title.set_fontsize(8)
            ax.legend(fontsize=6, markerscale=3)
    fig.suptitle("per-sample cos(g_va, g_vt), parameter vs feature level (seeds pooled)",
                 fontsize=9)
    _save(fig, folder, "feature_vs_parameter.png", written)


def make_figures(res: dict[str, Any], folder: str) -> list[str]:
    """Write the figures that the results allow into ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    written: list[str] = []
    cosine_distributions(res, folder, written)
    cosine_by_method(res, folder, written)
    metrics_vs_misalignment(res, folder, written)
    auroc_over_training(res, folder, written)
    feature_vs_parameter(res, folder, written)
    return written
