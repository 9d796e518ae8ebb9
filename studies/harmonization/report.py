"""Raw results (JSON + CSV) and ``RESULTS.md``, written from the aggregated results only.

Every statement of the form "held / did not hold / within noise" comes from
:func:`studies.harmonization.aggregate.verdict` applied to the numbers in the tables; nothing
here knows what the outcome is.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from typing import Any

import numpy as np

from .aggregate import CONFLICT_FIELDS, FIRST_FIELDS, KEPT_FRACTION, LEVEL_FIELDS, METRIC_BY_ID, METRICS, PRIMARY, verdict
from .grid import BASELINE, CLAIMS, METHODS

__all__ = ["write_raw", "write_report"]

CONFLICT_ALL = (*CONFLICT_FIELDS, *(f"{f}_first" for f in FIRST_FIELDS))


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_raw(res: dict[str, Any], meta: dict[str, Any], folder: str) -> dict[str, str]:
    """``results.json`` (everything), ``runs.csv`` (one row per run), ``cells.csv`` (one row per cell x metric)."""
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, f) for k, f in (("json", "results.json"), ("runs", "runs.csv"),
                                                        ("cells", "cells.csv"))}
    runs = [{k: ({kk: vv for kk, vv in v.items() if kk != "scatter"} if k == "levels" else v)
             for k, v in r.items() if k != "histograms"} for r in res["runs"]]
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(_clean({"meta": meta, **{k: v for k, v in res.items() if k != "runs"}, "runs": runs}), f, indent=1)
    with open(paths["runs"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        head = ["name", "method", "seed", "misalignment", "measure_param_every", "status", "steps", "wall_s",
                "train_time_s", "conflict_source"]
        w.writerow(head + [m.id for m in METRICS] + [f"conflict_{c}" for c in CONFLICT_ALL])
        for r in res["runs"]:
            w.writerow([r[k] for k in head] + [r["final"].get(m.id, "") for m in METRICS]
                       + [r["conflict_final"][c] for c in CONFLICT_ALL])
    with open(paths["cells"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "misalignment", "quantity", "mean", "std", "n", "chance", "chance_within_class"])
        for c in res["cells"]:
            for q in ("steps", "wall_s", "train_time_s", *[m.id for m in METRICS], *CONFLICT_ALL):
                v = c[q]
                w.writerow([c["method"], c["misalignment"], q, v["mean"], v["std"], v["n"], v.get("chance", ""),
                            v.get("chance_within_class", "")])
    paths["levels"] = os.path.join(folder, "levels.csv")
    with open(paths["levels"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "misalignment", "quantity", "mean", "std", "n"])
        for c in res.get("level_cells") or []:
            for q in LEVEL_FIELDS:
                w.writerow([c["method"], c["misalignment"], q, c[q]["mean"], c[q]["std"], c[q]["n"]])
    return paths


# ------------------------------------------------------------------ formatting


def _f(x: float, nd: int = 3) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _ms(v: dict[str, Any], nd: int = 3) -> str:
    if v["n"] == 0 or not math.isfinite(v["mean"]):
        return "—"
    sd = f" ± {v['std']:.{nd}f}" if math.isfinite(v["std"]) else ""
    return f"{v['mean']:.{nd}f}{sd} (n={v['n']})"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _cell(res: dict[str, Any], m: str, rate: float) -> Any:
    return next((c for c in res["cells"] if c["method"] == m and c["misalignment"] == rate), None)


def _tally(rows: list[dict[str, Any]]) -> str:
    c = Counter(r["verdict"] for r in rows)
    order = ("held", "did not hold", "within noise", "one seed (no spread)", "not measured")
    return ", ".join(f"{k}: {c[k]}" for k in order if c[k]) or "no comparisons"


def _rel(path: str, start: str) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


# ------------------------------------------------------------------ report


def write_report(res: dict[str, Any], meta: dict[str, Any], path: str, raw: dict[str, str], figures: list[str]) -> str:
    """Write ``RESULTS.md`` at ``path`` from ``res`` (see :func:`studies.harmonization.aggregate.collect`)."""
    here = os.path.dirname(os.path.abspath(path))
    fig = {os.path.basename(p): _rel(p, here) for p in figures}
    rates, methods = res["rates"], res["methods"]
    L: list[str] = ["# Results: what gradient harmonization does, measured", ""]
    if meta.get("profile") == "smoke":
        L += ["> **Smoke profile**: two training steps on seconds-sized shapes and one seed. These numbers prove "
              "that the study runs end to end; they measure nothing.", ""]
    L += [
        "The claims of *Scaling Multimodal Pre-Training via Cross-Modality Gradient Harmonization* (Wu et al., "
        "NeurIPS 2022), each as an experiment on this package's reference VATT trainer, on the embedded data "
        "(held-out evaluation). Every number below is computed by `studies/harmonization` from the run folders; "
        "the verdicts are derived from the numbers by one rule:",
        "",
        "* an effect is compared with the **seed spread**: the larger standard deviation over seeds of the cells "
        "compared (sample std, ddof = 1);",
        "* **within noise**: |effect| <= spread; **held**: the effect is larger than the spread in the direction the "
        "paper claims; **did not hold**: larger than the spread in the other direction; **one seed (no spread)**: "
        "fewer than two seeds, no verdict; **not measured**: the trainer did not record what is needed.",
        "",
    ]
    L += _summary(res)
    disc = os.path.join(here, "results", "harmonization", "discussion.md")
    if os.path.exists(disc) and meta.get("profile") != "smoke":
        with open(disc, encoding="utf-8") as f:
            L += [f.read().rstrip(), ""]
    L += ["## Setup", ""]
    L += _table(["", ""], [
        ["grid", f"{len(methods)} methods x {len(meta.get('seeds', []))} seeds x {len(rates)} misalignment rates"],
        ["methods", "; ".join(f"`{m}` = {METHODS[m].label}" for m in methods)],
        ["seeds", ", ".join(map(str, meta.get("seeds", [])))],
        ["misalignment rates", ", ".join(f"{r:g}" for r in rates)],
        ["trainer options", "`--preset " + meta.get("preset", "?") + "` " + " ".join(
            f"`{k}={v}`" for k, v in sorted(meta.get("options", {}).items()))],
        ["evaluation data", "; ".join(sorted({json.dumps(r["eval_data"]) if not isinstance(r["eval_data"], str)
                                              else r["eval_data"] for r in res["runs"] if r.get("eval_data")}))
         or "not described by the trainer (summary.json has no eval_data)"],
        ["machine", meta.get("machine", "?")],
        ["software", meta.get("software", "?")],
        ["commit", f"`{meta.get('commit', '?')}`"],
        ["made", meta.get("date", "?")],
    ])
    L += ["", "Reproduce everything (runs already finished are not re-run; the claims share their runs):", "",
          "```bash", meta.get("command_all", ""), "```", ""]

    # cost
    L += ["## Cost", "", "Steps and wall time per run (mean ± std over seeds; wall time includes start-up and "
          "evaluations, *train s* only the training steps).", ""]
    rows = []
    for m in methods:
        for r in rates:
            c = _cell(res, m, r)
            if c:
                rows.append([f"`{m}`", f"{r:g}", _ms(c["steps"], 0), _ms(c["wall_s"], 1), _ms(c["train_time_s"], 1)])
    L += _table(["method", "misalignment", "steps", "wall s", "train s"], rows)
    total = sum(x["wall_s"] for x in res["runs"] if x["wall_s"] is not None and math.isfinite(x["wall_s"]))
    L += ["", f"{len(res['runs'])} run folders, {total / 60:.1f} min of run wall time in all "
          f"({meta.get('jobs', '?')} job(s) at a time).", ""]

    # claim 1
    L += [f"## 1. Conflicts mark noise", "", f"*Question.* {CLAIMS['conflicts'].question}", "",
          f"*Command.* `{meta['commands']['conflicts']}`", ""]
    L += ["Fraction of negative per-sample cosines in the last training window, aligned vs misaligned triplets "
          "(feature level: the shared video representation), and the difference (claim: misaligned > aligned).", ""]
    rows = []
    for v in res["verdicts"]["conflicts"]:
        c = _cell(res, v["method"], v["misalignment"])
        rows.append([f"`{v['method']}`", f"{v['misalignment']:g}", _ms(c["frac_neg_aligned"]),
                     _ms(c["frac_neg_misaligned"]), _f(v["delta"]), _f(v["spread"]), v["verdict"]])
    L += _table(["method", "misalignment", "neg. fraction aligned", "neg. fraction misaligned", "difference",
                 "spread", "verdict"], rows)
    L += ["", f"Tally: {_tally(res['verdicts']['conflicts'])}.", ""]
    if "cosine_distributions.png" in fig:
        L += [f"![cosine distributions]({fig['cosine_distributions.png']})", ""]
    L += _levels(res, fig)

    # claim 2
    L += ["## 2. Realignment and curriculum help, or do not", "", f"*Question.* {CLAIMS['methods'].question}", "",
          f"*Command.* `{meta['commands']['methods']}`", ""]
    for mid in PRIMARY:
        met = METRIC_BY_ID[mid]
        L += [f"**{met.label}** (`{mid}`), held-out, end of training:", ""]
        rows = [[f"`{m}`"] + [_ms(_cell(res, m, r)[mid]) if _cell(res, m, r) else "—" for r in rates]
                for m in methods]
        ch = [next((c[mid]["chance"] for c in res["cells"] if c["misalignment"] == r), float("nan")) for r in rates]
        rows.append(["chance"] + [_f(x) for x in ch])
        wc = [next((c[mid]["chance_within_class"] for c in res["cells"] if c["misalignment"] == r), float("nan"))
              for r in rates]
        if any(math.isfinite(x) for x in wc):
            rows.append(["within-class chance"] + [_f(x) for x in wc])
        L += _table(["method"] + [f"misalignment {r:g}" for r in rates], rows) + [""]
    L += [f"Each method minus `{BASELINE}` on the metrics above (claim: higher):", ""]
    rows = [[f"`{v['method']}`", f"{v['misalignment']:g}", f"`{v['metric']}`", _f(v["delta"]), _f(v["spread"]),
             v["verdict"]] for v in res["verdicts"]["methods"]]
    L += _table(["method", "misalignment", "metric", f"minus `{BASELINE}`", "spread", "verdict"], rows)
    L += [""] + [f"* `{m}`: {_tally([v for v in res['verdicts']['methods'] if v['method'] == m])}"
                 for m in methods if m != BASELINE] + [""]
    other = [m.id for m in METRICS if m.id not in PRIMARY]
    L += [f"The other metrics ({', '.join(f'`{x}`' for x in other)}) are in [{_rel(raw['cells'], here)}]"
          f"({_rel(raw['cells'], here)}).", ""]
    if "metrics_vs_misalignment.png" in fig:
        L += [f"![metrics vs misalignment]({fig['metrics_vs_misalignment.png']})", ""]

    # claim 3
    L += ["## 3. The curriculum's score finds the noise", "", f"*Question.* {CLAIMS['score'].question}", "",
          f"*Command.* `{meta['commands']['score']}`", "",
          f"AUROC of the negated per-sample cosine against the misaligned labels (chance 0.5), in the first and last "
          f"training window, and the share of aligned triplets among the {KEPT_FRACTION:g} of each window with the "
          f"highest cosine (chance: the aligned share overall). Rate 0 has no misaligned triplet: undefined.", ""]
    rows = []
    for v in res["verdicts"]["score"]:
        c = _cell(res, v["method"], v["misalignment"])
        rows.append([f"`{v['method']}`", f"{v['misalignment']:g}", _ms(c["auroc_first"]), _ms(c["auroc"]),
                     _ms(c["auroc_pass"]), _ms(c["precision_at_kept"]), _ms(c["precision_chance"]), v["verdict"]])
    L += _table(["method", "misalignment", "AUROC first window", "AUROC last window", "AUROC eval pass",
                 f"precision at kept {KEPT_FRACTION:g}", "chance", "verdict (last AUROC > 0.5)"], rows)
    L += ["", f"Tally: {_tally(res['verdicts']['score'])}. Source of the scores per run: "
          + ", ".join(sorted({r['conflict_source'] for r in res['runs']})) + ".", ""]
    L += _sum_vs_pcgrad(res)
    if "cosine_by_method.png" in fig:
        L += [f"![cosine distributions per method]({fig['cosine_by_method.png']})", ""]
    L += _dropped(res)
    L += _auroc_vs_quality(res)
    if "auroc_over_training.png" in fig:
        L += [f"![AUROC over training]({fig['auroc_over_training.png']})", ""]

    # claim 4
    L += ["## 4. Scaling with noise", "", f"*Question.* {CLAIMS['scaling'].question}", "",
          f"*Command.* `{meta['commands']['scaling']}`", "",
          f"Gain over `{BASELINE}` at the lowest and the highest misalignment rate, and its change (claim: the gain "
          "grows with noise); spread = the largest seed std of the four cells.", ""]
    rows = [[f"`{v['method']}`", f"`{v['metric']}`", _f(v["gap_low"]), _f(v["gap_high"]), _f(v["delta"]),
             _f(v["spread"]), v["verdict"]] for v in res["verdicts"]["scaling"]]
    lo_hi = res["verdicts"]["scaling"][0]["rates"] if res["verdicts"]["scaling"] else ["?", "?"]
    L += _table(["method", "metric", f"gain at {lo_hi[0]:g}" if rows else "gain low",
                 f"gain at {lo_hi[1]:g}" if rows else "gain high", "change", "spread", "verdict"], rows)
    L += ["", f"Tally: {_tally(res['verdicts']['scaling'])}.", ""]

    # gaps
    L += ["## Missing measurements", ""]
    L += ([f"* {m}" for m in res["missing"]] if res["missing"] else ["None: every measurement above was recorded."])
    L += [""]
    if res["failed"]:
        L += ["## Runs that did not finish", ""] + [f"* `{f['name']}`: {f['status']}" for f in res["failed"]] + [""]
    if res.get("excluded"):
        L += ["## Runs left out", "", "Finished runs of another length than the report's (not pooled):", ""]
        L += [f"* `{n}`" for n in res["excluded"]] + [""]
    L += ["## Raw results", "",
          f"* [{_rel(raw['json'], here)}]({_rel(raw['json'], here)}): everything above, per run and per cell, "
          "with the series over training;",
          f"* [{_rel(raw['runs'], here)}]({_rel(raw['runs'], here)}): one row per run;",
          f"* [{_rel(raw['cells'], here)}]({_rel(raw['cells'], here)}): one row per method x misalignment x "
          "quantity (mean, std, n, chance);",
          f"* [{_rel(raw['levels'], here)}]({_rel(raw['levels'], here)}): feature vs parameter level, one row per "
          "method x misalignment x quantity (mean, std, n over seeds).", ""]
    text = "\n".join(L)
    os.makedirs(here, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


# conventional reading of a rank correlation's size (|rho|): below 0.2 none, then weak, moderate, strong
RHO_WORDS = ((0.7, "strong"), (0.4, "moderate"), (0.2, "weak"), (0.0, "none"))


def _rho_word(x: float) -> str:
    if not math.isfinite(x):
        return "undefined"
    return next(w for t, w in RHO_WORDS if abs(x) >= t) + (" (negative)" if x < 0 and abs(x) >= 0.2 else "")


def _param_verdict(c: dict[str, Any]) -> tuple[float, float, str]:
    """Parameter level, last window: (misaligned - aligned negative fraction, spread, verdict; '' at rate 0)."""
    d_al, d_ms = c["frac_neg_aligned_param"], c["frac_neg_misaligned_param"]
    ok = math.isfinite(d_al["std"]) and math.isfinite(d_ms["std"])
    d = d_ms["mean"] - d_al["mean"]
    spread = max(d_al["std"], d_ms["std"]) if ok else float("nan")
    return d, spread, verdict(d, spread, min(d_al["n"], d_ms["n"])) if c["misalignment"] > 0 else ""


def _levels(res: dict[str, Any], fig: dict[str, str]) -> list[str]:
    """Claim 1 at both levels: per-sample feature- vs parameter-level cosines on the same (measured) runs."""
    cells = res.get("level_cells") or []
    L = ["### Feature level vs parameter level on the same runs", ""]
    if not cells:
        return L + ["Parameter-level cosines on the same run: **not measured** (see *Missing measurements*).", ""]
    every = sorted({e for c in cells for e in c["measure_param_every"]})
    seeds = sorted({s for c in cells for s in c["seeds"]})
    L += [f"The conflicts claim's runs ({', '.join(f'`{c}`' for c in sorted({c['method'] for c in cells}))} "
          f"x seeds {', '.join(map(str, seeds))}) also measure, every {', '.join(map(str, every))} steps, the "
          "per-sample cosine of the video-audio and video-text loss gradients at **parameter level** "
          "(`harmony.measure_param_every`: path-decomposition per-sample gradients over every parameter both losses "
          "reach, ghost Gram, same batch and same DropToken draws as the training step) beside the feature-level "
          "cosine the trainer harmonizes with. The measurement leaves the update unchanged; these runs have their own "
          "folders and are not pooled into the other tables (their seeds repeat the plain grid's). Spearman rank "
          "correlation of the two cosines over all measured samples of a run (overall and within each group), the "
          "share of samples whose two cosines have the same sign, mean ± std over seeds (n = seeds). Reading of "
          "|rho|: " + ", ".join(f">= {t:g} {w}" for t, w in RHO_WORDS[:-1]) + ", below 0.2 none.", ""]
    rows = []
    for c in cells:
        rows.append([f"`{c['method']}`", f"{c['misalignment']:g}", str(c["n_measured"]), _ms(c["spearman_all"], 2),
                     _ms(c["spearman_aligned"], 2), _ms(c["spearman_misaligned"], 2), _ms(c["sign_agreement"], 2),
                     _rho_word(c["spearman_all"]["mean"])])
    L += _table(["method", "misalignment", "samples (all seeds)", "Spearman overall", "Spearman aligned",
                 "Spearman misaligned", "same sign", "reading (overall)"], rows)
    per_seed = [x for c in cells for x in c["spearman_per_run"] if x is not None and math.isfinite(x)]
    within = [c[k]["mean"] for c in cells for k in ("spearman_aligned", "spearman_misaligned")
              if math.isfinite(c[k]["mean"])]
    if per_seed:
        words = Counter(_rho_word(x) for x in per_seed)
        L += ["", f"*Do the two levels agree per sample?* Over the {len(per_seed)} measured runs the overall Spearman "
              f"correlation ranges from {min(per_seed):.2f} to {max(per_seed):.2f} (reading per run: "
              + ", ".join(f"{w} {n}" for w, n in words.most_common()) + ")"
              + (f"; within a group (aligned or misaligned) the cell means range from {min(within):.2f} to "
                 f"{max(within):.2f}" if within else "") + "."]
    diffs = [c["max_metric_diff_vs_unmeasured"] for c in cells if math.isfinite(c["max_metric_diff_vs_unmeasured"])]
    if diffs:
        L += ["", f"*Check.* Largest difference of any held-out metric at the end of training between a measured run "
              f"and the unmeasured run of the same method, rate and seed: {max(diffs):.3g} (0: the measurement did "
              "not change training)."]
    cost = []
    for c in cells:
        p = _cell(res, c["method"], c["misalignment"])
        if p is not None and math.isfinite(c["train_time_s"]["mean"]) and math.isfinite(p["train_time_s"]["mean"]):
            cost.append(c["train_time_s"]["mean"] / p["train_time_s"]["mean"])
    if cost:
        L += ["", f"*Cost.* Training time of the measured runs relative to the unmeasured runs of the same cell "
              f"(means over seeds): x{min(cost):.2f} to x{max(cost):.2f}. The two sets ran in different sessions "
              "under different machine load, so this range is not a clean estimate; the side-by-side measurement "
              "is in `studies/harmonization/grid.py` (`MEASURE_PARAM_EVERY`)."]
    L += ["", "Negative-cosine fractions per group at both levels, on the same samples (the measured steps), in the "
          "last training window and over all of training; *param. difference* = misaligned minus aligned at "
          "parameter level, with the verdict rule of the table above (claim: misaligned > aligned).", ""]
    rows = []
    for c in cells:
        d, spread, v = _param_verdict(c)
        rows.append([f"`{c['method']}`", f"{c['misalignment']:g}", _ms(c["frac_neg_aligned_feature"]),
                     _ms(c["frac_neg_misaligned_feature"]), _ms(c["frac_neg_aligned_param"]),
                     _ms(c["frac_neg_misaligned_param"]), _f(d), _f(spread), v or "—"])
    L += ["**Last training window:**", ""]
    L += _table(["method", "misalignment", "feature: neg. aligned", "feature: neg. misaligned",
                 "param.: neg. aligned", "param.: neg. misaligned", "param. difference", "spread", "verdict"], rows)
    rows = [[f"`{c['method']}`", f"{c['misalignment']:g}", _ms(c["frac_neg_aligned_feature_all"]),
             _ms(c["frac_neg_misaligned_feature_all"]), _ms(c["frac_neg_aligned_param_all"]),
             _ms(c["frac_neg_misaligned_param_all"])] for c in cells]
    L += ["", "**All measured steps:**", ""]
    L += _table(["method", "misalignment", "feature: neg. aligned", "feature: neg. misaligned",
                 "param.: neg. aligned", "param.: neg. misaligned"], rows)
    L += [""]
    if "feature_vs_parameter.png" in fig:
        L += [f"![feature vs parameter level]({fig['feature_vs_parameter.png']})", ""]
    return L


def _summary(res: dict[str, Any]) -> list[str]:
    """Verdict tallies per claim (and per method for claims 2 and 4), from the verdict rule only."""
    v = res["verdicts"]
    L = ["## Summary (verdict counts)", "",
         "How many comparisons of each claim came out *held*, *did not hold* or *within noise* (the tables "
         "below list each one):", ""]
    measured = [x for x in v["conflicts"] if x["verdict"] != "not measured"]
    L.append(f"* **1. Conflicts mark noise** (misaligned triplets have negative cosines more often than aligned "
             f"ones; per method x misalignment rate > 0): {_tally(measured)}.")
    lc = res.get("level_cells") or []
    if lc:
        sp = [c["spearman_all"]["mean"] for c in lc if math.isfinite(c["spearman_all"]["mean"])]
        if sp:
            L.append(f"* **1b. Feature and parameter level agree per sample** (Spearman of the two per-sample cosines on "
                     f"the same runs, cell means over {len(lc)} method x rate cells): {min(sp):.2f} to {max(sp):.2f} "
                     f"({', '.join(sorted({_rho_word(x) for x in sp}))}); claim 1 at parameter level (per method x "
                     f"rate > 0): {_tally([{'verdict': _param_verdict(c)[2]} for c in lc if c['misalignment'] > 0])}.")
    L.append(f"* **2. Realignment / curriculum beat plain VATT** (per method, over {len(PRIMARY)} held-out metrics "
             f"x {len(res['rates'])} rates):")
    L += [f"  * `{m}`: {_tally([x for x in v['methods'] if x['method'] == m])}" for m in res["methods"]
          if m != BASELINE]
    measured = [x for x in v["score"] if x["verdict"] != "not measured"]
    L.append(f"* **3. The score finds the noise** (AUROC of the last training window > 0.5; per method x rate > 0): "
             f"{_tally(measured)}.")
    L.append("* **4. The gain grows with noise** (gain over plain VATT at the highest minus at the lowest rate):")
    L += [f"  * `{m}`: {_tally([x for x in v['scaling'] if x['method'] == m])}" for m in res["methods"]
          if m != BASELINE]
    return L + [""]


def _auroc_vs_quality(res: dict[str, Any]) -> list[str]:
    """Does the score's AUROC follow how well the model learned? Spearman over runs with misaligned triplets."""
    from .aggregate import spearman

    runs = [r for r in res["runs"] if r["status"] == "completed" and r["misalignment"]
            and r["steps_planned"] == r["steps"] and r["method"] in res["methods"] and not r.get("measure_param_every")]
    rows = []
    groups = []  # per rate (the rate moves both quantities), all methods, then without the curriculum
    for rate in sorted({float(r["misalignment"]) for r in runs}):
        at = [r for r in runs if float(r["misalignment"]) == rate]
        groups.append((f"{rate:g}, all methods", at))
        groups.append((f"{rate:g}, without curriculum", [r for r in at if "curriculum" not in r["method"]]))
    for label, group in groups:
        if len(group) < 3:
            continue
        row = [label, str(len(group))]
        for metric in ("v2a_R@10", "v2t_R@10"):
            for key in ("auroc", "auroc_pass"):
                a = [r["conflict_final"][key] for r in group]
                b = [r["final"].get(metric, float("nan")) for r in group]
                row.append(_f(spearman(np.asarray(a, dtype=float), np.asarray(b, dtype=float)), 2))
        rows.append(row)
    if not rows:
        return []
    return (["*Does the AUROC follow how well the model learned?* Spearman rank correlation, over the runs of "
             "one misalignment rate, between the score's AUROC (last training window; eval pass) and held-out "
             "retrieval at the end of training:", ""]
            + _table(["misalignment, runs", "n", "AUROC last window vs v2a R@10", "AUROC eval pass vs v2a R@10",
                      "AUROC last window vs v2t R@10", "AUROC eval pass vs v2t R@10"], rows) + [""])


