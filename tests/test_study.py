"""The harmonization study (studies/harmonization): smoke run through the trainer, aggregation, report."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # studies/ is not installed; bare `pytest` does not put the checkout on sys.path
    sys.path.insert(0, ROOT)

from studies.harmonization import aggregate as agg  # noqa: E402
from studies.harmonization.__main__ import main  # noqa: E402


def _seed(request) -> int:
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed = {seed}")
    return seed


def test_smoke_study_end_to_end(tmp_path):
    """Two steps per run through the trainer's CLI: runs finish, outputs exist and agree, nothing re-runs."""
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["run", "all", "--smoke", "--inprocess", "--methods", "sum,pcgrad", "--misalignment", "0,0.6",
            "--runs", str(runs), "--docs", str(docs)]
    assert main(argv) == 0
    out = docs / "results" / "harmonization"
    res = json.loads((out / "results.json").read_text())
    # the conflicts claim's runs measure the parameter-level cosines too: own folders, not pooled into the cells
    assert len(res["runs"]) == 8 and not res["failed"]
    assert all(r["status"] == "completed" and r["steps"] == 2 for r in res["runs"])
    assert sorted(r["measure_param_every"] for r in res["runs"]) == [0] * 4 + [1] * 4
    for every in (0, 1):
        assert sorted((r["method"], r["misalignment"]) for r in res["runs"] if r["measure_param_every"] == every) \
            == sorted((m, x) for m in ("sum", "pcgrad") for x in (0.0, 0.6))
    assert all(c["n_runs"] == 1 for c in res["cells"]) and len(res["cells"]) == 4
    assert len(res["level_cells"]) == 4
    for c in res["level_cells"]:
        assert c["n_measured"] == 2 * 8 and -1 <= c["spearman_all"]["mean"] <= 1
        # the measurement leaves training unchanged: the same held-out metrics as the unmeasured twin run
        assert c["max_metric_diff_vs_unmeasured"] == 0.0
    # cells agree with runs (one seed: the cell mean is the run's value)
    with open(out / "cells.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    for r in rows:
        if r["measure_param_every"] != "0":
            continue
        c = next(c for c in cells if c["method"] == r["method"] and float(c["misalignment"]) == float(r["misalignment"])
                 and c["quantity"] == "v2t_R@10")
        assert float(c["mean"]) == pytest.approx(float(r["v2t_R@10"])) and c["n"] == "1"
    text = (docs / "RESULTS.md").read_text()
    assert "Smoke profile" in text and "one seed (no spread)" in text
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## Raw results"):
        assert section in text
    assert (out / "metrics_vs_misalignment.png").stat().st_size > 1000
    assert "metrics_vs_misalignment.png" in text
    assert "### Feature level vs parameter level" in text and "feature_vs_parameter.png" in text
    assert (out / "feature_vs_parameter.png").stat().st_size > 1000 and (out / "levels.csv").exists()
    sessions = [json.loads((runs / r["name"] / "study_run.json").read_text())["sessions"] for r in res["runs"]]
    assert all(len(s) == 1 and s[0]["rc"] == 0 and s[0]["wall_s"] > 0 for s in sessions)
    # resumable: a second invocation launches only the run without a completed summary.json
    (runs / res["runs"][0]["name"] / "summary.json").unlink()
    assert main(argv + ["--no-report"]) == 0
    for i, r in enumerate(res["runs"]):
        sessions = json.loads((runs / r["name"] / "study_run.json").read_text())["sessions"]
        assert len(sessions) == (2 if i == 0 else 1)
    assert json.loads((runs / res["runs"][0]["name"] / "summary.json").read_text())["status"] == "completed"


def test_dry_run_prints_trainer_commands(tmp_path, capsys):
    assert main(["run", "methods", "--dry-run", "--runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 * 3 * 3  # methods x misalignment x seeds
    assert all(ln.startswith("gradharmony-pretrain ") and "--resume latest" in ln for ln in lines)
    assert sum("harmony.curriculum=fraction" in ln for ln in lines) == 2 * 9
    assert main(["run", "methods", "--methods", "nope", "--runs", str(tmp_path)]) == 2
    # the conflicts claim: its own methods, the parameter-level measurement, its own folders
    assert main(["run", "conflicts", "--dry-run", "--runs", str(tmp_path)]) == 0
    conf = capsys.readouterr().out.strip().splitlines()
    assert len(conf) == 2 * 3 * 3 and all("harmony.measure_param_every=5" in ln for ln in conf)
    assert {ln.split("harmony.method=")[1].split()[0] for ln in conf} == {"sum", "pcgrad"}
    assert not {ln.split("--out ")[1].split()[0] for ln in conf} & {ln.split("--out ")[1].split()[0] for ln in lines}


def test_spearman_matches_scipy_with_ties(request):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(_seed(request))
    a = rng.integers(0, 6, 200).astype(float)  # many ties
    b = a + rng.normal(0, 2, 200)
    b[::7] = b[0]
    assert agg.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(agg.spearman(np.ones(5), np.arange(5.0)))


def test_histogram_auroc_and_precision(request):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(_seed(request))
    y = (rng.random(500) < 0.3).astype(int)
    raw = np.clip(rng.normal(0.3 - 0.5 * y, 0.3), -0.999, 0.999)
    cos = -0.95 + 0.1 * np.floor((raw + 1) / 0.1)  # every value at its bin's centre
    edges = np.linspace(-1, 1, 21)
    h_al, h_mis = np.histogram(cos[y == 0], edges)[0], np.histogram(cos[y == 1], edges)[0]
    # within one bin, values are equal here, so the binned AUROC (ties count half) is exact
    assert agg.auroc_from_histograms(h_al, h_mis) == pytest.approx(roc_auc_score(y, -cos), abs=1e-9)
    assert agg.auroc(cos, y) == pytest.approx(roc_auc_score(y, -cos))
    prec, chance = agg.precision_at_kept(np.array([0.9, 0.8, -0.5, -0.6]), np.array([0, 1, 1, 0]), kept=0.5)
    assert (prec, chance) == (0.5, 0.5)
    prec, _ = agg.precision_at_kept(np.array([0.9, 0.8, -0.5, -0.6]), np.array([0, 0, 1, 1]), kept=0.5)
    assert prec == 1.0
    # binned: exact when the cut falls on a bin edge of the sorted values
    n_keep = int(np.ceil(0.5 * len(cos)))
    cut = np.sort(cos)[::-1][n_keep - 1]
    if (cos > cut).sum() + (cos == cut).sum() == n_keep:  # the cut bin is kept whole
        p_binned = agg.precision_at_kept_from_histograms(h_al, h_mis)[0]
        assert p_binned == pytest.approx(agg.precision_at_kept(cos, y)[0])
    # ascending bins: the top bin holds 2 aligned, the middle 2 aligned + 2 misaligned, the lowest 2 misaligned
    hist_al, hist_mis = [0, 2, 2], [2, 2, 0]
    p_h, c_h = agg.precision_at_kept_from_histograms(hist_al, hist_mis, kept=0.25)  # the top bin alone
    assert p_h == pytest.approx(1.0) and c_h == 0.5
    p_h, _ = agg.precision_at_kept_from_histograms(hist_al, hist_mis, kept=0.5)  # 2 aligned + half of the middle
    assert p_h == pytest.approx((2 + 1) / 4)
    p_h, _ = agg.precision_at_kept_from_histograms(hist_al, hist_mis, kept=0.75)  # top and middle bins whole
    assert p_h == pytest.approx(4 / 6)


def test_verdict_rule():
    assert agg.verdict(0.1, 0.05, 3) == "held"
    assert agg.verdict(-0.1, 0.05, 3) == "did not hold"
    assert agg.verdict(0.04, 0.05, 3) == "within noise"
    assert agg.verdict(-0.1, 0.05, 3, expect_positive=False) == "held"
    assert agg.verdict(0.5, float("nan"), 1) == "one seed (no spread)"
    assert agg.verdict(float("nan"), 0.1, 3) == "not measured"


def _fake_run(root, method, seed, rate, v2t, rng, with_param=True, renamed=False, steps=20, drop=None, every=0):
    """A run folder as the trainer writes it, with per-sample cosines in samples.jsonl (``cos_param`` on every
    step, or with ``every`` > 0 as harmony.measure_param_every writes it: on every ``every``-th step)."""
    name = f"{method}__mis{rate:g}__seed{seed}__fake{steps}" + (f"m{every}" if every else "")
    d = root / name
    d.mkdir(parents=True)
    opts = {"sum": ("sum", "off"), "pcgrad": ("pcgrad", "off")}[method]
    (d / "config.json").write_text(json.dumps({"harmony": {"method": opts[0], "curriculum": opts[1],
                                                           "measure_param_every": every},
                                               "train": {"seed": seed, "steps": steps},
                                               "data": {"misaligned_fraction": rate}}))
    key = "eval/video_to_text_R@10" if renamed else "eval/v2t_R@10"
    summ = {"status": "completed", "step": 20, "train_time_s": 1.0, key: v2t, "eval/num_clips": 100.0,
            "eval/chance_within_class/v2t_R@10": 0.97}
    (d / "summary.json").write_text(json.dumps(summ))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 20, "train/loss": 1.0}) + "\n"
                                     + json.dumps({"step": 20, **{k: v for k, v in summ.items() if "/" in k}}) + "\n")
    with open(d / "samples.jsonl", "w") as f:
        for step in range(1, 21):
            mis = (rng.random(16) < rate).astype(int)
            cos = np.clip(rng.normal(0.4 - 0.8 * mis, 0.2), -1, 1)
            rec = {"step": step, "misaligned": mis.tolist(), "cos": cos.tolist()}
            if with_param and (not every or step % every == 0):
                rec["cos_param"] = (cos + rng.normal(0, 0.05, 16)).tolist()
            if drop is not None:  # a curriculum dropping the `drop` share with the lowest cosine
                w = np.ones(16)
                w[np.argsort(cos)[: int(drop * 16)]] = 0.0
                rec["weight"] = w.tolist()
            f.write(json.dumps(rec) + "\n")
    return d


