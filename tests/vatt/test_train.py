"""Training smoke tests per method and level, bit-for-bit resume, NaN stop, evaluation outputs."""
from __future__ import annotations

import math
import os

import pytest
import torch

from gradharmony.vatt.checkpoint import list_checkpoints, load_checkpoint
from gradharmony.vatt.trainer import Trainer

from .conftest import read_metrics, tiny_config


@pytest.mark.parametrize("method,level,curriculum", [
    ("sum", "feature", "off"), ("pcgrad", "feature", "fraction"), ("gradvac", "feature", "threshold"),
    ("pcgrad", "parameter", "fraction"), ("sum", "parameter", "off"), ("gradvac", "parameter", "off"),
    ("sum", "none", "off"),
])
def test_two_steps_per_method_and_level(tmp_path, method: str, level: str, curriculum: str) -> None:
    cfg = tiny_config(tmp_path, harmony__method=method, harmony__level=level, harmony__curriculum=curriculum)
    before = {k: v.clone() for k, v in Trainer(cfg, overwrite=True).raw_model.state_dict().items()}
    tr = Trainer(cfg)
    summary = tr.fit()
    assert summary["status"] == "completed" and summary["step"] == 2
    recs = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) for r in recs) and all("loss" not in r for r in recs)
    if level == "none":
        assert "train/conflict_fraction" not in recs[0]
    else:
        assert 0.0 <= recs[0]["train/conflict_fraction"] <= 1.0
        assert sum(recs[0]["train/score_hist"]) == cfg.train.batch_size
        assert "train/conflict/cos_q50" in recs[0]
    changed = any(not torch.equal(before[k], v) for k, v in tr.raw_model.state_dict().items())
    assert changed
    ckpts = list_checkpoints(os.path.join(str(tmp_path), "checkpoints"))
    assert len(ckpts) == 1
    load_checkpoint(ckpts[0])  # every rule's and level's state loads with weights_only=True, hash intact
    assert "eval/v2t_R@1" in summary and "eval/probe_acc" in summary


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_resume_is_bit_for_bit(tmp_path, level: str) -> None:
    kw = dict(train__steps=4, harmony__method="gradvac", harmony__curriculum="fraction", harmony__level=level,
              harmony__curriculum_warmup=0.0, harmony__curriculum_ramp=1.0, model__drop_token=0.5,
              model__dropout=0.1)
    straight = Trainer(tiny_config(tmp_path / "a", **kw))
    straight.fit()
    Trainer(tiny_config(tmp_path / "b", train__stop_after=2, **kw)).fit()
    assert [r["step"] for r in read_metrics(str(tmp_path / "b")) if "train/loss" in r] == [1, 2]
    resumed = Trainer(tiny_config(tmp_path / "b", train__resume="latest", **kw))
    resumed.fit()
    la = [(r["step"], r["train/loss"], r["train/score_mean"]) for r in read_metrics(str(tmp_path / "a")) if "train/loss" in r]
    lb = [(r["step"], r["train/loss"], r["train/score_mean"]) for r in read_metrics(str(tmp_path / "b")) if "train/loss" in r]
    assert la == lb and len(la) == 4
    for k, v in straight.raw_model.state_dict().items():
        assert torch.equal(v, resumed.raw_model.state_dict()[k]), k
    ck = load_checkpoint(list_checkpoints(str(tmp_path / "b" / "checkpoints"))[-1])
    assert {"model", "optimizer", "scheduler", "harmony", "rng", "sampler", "train_state"} <= set(ck)
    # the curriculum is saved once (inside the harmonizer's state) and stepped once per step
    assert "curriculum" not in ck and ck["harmony"]["curriculum"]["step_count"] == 4 and ck["sampler"]["cursor"] > 0


def test_resume_with_incompatible_options_names_them(tmp_path) -> None:
    # regression: resuming with another model / method / level / batch size / step count
    # died deep in load_state_dict with a traceback (exit 1, the NaN-loss code) or, for
    # --method, silently loaded one rule's state into another
    from gradharmony.vatt.config import ConfigError

    Trainer(tiny_config(tmp_path, train__steps=4, train__stop_after=1)).fit()
    for key, value in [("model__d_model", 32), ("harmony__method", "gradvac"), ("harmony__level", "parameter"),
                       ("train__batch_size", 4), ("train__steps", 8), ("train__seed", 1)]:
        cfg = tiny_config(tmp_path, **{"train__steps": 4, "train__resume": "latest", key: value})
        with pytest.raises(ConfigError, match=r"--resume: .*step_00000001\.pt.*" + key.replace("__", r"\.")):
            Trainer(cfg).fit()
    # session options (cadence, lr after a NaN stop, threads) may change
    cfg = tiny_config(tmp_path, train__steps=4, train__resume="latest", train__lr=1e-4, train__log_every=2,
                      train__stop_after=1, train__threads=1, harmony__chunk_size=4)
    assert Trainer(cfg).fit()["step"] == 2


