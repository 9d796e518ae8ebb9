"""What a new user meets first: the runnable example, --help, the first backend load."""
from __future__ import annotations

import math
import os
import runpy
import time

import pytest

from gradharmony.vatt.cli import main

from .conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "harmonize_in_a_model.py")


def test_readme_usage_example_runs_as_a_script_and_learns(capsys) -> None:
    ns = runpy.run_path(EXAMPLE, run_name="__main__")  # = python examples/harmonize_in_a_model.py
    out = capsys.readouterr().out
    losses = [float(ln.split("loss")[1].split()[0]) for ln in out.splitlines() if "loss" in ln]
    chance = math.log(ns["B"])  # InfoNCE at initialisation is about log(B)
    assert len(losses) == 2 and all(0 < v < 0.6 * chance for v in losses), out
    assert "feature level" in out and "parameter level" in out


def test_help_shows_defaults_choices_and_exit_codes(capsys) -> None:
    from gradharmony import rules as gh_rules

    assert "upgrad" in gh_rules.RULE_NAMES  # the choices come from the rule registry
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--steps STEPS total optimizer steps (default: 600)",
                 f"one of {', '.join(gh_rules.RULE_NAMES)} (default: pcgrad)",
                 "one of feature, parameter, none (default: feature)",
                 "one of off, fraction, threshold (default: fraction)",
                 "one of tiny, small, base", "(default: 0.002)", "3 a write to the run folder failed"):
        assert text in out, text


def test_backend_load_is_announced_and_not_counted_as_training_time(tmp_path, monkeypatch, capsys) -> None:
    import gradharmony as gh
    from gradharmony.vatt import trainer
    from gradharmony.vatt.trainer import Trainer

    order = []
    real = gh.harmonize

    def slow_first_load(*a, **kw):  # what a first JIT build looks like to the trainer
        order.append("load")
        time.sleep(1.0)
        return real(*a, **kw)

    monkeypatch.setattr(gh, "harmonize", slow_first_load)
    monkeypatch.setattr(trainer, "_backend_needs_build", lambda: True)  # no prebuilt module, nothing cached
    tr = Trainer(tiny_config(tmp_path, train__steps=2))
    real_step = tr.train_step
    monkeypatch.setattr(tr, "train_step", lambda b: (order.append("step"), real_step(b))[1])
    summary = tr.fit()
    assert order == ["load", "step", "step"]
    assert summary["backend_load_s"] >= 1.0 and summary["train_time_s"] < 1.0, summary
    assert "compiling the C++ extension" in capsys.readouterr().out
