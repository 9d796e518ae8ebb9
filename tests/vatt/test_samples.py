"""``samples.jsonl``: per-sample training cosines with clip index and ground-truth flag, and resume."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gradharmony.vatt.trainer import Trainer

from .conftest import read_metrics, tiny_config

KW = dict(train__steps=4, data__misaligned_fraction=0.5, harmony__method="pcgrad", harmony__curriculum="fraction",
          harmony__curriculum_warmup=0.0, harmony__curriculum_ramp=1.0)


def read_samples(out) -> list[dict]:
    with open(os.path.join(str(out), "samples.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def test_one_record_per_step_matching_the_batch_and_ground_truth(tmp_path) -> None:
    tr = Trainer(tiny_config(tmp_path, **KW))
    tr.fit()
    recs = read_samples(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    b = tr.cfg.train.batch_size
    truth = tr.tracker.misaligned
    assert set(truth.tolist()) == {0, 1}
    for r in recs:
        assert len(r["index"]) == len(r["misaligned"]) == len(r["cos"]) == len(r["weight"]) == b
        assert r["misaligned"] == truth[np.asarray(r["index"])].tolist()
        assert all(-1.0 <= c <= 1.0 for c in r["cos"])
    # the cosine is the conflict score the metrics record aggregates (log_every=1: one step per record)
    means = {m["step"]: m["train/score_mean"] for m in read_metrics(str(tmp_path)) if "train/score_mean" in m}
    for r in recs:
        assert np.mean(r["cos"]) == pytest.approx(means[r["step"]], abs=1e-4)
    # the last score of each clip is the tracker's
    last: dict[int, float] = {}
    for r in recs:
        last.update(zip(r["index"], r["cos"]))
    for i, c in last.items():
        assert tr.tracker.score[i] == pytest.approx(c, abs=1e-4)
    # the curriculum drops samples at the start: weights are not all one, and are the kept fraction
    kept = {m["step"]: m["train/kept_fraction"] for m in read_metrics(str(tmp_path)) if "train/kept_fraction" in m}
    assert any(w < 1 for r in recs for w in r["weight"])
    for r in recs:
        assert np.mean(np.asarray(r["weight"]) > 0) == pytest.approx(kept[r["step"]], abs=1e-6)


def test_resume_neither_duplicates_nor_loses_steps(tmp_path) -> None:
    Trainer(tiny_config(tmp_path / "a", **KW)).fit()
    Trainer(tiny_config(tmp_path / "b", train__stop_after=2, **KW)).fit()
    # a record written after the checkpoint of step 2, before a crash: dropped on resume
    with open(tmp_path / "b" / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 3, "index": [0], "misaligned": [0], "cos": [0.5], "weight": [1.0]}) + "\n")
    Trainer(tiny_config(tmp_path / "b", train__resume="latest", **KW)).fit()
    a, b = read_samples(tmp_path / "a"), read_samples(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    # resuming a finished run writes nothing more
    Trainer(tiny_config(tmp_path / "b", train__resume="latest", **KW)).fit()
    assert read_samples(tmp_path / "b") == a


def test_off_writes_no_file_and_a_fresh_start_drops_an_old_one(tmp_path) -> None:
    Trainer(tiny_config(tmp_path, train__log_samples=False, **KW)).fit()
    assert not os.path.exists(tmp_path / "samples.jsonl")
    Trainer(tiny_config(tmp_path / "c", **KW)).fit()
    Trainer(tiny_config(tmp_path / "c", train__steps=2, **{k: v for k, v in KW.items() if k != "train__steps"}),
            overwrite=True).fit()
    assert [r["step"] for r in read_samples(tmp_path / "c")] == [1, 2]


def test_measured_parameter_cosines_are_logged_beside_the_feature_level_ones(tmp_path) -> None:
    # harmony.measure_param_every=2: steps 2 and 4 carry "cos_param", the StepOutput's cosines in the batch's order
    tr = Trainer(tiny_config(tmp_path, harmony__measure_param_every=2, **KW))
    outs: dict[int, object] = {}
    step = tr.train_step

    def spy(batch):
        res = step(batch)
        outs[tr.state.step + 1] = res
        return res

    tr.train_step = spy
    tr.fit()
    recs = read_samples(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert ["cos_param" in r for r in recs] == [False, True, False, True]
    for r in recs:
        res = outs[r["step"]]
        np.testing.assert_allclose(r["cos"], res.stats.score.double().numpy(), atol=1e-4)
        if "cos_param" in r:
            assert len(r["cos_param"]) == len(r["cos"]) == tr.cfg.train.batch_size
            np.testing.assert_allclose(r["cos_param"], res.cos_param.double().numpy(), atol=1e-4)
            assert not np.allclose(r["cos_param"], r["cos"], atol=1e-3)  # another level, not a copy
    # without the option no record has the column
    Trainer(tiny_config(tmp_path / "off", **KW)).fit()
    assert not any("cos_param" in r for r in read_samples(tmp_path / "off"))