def test_resume_with_a_lower_lr_uses_it(tmp_path) -> None:
    # regression: the advice after a NaN stop is "--resume latest with a lower --lr", but
    # optimizer/scheduler load_state_dict restored the saved peak lr and ignored the new one
    Trainer(tiny_config(tmp_path, train__steps=4, train__stop_after=2)).fit()
    tr = Trainer(tiny_config(tmp_path, train__steps=4, train__resume="latest", train__lr=1e-5,
                             train__weight_decay=0.01, train__stop_after=1))
    tr.fit()
    assert tr.scheduler.base_lrs == [1e-5]
    g = tr.optimizer.param_groups[0]
    assert g["initial_lr"] == 1e-5 and g["weight_decay"] == 0.01 and 0 < g["lr"] <= 1e-5
    assert tr.scheduler.get_last_lr() == [g["lr"]]
    lrs = [r["train/lr"] for r in read_metrics(str(tmp_path)) if "train/lr" in r]
    assert lrs[-1] == g["lr"] and lrs[0] > 1e-5  # the first session ran at the preset lr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys) -> None:
    cfg = tiny_config(tmp_path, train__steps=6, train__ckpt_every=2)
    tr = Trainer(cfg)
    calls = {"n": 0}
    orig = tr.compute_losses

    def poisoned(out, mask):
        calls["n"] += 1
        l_va, l_vt = orig(out, mask)
        return (l_va * float("nan"), l_vt) if calls["n"] == 3 else (l_va, l_vt)

    monkeypatch.setattr(tr, "compute_losses", poisoned)
    summary = tr.fit()
    assert summary["status"] == "nonfinite" and summary["step"] == 2
    ckpts = list_checkpoints(os.path.join(str(tmp_path), "checkpoints"))
    assert [os.path.basename(p) for p in ckpts] == ["step_00000002.pt"]
    out = capsys.readouterr().out
    assert "non-finite loss" in out and "at step 3" in out and "step_00000002.pt" in out
    assert read_metrics(str(tmp_path))[-1]["train/nonfinite"] == 1.0


def test_eval_and_plots_are_written(tmp_path) -> None:
    cfg = tiny_config(tmp_path, train__steps=3, train__eval_every=2, train__plots=True)
    summary = Trainer(cfg).fit()
    evals = [r for r in read_metrics(str(tmp_path)) if "eval/v2t_R@1" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]  # the untrained model too
    for key in ("eval/v2t_R@5", "eval/t2v_median_rank", "eval/v2a_R@10", "eval/a2v_class_R@1", "eval/probe_acc",
                "eval/auroc_conflict", "eval/auroc_conflict_pass", "eval/chance/v2t_R@5",
                "eval/chance_within_class/a2v_R@10", "eval/chance/t2v_class_R@1", "eval/chance/probe_acc"):
        assert key in summary, key
    assert 0.0 <= summary["eval/auroc_conflict"] <= 1.0 and 0.0 <= summary["eval/auroc_conflict_pass"] <= 1.0
    names = sorted(os.path.basename(p) for p in summary["plots"])
    assert names == ["conflict_hist.png", "cosine_by_alignment.png", "kept_fraction.png", "losses.png",
                     "retrieval.png"]
    assert "embedded eval split" in summary["eval_data"]
    # per-sample cosines split by ground truth: every training sample of an interval in one of the two
    logs = [r for r in read_metrics(str(tmp_path)) if "train/score_hist" in r]
    for r in logs:
        both = [a + b for a, b in zip(r.get("train/score_hist_aligned", [0] * 20),
                                      r.get("train/score_hist_misaligned", [0] * 20))]
        assert both == r["train/score_hist"], r
    assert any("train/score_hist_misaligned" in r for r in logs)
    assert os.path.exists(os.path.join(str(tmp_path), "summary.json"))


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path, capsys) -> None:
    summary = Trainer(tiny_config(tmp_path, train__steps=1, train__resume="latest")).fit()
    assert summary["status"] == "completed" and summary["step"] == 1
    assert "starting from scratch" in capsys.readouterr().out