def _dropped(res: dict[str, Any]) -> list[str]:
    """What the curriculum dropped (weight 0), per group, in the first and last training window."""
    rows = []
    for m in res["methods"]:
        for rate in res["rates"]:
            c = _cell(res, m, rate)
            if c is None or rate <= 0 or not c["frac_dropped_misaligned"]["n"]:
                continue
            if not any(c[k]["mean"] > 0 for k in ("frac_dropped_aligned", "frac_dropped_misaligned",
                                                 "frac_dropped_aligned_first", "frac_dropped_misaligned_first")):
                continue  # no curriculum: nothing dropped
            rows.append([f"`{m}`", f"{rate:g}", _ms(c["frac_dropped_aligned_first"]),
                         _ms(c["frac_dropped_misaligned_first"]), _ms(c["frac_dropped_aligned"]),
                         _ms(c["frac_dropped_misaligned"])])
    if not rows:
        return []
    return (["*What the curriculum dropped.* Share of aligned and of misaligned triplets whose curriculum weight "
             "was 0 (excluded from the video path's update), first and last training window "
             "(from `samples.jsonl`):", ""]
            + _table(["method", "misalignment", "aligned dropped, first", "misaligned dropped, first",
                      "aligned dropped, last", "misaligned dropped, last"], rows) + [""])


