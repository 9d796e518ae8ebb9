"""Run folders -> raw results: per-run values, per-cell mean and standard deviation over seeds, verdicts.

Reads each run folder's ``config.json``, ``summary.json``, ``metrics.jsonl`` and ``study_run.json``.
Metric names are looked up through lists of candidate keys (:data:`METRICS`); a metric none of whose
keys is present is recorded as missing with the keys that were tried, never silently dropped.

Conflict-score measurements (claims 1 and 3) come from the best source a run has:

1. per-sample cosines with the ground-truth ``misaligned`` flag (``per_sample``): a JSONL or NPZ file
   in the run folder whose name contains ``sample`` or ``cosine``, or list-valued keys in the
   metrics records (see :func:`load_per_sample`); gives AUROC, precision at the kept fraction,
   negative-cosine fractions per group and, where a parameter-level cosine is present too, the
   Spearman rank correlation between the levels;
2. histograms of the cosine split by group in the metrics records (``group_histograms``: a key
   with ``hist`` and ``misaligned`` in its name and its partner with ``aligned``, bins evenly over
   [-1, 1]), pooled into at most :data:`N_WINDOWS` windows: AUROC (ties within a bin count half),
   precision at the kept fraction (the bin at the cut kept in proportion) and negative fractions;
3. the trainer's own ``eval/auroc_conflict`` at evaluation steps (``trainer_auroc``): AUROC only.
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .grid import BASELINE, METHODS

__all__ = ["Metric", "METRICS", "PRIMARY", "FIRST_FIELDS", "collect", "spearman", "auroc", "precision_at_kept", "verdict",
           "mean_std", "load_per_sample", "compare_levels", "level_cells", "LEVEL_FIELDS"]

KEPT_FRACTION = 0.5  # precision of the score at this kept fraction (the default curriculum's start)
SCATTER_POINTS = 600  # per-sample (feature, parameter) cosine pairs per run kept for the figure
N_WINDOWS = 8  # per-sample scores are grouped into this many windows over training


@dataclass(frozen=True)
class Metric:
    """A reported metric: candidate keys in eval records / summary.json, candidate chance-level keys."""

    id: str
    label: str
    keys: tuple[str, ...]
    chance_keys: tuple[str, ...] = ()
    k: Optional[int] = None  # R@k: chance k / N when no chance key is logged
    within_class_keys: tuple[str, ...] = ()  # chance of a ranking perfect at class level, random within


def _retrieval(direction: str, what: str, k: Optional[int], label: str) -> Metric:
    name = f"{direction}_{what}"
    return Metric(name, label,
                  keys=(f"eval/{name}", f"eval/retrieval/{name}", f"eval/instance/{name}"),
                  chance_keys=(f"eval/chance/{name}", f"eval/{name}_chance", f"eval/chance_{name}"), k=k,
                  within_class_keys=(f"eval/chance_within_class/{name}", f"eval/{name}_chance_within_class"))


DIRS = {"v2t": "video->text", "t2v": "text->video", "v2a": "video->audio", "a2v": "audio->video"}
METRICS: tuple[Metric, ...] = tuple(
    [_retrieval(d, f"R@{k}", k, f"{lab} R@{k} (instance)") for d, lab in DIRS.items() for k in (1, 10)]
    + [_retrieval(d, "class_R@1", None, f"{lab} class-level R@1") for d, lab in DIRS.items()]
    + [Metric("probe_acc", "linear-probe accuracy", ("eval/probe_acc", "eval/probe/acc", "eval/linear_probe_acc"),
              ("eval/chance/probe_acc", "eval/probe_acc_chance"))])
METRIC_BY_ID = {m.id: m for m in METRICS}
# the metrics on which "does a method help" is judged (instance level both directions, class level, probe)
PRIMARY = ("v2t_R@10", "t2v_R@10", "v2a_R@10", "a2v_R@10", "v2t_class_R@1", "probe_acc")
CONFLICT_FIELDS = ("auroc", "precision_at_kept", "precision_chance", "frac_neg_aligned", "frac_neg_misaligned",
                   "spearman_feature_param", "auroc_pass", "frac_dropped_aligned", "frac_dropped_misaligned")
# fields also reported for the first training window (``<field>_first``)
FIRST_FIELDS = ("auroc", "frac_neg_aligned", "frac_neg_misaligned", "frac_dropped_aligned", "frac_dropped_misaligned")
# AUROC of the score from the trainer's eval pass (frozen model, no DropToken, same measurement for every method)
PASS_KEYS = ("eval/auroc_conflict_pass", "eval/conflict/auroc_pass")

# aliases of per-sample columns
STEP_KEYS = ("step", "steps")
MIS_KEYS = ("misaligned", "is_misaligned", "noisy", "label_misaligned")
COS_KEYS = ("cos", "cosine", "cos_feature", "score", "feature_cos", "cos_va_vt")
PARAM_KEYS = ("cos_param", "cos_parameter", "parameter_cos", "param_cos", "score_param")
WEIGHT_KEYS = ("weight", "curriculum_weight", "curriculum_weights")  # 0 = dropped by the curriculum


# ------------------------------------------------------------------ statistics


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof=1; NaN for one value), n) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), int(len(v))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or xs[end] != xs[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when undefined."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman: shapes differ, {a.shape} and {b.shape}")
    sel = np.isfinite(a) & np.isfinite(b)
    if sel.sum() < 3:
        return float("nan")
    ra, rb = _ranks(a[sel]), _ranks(b[sel])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def auroc(cos: np.ndarray, misaligned: np.ndarray) -> float:
    """ROC AUC of ``-cos`` (low cosine = flagged noisy) for ``misaligned == 1``; NaN when one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(misaligned)
    sel = np.isfinite(cos) & (y >= 0)
    if sel.sum() < 2 or y[sel].min() == y[sel].max():
        return float("nan")
    return float(roc_auc_score(y[sel], -np.asarray(cos)[sel]))


