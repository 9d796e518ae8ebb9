"""Parameter level in the trainer: ParameterHarmonizer by default, the term option, and the measure-only cosines."""
from __future__ import annotations

import pytest
import torch

import gradharmony as gh
from gradharmony.vatt.config import ConfigError
from gradharmony.vatt.trainer import Trainer

from .conftest import tiny_config


def test_parameter_level_uses_the_parameter_harmonizer_unless_term(tmp_path) -> None:
    tr = Trainer(tiny_config(tmp_path / "p", harmony__level="parameter"))
    assert isinstance(tr.ph, gh.ParameterHarmonizer) and tr.hopt is None and tr.harmony is tr.ph
    tr = Trainer(tiny_config(tmp_path / "t", harmony__level="parameter", harmony__param_decomposition="term"))
    assert isinstance(tr.hopt, gh.HarmonizedOptimizer) and tr.ph is None and tr.harmony is tr.hopt
    res = tr.train_step(tr.next_batch()[0])
    assert res.stats is not None and res.stats.cos.shape == (8, 2, 2)


@pytest.mark.parametrize("key,value,msg", [
    ("harmony__param_decomposition", "layer", "must be one of path, term"),
    ("harmony__measure_param_every", -1, "must be >= 0"),
    ("harmony__measure_param_every", 2, "needs harmony.level feature"),
])
def test_bad_parameter_options_are_named(tmp_path, key, value, msg) -> None:
    extra = {"harmony__level": "parameter"} if key.endswith("every") and value > 0 else {}
    with pytest.raises(ConfigError, match=key.replace("__", r"\.") + ": " + msg):
        tiny_config(tmp_path, **{key: value}, **extra)


def _steps(cfg, n):
    tr = Trainer(cfg)
    out = []
    for _ in range(n):
        batch, _ = tr.next_batch()
        out.append(tr.train_step(batch))
        tr.state.step += 1
    return tr, out


def test_measured_parameter_cosines_leave_the_update_unchanged(tmp_path) -> None:
    kw = dict(model__drop_token=0.5, model__dropout=0.1, harmony__method="gradvac", harmony__curriculum="fraction",
              harmony__curriculum_warmup=0.0)
    plain, po = _steps(tiny_config(tmp_path / "a", **kw), 3)
    meas, mo = _steps(tiny_config(tmp_path / "b", harmony__measure_param_every=2, **kw), 3)
    assert [r.cos_param is None for r in mo] == [True, False, True] and all(r.cos_param is None for r in po)
    c = mo[1].cos_param
    assert c.shape == (8,) and bool(((c >= -1) & (c <= 1)).all()) and float(c.std()) > 0
    assert [r.loss for r in po] == [r.loss for r in mo]
    for a, b in zip(po, mo):
        assert torch.equal(a.stats.cos, b.stats.cos) and torch.equal(a.stats.sample_weights, b.stats.sample_weights)
    for k, v in plain.raw_model.state_dict().items():
        assert torch.equal(v, meas.raw_model.state_dict()[k]), k
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in meas.raw_model.parameters())


def test_measured_cosines_are_the_parameter_level_cosines_of_the_same_batch(tmp_path) -> None:
    # step 1 from the same initial weights and RNG: the feature-level run's measured cosines equal the
    # cosines a parameter-level run harmonizes with (same Gram, same DropToken and dropout draws)
    kw = dict(model__drop_token=0.5, model__dropout=0.1, harmony__curriculum="off")
    _, mo = _steps(tiny_config(tmp_path / "f", harmony__measure_param_every=1, **kw), 1)
    _, po = _steps(tiny_config(tmp_path / "p", harmony__level="parameter", **kw), 1)
    torch.testing.assert_close(mo[0].cos_param, po[0].stats.cos[:, 0, 1].float(), rtol=1e-4, atol=1e-5)
    # and they are not the feature-level cosines
    assert not torch.allclose(mo[0].cos_param, mo[0].stats.cos[:, 0, 1].float(), atol=1e-3)