def _sum_vs_pcgrad(res: dict[str, Any]) -> list[str]:
    """Why does the score's AUROC differ between `sum` and `pcgrad`? Each method against `sum`, early and late."""
    out = ["*Does realignment change what the score sees?* The score is the cosine of the per-sample gradients "
           "*before* realignment, so PCGrad changes it only through the model it trains, and the curriculum "
           "through which triplets train the video path. The trainer's default (`gradharmony-pretrain` without "
           "options) is `pcgrad` with the fraction curriculum, i.e. `pcgrad+curriculum` here; the grid separates "
           "the two. If a method's AUROC gap to `sum` is absent in the first window and opens later, it comes "
           "from training (e.g. a model that fits the misaligned triplets, whose gradients then conflict less); "
           "if it is there from the start, it does not. The *eval pass* rows score each method's end-of-training "
           "model with the same frozen measurement (no DropToken, eval mode, no curriculum): a gap there is a "
           "property of the trained model, not of how the score was collected during training.", ""]
    rows = []
    for rate in res["rates"]:
        s = _cell(res, BASELINE, rate)
        if rate <= 0 or s is None:
            continue
        for m in res["methods"]:
            p = _cell(res, m, rate)
            if m == BASELINE or p is None:
                continue
            for phase, key in (("first window", "auroc_first"), ("last window", "auroc"),
                               ("eval pass, end", "auroc_pass")):
                a, b = s[key], p[key]
                d = a["mean"] - b["mean"]
                ok = math.isfinite(a["std"]) and math.isfinite(b["std"])
                spread = max(a["std"], b["std"]) if ok else float("nan")
                v = verdict(d, spread, min(a["n"], b["n"]))
                rows.append([f"{rate:g}", f"`{m}`", phase, _ms(a), _ms(b), _f(d), _f(spread),
                             {"held": f"{BASELINE} higher", "did not hold": f"{m} higher"}.get(v, v)])
    if not rows:
        return out + [f"Not measured: the grid has no `{BASELINE}` cell and another method with misaligned triplets.",
                      ""]
    return out + _table(["misalignment", "method", "when", f"AUROC `{BASELINE}`", "AUROC method",
                         f"`{BASELINE}` - method", "spread", "reading"], rows) + [""]