def precision_at_kept(cos: np.ndarray, misaligned: np.ndarray, kept: float = KEPT_FRACTION) -> tuple[float, float]:
    """(share of aligned triplets among the ``kept`` fraction with the highest cosine, share overall = chance)."""
    cos, y = np.asarray(cos, dtype=np.float64), np.asarray(misaligned)
    sel = np.isfinite(cos) & (y >= 0)
    cos, y = cos[sel], y[sel]
    if len(cos) == 0:
        return float("nan"), float("nan")
    n_keep = max(1, int(math.ceil(kept * len(cos))))
    top = np.argsort(-cos, kind="mergesort")[:n_keep]
    return float((y[top] == 0).mean()), float((y == 0).mean())


def auroc_from_histograms(h_al: np.ndarray, h_mis: np.ndarray) -> float:
    """AUROC of -cos from binned cosine counts of the aligned and misaligned groups (same bins, ascending)."""
    a, m = np.asarray(h_al, dtype=np.float64), np.asarray(h_mis, dtype=np.float64)
    if a.sum() <= 0 or m.sum() <= 0:
        return float("nan")
    a, m = a / a.sum(), m / m.sum()
    above = np.cumsum(a[::-1])[::-1] - a  # aligned mass in higher bins
    return float((m * (above + 0.5 * a)).sum())


def precision_at_kept_from_histograms(h_al: np.ndarray, h_mis: np.ndarray,
                                      kept: float = KEPT_FRACTION) -> tuple[float, float]:
    """:func:`precision_at_kept` from binned counts (ascending bins): the top bins are kept whole, the
    bin at the cut in proportion (its aligned share applies to the part kept)."""
    a, m = np.asarray(h_al, dtype=np.float64)[::-1], np.asarray(h_mis, dtype=np.float64)[::-1]
    n = a.sum() + m.sum()
    if n <= 0:
        return float("nan"), float("nan")
    need, got, aligned = kept * n, 0.0, 0.0
    for ai, mi in zip(a, m):
        if got >= need:
            break
        if ai + mi <= 0:
            continue
        take = min(ai + mi, need - got)
        aligned += take * ai / (ai + mi)
        got += take
    return float(aligned / got), float(a.sum() / n)


def verdict(delta: float, spread: float, n: int, expect_positive: bool = True) -> str:
    """'held' / 'did not hold' / 'within noise' / 'not measured' / 'one seed (no spread)'.

    ``delta`` is the measured effect in the claim's direction-sensitive units; ``spread`` the seed
    standard deviation it is compared with. An effect no larger than the spread is 'within noise'.
    """
    if not math.isfinite(delta):
        return "not measured"
    if n < 2 or not math.isfinite(spread):
        return "one seed (no spread)"
    if abs(delta) <= spread:
        return "within noise"
    return "held" if (delta > 0) == expect_positive else "did not hold"


# ------------------------------------------------------------------ reading runs