def test_aggregate_and_report_from_run_folders(tmp_path, request):
    """Per-sample cosines -> AUROC, negative fractions, Spearman; cells -> verdicts -> report, consistently."""
    rng = np.random.default_rng(_seed(request))
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        _fake_run(root, "sum", seed, 0.5, 0.30 + 0.001 * seed, rng)
        _fake_run(root, "pcgrad", seed, 0.5, 0.50 + 0.001 * seed, rng)
    _fake_run(root, "sum", 0, 0.5, 0.9, rng, steps=10)  # another run length: listed, not pooled
    assert main(["report", "--runs", str(root), "--docs", str(tmp_path / "docs")]) == 0
    res = json.loads((tmp_path / "docs" / "results" / "harmonization" / "results.json").read_text())
    cell = next(c for c in res["cells"] if c["method"] == "sum")
    assert cell["v2t_R@10"]["mean"] == pytest.approx(0.301) and cell["v2t_R@10"]["std"] == pytest.approx(0.001)
    assert cell["v2t_R@10"]["chance"] == pytest.approx(0.1)  # k / N without a logged chance key
    assert cell["v2t_R@10"]["chance_within_class"] == pytest.approx(0.97)
    assert cell["auroc"]["mean"] > 0.9  # the fake cosines separate the groups
    assert cell["frac_neg_misaligned"]["mean"] > 0.8 > 0.2 > cell["frac_neg_aligned"]["mean"]
    assert cell["spearman_feature_param"]["mean"] > 0.9
    v = next(v for v in res["verdicts"]["methods"] if v["metric"] == "v2t_R@10")
    assert v["delta"] == pytest.approx(0.2) and v["verdict"] == "held"
    assert {v["verdict"] for v in res["verdicts"]["conflicts"]} == {"held"}
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "0.301 ± 0.001 (n=3)" in text and "Smoke profile" not in text
    assert "| within-class chance | 0.970 |" in text
    assert res["excluded"] == ["sum__mis0.5__seed0__fake10"] and "`sum__mis0.5__seed0__fake10`" in text
    assert (tmp_path / "docs" / "results" / "harmonization" / "cosine_distributions.png").exists()
    assert (tmp_path / "docs" / "results" / "harmonization" / "auroc_over_training.png").exists()
    assert "cosine_by_method.png" in text