def _read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of a metrics.jsonl; unparseable lines are skipped and reported."""
    recs, problems = [], []
    if not os.path.exists(path):
        return recs, [f"{path}: missing"]
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, ln in enumerate(f, 1):
            if not ln.strip():
                continue
            try:
                recs.append(json.loads(ln))
            except ValueError:
                problems.append(f"{path}:{i}: unparseable line skipped")
    return recs, problems


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> tuple[Optional[float], Optional[str]]:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v), k
    return None, None


def _find_list(d: dict[str, Any], aliases: tuple[str, ...]) -> Optional[list[Any]]:
    for key, v in d.items():
        if isinstance(v, list) and key.rsplit("/", 1)[-1] in aliases:
            return v
    return None


def load_per_sample(folder: str, records: list[dict[str, Any]]) -> tuple[Optional[dict[str, np.ndarray]], str]:
    """Per-sample training cosines with their misaligned flag: ({step, misaligned, cos[, cos_param]}, source).

    Looks for (in order) ``*sample*``/``*cosine*`` ``.jsonl`` or ``.npz`` files in ``folder`` (one row
    per sample, or one row per step with list values), then list-valued keys in ``records``. Columns
    are matched by the aliases in :data:`STEP_KEYS`, :data:`MIS_KEYS`, :data:`COS_KEYS`,
    :data:`PARAM_KEYS`. Returns (None, what was looked for) when nothing is found.
    """
    rows: dict[str, list[Any]] = {"step": [], "misaligned": [], "cos": [], "cos_param": [], "weight": []}

    def add(rec: dict[str, Any], step_default: Any = None) -> None:
        mis = _find_list(rec, MIS_KEYS)
        cos = _find_list(rec, COS_KEYS)
        if mis is not None and cos is not None and len(mis) == len(cos):
            step = rec.get("step", step_default)
            par = _find_list(rec, PARAM_KEYS)
            rows["step"] += [step] * len(cos)
            rows["misaligned"] += mis
            rows["cos"] += cos
            rows["cos_param"] += par if par is not None and len(par) == len(cos) else [float("nan")] * len(cos)
            w = _find_list(rec, WEIGHT_KEYS)
            rows["weight"] += w if w is not None and len(w) == len(cos) else [float("nan")] * len(cos)
            return
        scalar_mis, _ = _first(rec, MIS_KEYS)
        scalar_cos, _ = _first(rec, COS_KEYS)
        if scalar_mis is not None and scalar_cos is not None and "step" in rec:
            par, _ = _first(rec, PARAM_KEYS)
            rows["step"].append(rec["step"])
            rows["misaligned"].append(scalar_mis)
            rows["cos"].append(scalar_cos)
            rows["cos_param"].append(float("nan") if par is None else par)
            w, _ = _first(rec, WEIGHT_KEYS)
            rows["weight"].append(float("nan") if w is None else w)

    files = sorted(set(glob.glob(os.path.join(folder, "*sample*")) + glob.glob(os.path.join(folder, "*cosine*"))))
    source = ""
    for path in files:
        if path.endswith(".jsonl"):
            recs, _ = read_metrics(path)
            for r in recs:
                add(r)
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                add({k: z[k].tolist() for k in z.files})
        if rows["cos"]:
            source = os.path.basename(path)
            break
    if not rows["cos"]:
        for r in records:
            add(r)
        source = "metrics.jsonl per-sample lists" if rows["cos"] else ""
    if not rows["cos"]:
        return None, (f"no per-sample cosines: no *sample*/*cosine* .jsonl/.npz file in {folder} and no list-valued "
                      f"keys named one of {MIS_KEYS} with one of {COS_KEYS} in metrics.jsonl")
    out = {k: np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64) for k, vals in rows.items()}
    for k in ("cos_param", "weight"):
        if not np.isfinite(out[k]).any():
            del out[k]
    return out, source


def _group_histograms(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """[{step, aligned, misaligned}] histogram pairs from the records, and the key used ('' if none)."""
    out, used = [], ""
    for r in records:
        for key, v in r.items():
            if "hist" in key and "misaligned" in key and isinstance(v, list):
                partner = key.replace("misaligned", "aligned")
                if isinstance(r.get(partner), list) and len(r[partner]) == len(v) and "step" in r:
                    out.append({"step": r["step"], "aligned": np.asarray(r[partner], dtype=np.float64),
                                "misaligned": np.asarray(v, dtype=np.float64)})
                    used = key
                    break
    return out, used


def _windows(steps: np.ndarray, n: int) -> list[np.ndarray]:
    """Boolean masks splitting the distinct steps into ``n`` consecutive windows."""
    uniq = np.unique(steps[np.isfinite(steps)])
    if len(uniq) == 0:
        return []
    groups = np.array_split(uniq, min(n, len(uniq)))
    return [np.isin(steps, g) for g in groups if len(g)]


def _frac_neg(x: np.ndarray) -> float:
    """Share of negative values (NaN for no value)."""
    return float((x < 0).mean()) if len(x) else float("nan")


LEVEL_FIELDS = ("spearman_all", "spearman_aligned", "spearman_misaligned", "sign_agreement",
                "frac_neg_aligned_feature", "frac_neg_misaligned_feature", "frac_neg_aligned_param",
                "frac_neg_misaligned_param", "frac_neg_aligned_feature_all", "frac_neg_misaligned_feature_all",
                "frac_neg_aligned_param_all", "frac_neg_misaligned_param_all")


def compare_levels(samples: dict[str, np.ndarray]) -> dict[str, Any]:
    """Feature- vs parameter-level per-sample cosines on the steps where both were measured.

    Over every measured sample of the run (``*_all`` and the Spearman/sign fields) and over the last of
    :data:`N_WINDOWS` windows of the measured steps (the negative fractions without suffix, next to the
    feature-level table of the last training window): Spearman rank correlation overall and within the
    aligned and the misaligned triplets, the share of samples whose two cosines have the same sign, and the
    negative-cosine fraction of each group at each level. Also the per-window Spearman series.
    """
    sel = np.isfinite(samples["cos_param"]) & np.isfinite(samples["cos"])
    f, p = samples["cos"][sel], samples["cos_param"][sel]
    mis, step = samples["misaligned"][sel], samples["step"][sel]
    out: dict[str, Any] = {"n_measured": int(sel.sum()), "n_steps": int(len(np.unique(step)))}
    out["spearman_all"] = spearman(f, p)
    out["spearman_aligned"] = spearman(f[mis == 0], p[mis == 0])
    out["spearman_misaligned"] = spearman(f[mis == 1], p[mis == 1])
    out["sign_agreement"] = float(((f < 0) == (p < 0)).mean()) if len(f) else float("nan")
    for lev, x in (("feature", f), ("param", p)):
        out[f"frac_neg_aligned_{lev}_all"] = _frac_neg(x[mis == 0])
        out[f"frac_neg_misaligned_{lev}_all"] = _frac_neg(x[mis == 1])
    windows = _windows(step, N_WINDOWS)
    last = windows[-1] if windows else np.zeros(len(step), dtype=bool)
    for lev, x in (("feature", f), ("param", p)):
        out[f"frac_neg_aligned_{lev}"] = _frac_neg(x[last & (mis == 0)])
        out[f"frac_neg_misaligned_{lev}"] = _frac_neg(x[last & (mis == 1)])
    keep = np.random.default_rng(0).permutation(len(f))[:SCATTER_POINTS]  # for the figure only
    out["scatter"] = np.stack([f[keep], p[keep], mis[keep]], axis=1).round(4).tolist()
    out["series"] = [{"step": float(step[w].max()), "spearman": spearman(f[w], p[w]),
                      "spearman_aligned": spearman(f[w & (mis == 0)], p[w & (mis == 0)]),
                      "spearman_misaligned": spearman(f[w & (mis == 1)], p[w & (mis == 1)])} for w in windows]
    return out


def conflict_series(folder: str, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """Conflict-score measurements over training, the source used, and extras (histograms, Spearman)."""
    samples, why = load_per_sample(folder, records)
    extras: dict[str, Any] = {"per_sample_missing": why if samples is None else ""}
    if samples is not None:
        series = []
        edges = np.linspace(-1, 1, 41)
        hists = []
        for mask in _windows(samples["step"], N_WINDOWS):
            cos, mis = samples["cos"][mask], samples["misaligned"][mask]
            prec, chance = precision_at_kept(cos, mis)
            al, ms = cos[mis == 0], cos[mis == 1]
            row = {"step": float(np.nanmax(samples["step"][mask])), "auroc": auroc(cos, mis),
                   "precision_at_kept": prec, "precision_chance": chance,
                   "frac_neg_aligned": float((al < 0).mean()) if len(al) else float("nan"),
                   "frac_neg_misaligned": float((ms < 0).mean()) if len(ms) else float("nan"),
                   "n_aligned": int(len(al)), "n_misaligned": int(len(ms))}
            if "weight" in samples:  # share of each group the curriculum dropped (weight 0) in this window
                w = samples["weight"][mask]
                row["frac_dropped_aligned"] = float((w[mis == 0] <= 0).mean()) if len(al) else float("nan")
                row["frac_dropped_misaligned"] = float((w[mis == 1] <= 0).mean()) if len(ms) else float("nan")
            if "cos_param" in samples:  # on the measured steps of the window only
                cp = samples["cos_param"][mask]
                row["spearman_feature_param"] = spearman(cos, cp)
                row["frac_neg_aligned_param"] = _frac_neg(cp[(mis == 0) & np.isfinite(cp)])
                row["frac_neg_misaligned_param"] = _frac_neg(cp[(mis == 1) & np.isfinite(cp)])
            series.append(row)
            hists.append({"step": row["step"], "aligned": np.histogram(al, edges)[0].tolist(),
                          "misaligned": np.histogram(ms, edges)[0].tolist()})
        extras["histograms"] = hists
        if "cos_param" in samples:
            extras["spearman_feature_param"] = spearman(samples["cos"], samples["cos_param"])
            extras["levels"] = compare_levels(samples)
        return series, f"per_sample ({why})", extras
    hist, key = _group_histograms(records)
    if hist:  # pool consecutive logging intervals into at most N_WINDOWS windows
        chunks = np.array_split(np.arange(len(hist)), min(N_WINDOWS, len(hist)))
        hist = [{"step": hist[c[-1]]["step"], "aligned": sum(hist[i]["aligned"] for i in c),
                 "misaligned": sum(hist[i]["misaligned"] for i in c)} for c in chunks if len(c)]
        series = []
        for h in hist:
            nb = len(h["aligned"])
            neg = slice(0, nb // 2)  # bins evenly over [-1, 1]: the lower half is cos < 0
            a, m = h["aligned"], h["misaligned"]
            prec, chance = precision_at_kept_from_histograms(a, m)
            series.append({"step": float(h["step"]), "auroc": auroc_from_histograms(a, m),
                           "precision_at_kept": prec, "precision_chance": chance,
                           "frac_neg_aligned": float(a[neg].sum() / a.sum()) if a.sum() else float("nan"),
                           "frac_neg_misaligned": float(m[neg].sum() / m.sum()) if m.sum() else float("nan"),
                           "n_aligned": int(a.sum()), "n_misaligned": int(m.sum())})
        extras["histograms"] = [{"step": h["step"], "aligned": h["aligned"].tolist(),
                                 "misaligned": h["misaligned"].tolist()} for h in hist]
        return series, f"group_histograms ({key})", extras
    series = [{"step": float(r["step"]), "auroc": float(r["eval/auroc_conflict"])}
              for r in records if isinstance(r.get("eval/auroc_conflict"), (int, float)) and "step" in r]
    return series, ("trainer_auroc (eval/auroc_conflict)" if series else "none"), extras


def read_run(folder: str) -> dict[str, Any]:
    """One run folder -> its record (values, series, missing-key messages)."""
    missing: list[str] = []
    study = _read_json(os.path.join(folder, "study_run.json")) or {}
    cfg = _read_json(os.path.join(folder, "config.json")) or {}
    summary = _read_json(os.path.join(folder, "summary.json"))
    records, problems = read_metrics(os.path.join(folder, "metrics.jsonl"))
    missing += problems
    if summary is None:
        missing.append(f"{folder}/summary.json: missing or unreadable (run not finished?)")
        summary = {}
    method = study.get("method") or _infer_method(cfg)
    run: dict[str, Any] = {
        "name": os.path.basename(folder), "folder": folder, "method": method,
        "seed": study.get("seed", cfg.get("train", {}).get("seed")),
        "misalignment": study.get("misalignment", cfg.get("data", {}).get("misaligned_fraction")),
        "status": summary.get("status", "missing"), "steps": summary.get("step"),
        "steps_planned": cfg.get("train", {}).get("steps"),
        "wall_s": study.get("wall_s", float("nan")), "train_time_s": summary.get("train_time_s", float("nan")),
        "final": {}, "chance": {}, "keys_used": {},
        "eval_data": summary.get("eval_data"),  # the trainer's description of its evaluation split
        "jobs": (study.get("sessions") or [{}])[-1].get("jobs"),  # runs side by side in its last session
    }
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    last_eval = evals[-1] if evals else {}
    for m in METRICS:
        v, key = _first(summary, m.keys)
        if v is None:
            v, key = _first(last_eval, m.keys)
        if v is None:
            present = sorted(k for k in {**summary, **last_eval} if k.startswith("eval/"))
            missing.append(f"metric {m.id!r}: none of {list(m.keys)} in summary.json or the last eval record "
                           f"(eval keys present: {', '.join(present[:12])}{' ...' if len(present) > 12 else ''})")
            continue
        run["final"][m.id], run["keys_used"][m.id] = v, key
        c, _ = _first({**last_eval, **summary}, m.chance_keys)
        if c is None and m.k is not None:
            n, _ = _first({**last_eval, **summary}, ("eval/num_clips", "eval/n_clips"))
            c = min(1.0, m.k / n) if n else None
        if c is not None:
            run["chance"][m.id] = c
        w, _ = _first({**last_eval, **summary}, m.within_class_keys)
        if w is not None:
            run.setdefault("chance_within_class", {})[m.id] = w
    ap, _ = _first(summary, PASS_KEYS)
    if ap is None:
        ap, _ = _first(last_eval, PASS_KEYS)
    run["auroc_pass"] = float("nan") if ap is None else ap
    run["eval_series"] = [{"step": r.get("step"), **{m.id: _first(r, m.keys)[0] for m in METRICS}} for r in evals]
    series, source, extras = conflict_series(folder, records)
    run["conflict_series"], run["conflict_source"] = series, source
    run["histograms"] = extras.get("histograms", [])
    run["spearman_feature_param"] = extras.get("spearman_feature_param", float("nan"))
    run["levels"] = extras.get("levels", {})
    # runs that also measured the parameter-level cosines (claim 1) are kept out of the other claims' cells
    run["measure_param_every"] = int(cfg.get("harmony", {}).get("measure_param_every") or 0)
    if extras.get("per_sample_missing"):
        missing.append(extras["per_sample_missing"])
    if source.startswith("per_sample") and run["measure_param_every"] and not math.isfinite(run["spearman_feature_param"]):
        missing.append("parameter-level per-sample cosine: no column named one of "
                       f"{PARAM_KEYS} beside the feature-level cosine (Spearman between levels not measured)")
    run["missing"] = missing
    return run


def _infer_method(cfg: dict[str, Any]) -> Optional[str]:
    h = cfg.get("harmony", {})
    for m in METHODS.values():
        if all(str(h.get(k.split(".", 1)[1])) == v for k, v in m.options.items()):
            return m.id
    return None


# ------------------------------------------------------------------ cells


def _final_conflict(run: dict[str, Any]) -> dict[str, float]:
    """The last window's conflict values, plus the first window's :data:`FIRST_FIELDS` (``<field>_first``)."""
    s = run["conflict_series"]
    out = {f: float("nan") for f in CONFLICT_FIELDS}
    out.update({f"{f}_first": float("nan") for f in FIRST_FIELDS})
    if s:
        out.update({f: float(s[-1].get(f, float("nan"))) for f in CONFLICT_FIELDS})
        out.update({f"{f}_first": float(s[0].get(f, float("nan"))) for f in FIRST_FIELDS})
    out["auroc_pass"] = run.get("auroc_pass", float("nan"))
    if math.isfinite(run.get("spearman_feature_param", float("nan"))):
        out["spearman_feature_param"] = run["spearman_feature_param"]
    return out


def collect(root: str) -> dict[str, Any]:
    """Every run folder under ``root`` -> {"runs", "cells", "conflict_cells", "verdicts", "missing"}."""
    folders = sorted(p for p in glob.glob(os.path.join(root, "*")) if os.path.isdir(p)
                     and any(os.path.exists(os.path.join(p, f)) for f in ("study_run.json", "config.json")))
    runs = [read_run(f) for f in folders]
    for r in runs:
        r["conflict_final"] = _final_conflict(r)
    done = [r for r in runs if r["status"] == "completed" and r["method"] is not None]
    # one run length per report: runs of another --steps in the same folder are listed, not pooled
    lengths = Counter(r["steps_planned"] for r in done)
    steps = lengths.most_common(1)[0][0] if lengths else None
    excluded = [r["name"] for r in done if r["steps_planned"] != steps]
    done = [r for r in done if r["steps_planned"] == steps]
    # the parameter-level measurement leaves the update unchanged, but a measured run repeats a seed of the plain
    # grid: pooled, it would count that seed twice. Measured runs only feed the feature-vs-parameter tables.
    measured = [r for r in done if r["measure_param_every"]]
    done = [r for r in done if not r["measure_param_every"]]
    methods = [m for m in METHODS if any(r["method"] == m for r in done)]
    rates = sorted({float(r["misalignment"]) for r in done})
    cells: list[dict[str, Any]] = []
    for m in methods:
        for rate in rates:
            group = [r for r in done if r["method"] == m and float(r["misalignment"]) == rate]
            if not group:
                continue
            cell: dict[str, Any] = {"method": m, "misalignment": rate, "n_runs": len(group),
                                    "seeds": sorted(r["seed"] for r in group)}
            for key in ("steps", "wall_s", "train_time_s"):
                cell[key] = dict(zip(("mean", "std", "n"), mean_std([r[key] for r in group if r[key] is not None])))
            for metric in METRICS:
                vals = [r["final"].get(metric.id) for r in group if metric.id in r["final"]]
                cell[metric.id] = dict(zip(("mean", "std", "n"), mean_std(vals)))
                ch = [r["chance"][metric.id] for r in group if metric.id in r["chance"]]
                cell[metric.id]["chance"] = float(np.mean(ch)) if ch else float("nan")
                wc = [r["chance_within_class"][metric.id] for r in group
                      if metric.id in r.get("chance_within_class", {})]
                cell[metric.id]["chance_within_class"] = float(np.mean(wc)) if wc else float("nan")
            for f in (*CONFLICT_FIELDS, *(f"{x}_first" for x in FIRST_FIELDS)):
                cell[f] = dict(zip(("mean", "std", "n"), mean_std([r["conflict_final"][f] for r in group])))
            cell["auroc_series"] = _mean_series(group, "auroc")
            cells.append(cell)
    missing = sorted({msg.replace(r["folder"], "<run>") for r in runs for msg in r["missing"]
                      if msg.startswith(("metric", "no per-sample", "parameter-level"))})
    if not measured:
        missing.append("parameter-level per-sample cosines: no finished run with harmony.measure_param_every > 0 "
                       "(run the conflicts claim)")
    return {"runs": runs, "cells": cells, "methods": methods, "rates": rates,
            "level_cells": level_cells(measured, done),
            "verdicts": verdicts(cells, methods, rates), "missing": missing,
            "failed": [{"name": r["name"], "status": r["status"]} for r in runs if r["status"] != "completed"],
            "excluded": excluded}


def level_cells(measured: list[dict[str, Any]], plain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method x misalignment rate over the measured runs' seeds: mean/std/n of :data:`LEVEL_FIELDS`,
    the per-window Spearman series, and the largest difference of any final metric from the unmeasured run
    of the same method, rate and seed (the measurement must leave training unchanged: 0 expected)."""
    cells = []
    for m in [m for m in METHODS if any(r["method"] == m for r in measured)]:
        for rate in sorted({float(r["misalignment"]) for r in measured if r["method"] == m}):
            group = [r for r in measured if r["method"] == m and float(r["misalignment"]) == rate and r["levels"]]
            if not group:
                continue
            cell: dict[str, Any] = {"method": m, "misalignment": rate, "n_runs": len(group),
                                    "seeds": sorted(r["seed"] for r in group),
                                    "measure_param_every": sorted({r["measure_param_every"] for r in group}),
                                    "n_measured": int(sum(r["levels"]["n_measured"] for r in group)),
                                    "spearman_per_run": [r["levels"]["spearman_all"] for r in group]}
            for f in LEVEL_FIELDS:
                cell[f] = dict(zip(("mean", "std", "n"), mean_std([r["levels"].get(f, float("nan")) for r in group])))
            cell["spearman_series"] = [
                {"step": float(np.mean([r["levels"]["series"][i]["step"] for r in group])),
                 **{k: dict(zip(("mean", "std", "n"), mean_std([r["levels"]["series"][i][k] for r in group])))
                    for k in ("spearman", "spearman_aligned", "spearman_misaligned")}}
                for i in range(min(len(r["levels"]["series"]) for r in group))]
            diffs = []
            for r in group:
                twin = next((p for p in plain if p["method"] == m and p["seed"] == r["seed"]
                             and float(p["misalignment"]) == rate), None)
                if twin is not None:
                    diffs += [abs(r["final"][k] - twin["final"][k]) for k in r["final"] if k in twin["final"]]
            cell["max_metric_diff_vs_unmeasured"] = max(diffs) if diffs else float("nan")
            cell["train_time_s"] = dict(zip(("mean", "std", "n"), mean_std([r["train_time_s"] for r in group])))
            cells.append(cell)
    return cells


def _mean_series(group: list[dict[str, Any]], field_: str) -> list[dict[str, float]]:
    """Mean and std over runs of a conflict-series field, aligned by window index."""
    series = [r["conflict_series"] for r in group if r["conflict_series"]]
    if not series:
        return []
    n = min(len(s) for s in series)
    out = []
    for i in range(n):
        m, s, k = mean_std([float(x[i].get(field_, float("nan"))) for x in series])
        out.append({"step": float(np.mean([x[i]["step"] for x in series])), "mean": m, "std": s, "n": k})
    return out


def _cell(cells: list[dict[str, Any]], m: str, rate: float) -> Optional[dict[str, Any]]:
    return next((c for c in cells if c["method"] == m and c["misalignment"] == rate), None)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, int]:
    """(a - b, the larger of the two seed standard deviations, the smaller n)."""
    spread = max(a["std"], b["std"]) if math.isfinite(a["std"]) and math.isfinite(b["std"]) else float("nan")
    return a["mean"] - b["mean"], spread, min(a["n"], b["n"])


def verdicts(cells: list[dict[str, Any]], methods: list[str], rates: list[float]) -> dict[str, list[dict[str, Any]]]:
    """Claim-by-claim comparisons derived from the cells (no conclusion is written anywhere else)."""
    out: dict[str, list[dict[str, Any]]] = {"conflicts": [], "methods": [], "score": [], "scaling": []}
    for m in methods:
        for rate in rates:
            c = _cell(cells, m, rate)
            if c is None:
                continue
            # 1. misaligned triplets conflict more often than aligned ones
            d, s, n = _diff(c["frac_neg_misaligned"], c["frac_neg_aligned"])
            out["conflicts"].append({"method": m, "misalignment": rate,
                                     "quantity": "frac_neg_misaligned - frac_neg_aligned",
                                     "delta": d, "spread": s, "n": n, "verdict": verdict(d, s, n)})
            # 3. the score ranks misaligned triplets below aligned ones: AUROC above chance (0.5)
            a = c["auroc"]
            out["score"].append({"method": m, "misalignment": rate, "quantity": "AUROC - 0.5",
                                 "delta": a["mean"] - 0.5, "spread": a["std"], "n": a["n"],
                                 "verdict": verdict(a["mean"] - 0.5, a["std"], a["n"])})
            # 2. each method vs plain VATT on the primary metrics
            base = _cell(cells, BASELINE, rate)
            if m != BASELINE and base is not None:
                for metric in PRIMARY:
                    d, s, n = _diff(c[metric], base[metric])
                    out["methods"].append({"method": m, "misalignment": rate, "metric": metric, "delta": d,
                                           "spread": s, "n": n, "verdict": verdict(d, s, n)})
    # 4. does the gain over plain VATT grow from the lowest to the highest misalignment rate?
    if len(rates) >= 2:
        lo, hi = rates[0], rates[-1]
        for m in methods:
            if m == BASELINE:
                continue
            for metric in PRIMARY:
                cells_ = [_cell(cells, x, r) for x in (m, BASELINE) for r in (lo, hi)]
                if any(c is None for c in cells_):
                    continue
                m_lo, b_lo, m_hi, b_hi = cells_[0], cells_[2], cells_[1], cells_[3]
                gap_lo = m_lo[metric]["mean"] - b_lo[metric]["mean"]
                gap_hi = m_hi[metric]["mean"] - b_hi[metric]["mean"]
                stds = [c[metric]["std"] for c in cells_]
                spread = max(stds) if all(math.isfinite(x) for x in stds) else float("nan")
                n = min(c[metric]["n"] for c in cells_)
                d = gap_hi - gap_lo
                out["scaling"].append({"method": m, "metric": metric, "rates": [lo, hi], "gap_low": gap_lo,
                                       "gap_high": gap_hi, "delta": d, "spread": spread, "n": n,
                                       "verdict": verdict(d, spread, n)})
    return out