def test_curriculum_drops_per_group(tmp_path, request):
    """The weight column -> share of aligned / misaligned triplets dropped, first and last window."""
    rng = np.random.default_rng(_seed(request))
    d = _fake_run(tmp_path, "sum", 0, 0.5, 0.4, rng, drop=0.25)
    fc = agg._final_conflict(agg.read_run(str(d)))
    recs = [json.loads(ln) for ln in (d / "samples.jsonl").read_text().splitlines()]
    for when, steps in (("", (19, 20)), ("_first", (1, 2, 3))):  # 20 steps in 8 windows: sizes 3,3,3,3,2,2,2,2
        mis = np.concatenate([r["misaligned"] for r in recs if r["step"] in steps])
        w = np.concatenate([r["weight"] for r in recs if r["step"] in steps])
        assert fc[f"frac_dropped_aligned{when}"] == pytest.approx((w[mis == 0] == 0).mean())
        assert fc[f"frac_dropped_misaligned{when}"] == pytest.approx((w[mis == 1] == 0).mean())
        # the fake cosines separate the groups: the lowest quarter of a batch is (nearly) all misaligned
        assert fc[f"frac_dropped_aligned{when}"] < 0.1 < fc[f"frac_dropped_misaligned{when}"]
    d2 = _fake_run(tmp_path, "pcgrad", 0, 0.5, 0.4, rng)  # no weight column: not measured, not zero
    assert not np.isfinite(agg._final_conflict(agg.read_run(str(d2)))["frac_dropped_aligned"])


def test_missing_metric_is_named(tmp_path, request):
    rng = np.random.default_rng(_seed(request))
    d = _fake_run(tmp_path, "sum", 0, 0.3, 0.4, rng, with_param=False, renamed=True, every=5)
    run = agg.read_run(str(d))
    assert "v2t_R@10" not in run["final"]
    msg = next(m for m in run["missing"] if m.startswith("metric 'v2t_R@10'"))
    assert "eval/v2t_R@10" in msg and "eval/video_to_text_R@10" in msg  # the keys tried and the keys present
    assert any(m.startswith("parameter-level") for m in run["missing"])


def test_group_histograms_source(tmp_path):
    """Cosine histograms split by ground truth in the metrics records (no per-sample file) are read and pooled."""
    d = tmp_path / "sum__mis0.5__seed0__fake"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"harmony": {"method": "sum", "curriculum": "off"},
                                               "train": {"seed": 0, "steps": 40},
                                               "data": {"misaligned_fraction": 0.5}}))
    (d / "summary.json").write_text(json.dumps({"status": "completed", "step": 40}))
    al, mis = [0] * 20, [0] * 20
    al[15], mis[5], mis[12] = 3, 2, 2  # aligned all at cos 0.5..0.6; misaligned half below 0
    with open(d / "metrics.jsonl", "w") as f:
        for step in range(1, 41):
            rec = {"step": step, "train/score_hist_aligned": al, "train/score_hist_misaligned": mis}
            f.write(json.dumps(rec) + "\n")
    run = agg.read_run(str(d))
    assert run["conflict_source"].startswith("group_histograms")
    assert len(run["conflict_series"]) == agg.N_WINDOWS and run["conflict_series"][-1]["step"] == 40
    last = run["conflict_series"][-1]
    assert last["frac_neg_aligned"] == 0.0 and last["frac_neg_misaligned"] == 0.5
    assert last["auroc"] == 1.0 and last["n_aligned"] == 3 * 5
    assert last["precision_at_kept"] == pytest.approx(15 / 17.5)  # top half of 35: 15 aligned + 2.5 misaligned
    assert last["precision_chance"] == pytest.approx(15 / 35)


def test_compare_levels_on_the_measured_samples(request):
    """Spearman overall and per group, sign agreement and negative fractions use the measured samples only."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(_seed(request))
    n = 400
    step = np.repeat(np.arange(1, 41), 10).astype(float)
    mis = (rng.random(n) < 0.4).astype(float)
    cos = np.clip(rng.normal(0.3 - 0.6 * mis, 0.3), -1, 1)
    par = np.clip(0.5 * cos + rng.normal(0, 0.2, n), -1, 1)
    par[step % 4 != 0] = np.nan  # measured every 4th step
    lv = agg.compare_levels({"step": step, "misaligned": mis, "cos": cos, "cos_param": par})
    m = np.isfinite(par)
    assert lv["n_measured"] == m.sum() == 100 and lv["n_steps"] == 10
    assert lv["spearman_all"] == pytest.approx(stats.spearmanr(cos[m], par[m]).statistic, abs=1e-12)
    for g, name in ((0, "aligned"), (1, "misaligned")):
        sel = m & (mis == g)
        assert lv[f"spearman_{name}"] == pytest.approx(stats.spearmanr(cos[sel], par[sel]).statistic, abs=1e-12)
        assert lv[f"frac_neg_{name}_param_all"] == pytest.approx((par[sel] < 0).mean())
        assert lv[f"frac_neg_{name}_feature_all"] == pytest.approx((cos[sel] < 0).mean())
        last = sel & (step == 40)  # np.array_split of the 10 measured steps into 8 windows: the last is step 40
        # (an empty group in the last window, 10 samples: NaN, not 0)
        assert lv[f"frac_neg_{name}_param"] == pytest.approx((par[last] < 0).mean() if last.any() else np.nan,
                                                             nan_ok=True)
    assert lv["sign_agreement"] == pytest.approx(((cos[m] < 0) == (par[m] < 0)).mean())
    assert len(lv["series"]) == agg.N_WINDOWS and len(lv["scatter"]) == 100


def test_measured_runs_are_kept_out_of_the_other_claims_cells(tmp_path, request):
    rng = np.random.default_rng(_seed(request))
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        _fake_run(root, "sum", seed, 0.5, 0.30 + 0.001 * seed, rng, with_param=False)
        _fake_run(root, "sum", seed, 0.5, 0.90, rng, every=2)  # another v2t: pooled, the cell mean would move
    res = agg.collect(str(root))
    (cell,) = res["cells"]
    assert cell["n_runs"] == 3 and cell["v2t_R@10"]["mean"] == pytest.approx(0.301)
    (lc,) = res["level_cells"]
    assert lc["n_runs"] == 3 and lc["n_measured"] == 3 * 10 * 16 and lc["spearman_all"]["mean"] > 0.8
    assert lc["max_metric_diff_vs_unmeasured"] == pytest.approx(0.90 - 0.300)
    assert not any(m.startswith("parameter-level") for m in res["missing"])
