"""Command line: option / config errors name the option; a manifest run end to end; resume errors."""
from __future__ import annotations

import json
import os

import pytest

from gradharmony.vatt.cli import main
from gradharmony.vatt.config import ConfigError, build_config

from .conftest import tiny_argv
from .test_data import make_clips, write_jsonl


@pytest.mark.parametrize("argv,message", [
    (["--preset", "huge"], "--preset: unknown preset 'huge'"),
    (["--method", "avg"], "--method (harmony.method): must be one of sum, pcgrad, gradvac"),
    (["--steps", "abc"], "--steps (train.steps): expected an integer, got 'abc'"),
    (["--steps", "0"], "--steps (train.steps): must be >= 1"),
    (["--batch-size", "1"], "--batch-size (train.batch_size): must be >= 2"),
    (["--level", "layer"], "--level (harmony.level): must be one of feature, parameter, none"),
    (["--curriculum", "fraction", "--curriculum-start", "1.5"], "--curriculum-start (harmony.curriculum_start)"),
    (["--misaligned-fraction", "2"], "--misaligned-fraction (data.misaligned_fraction): must be in [0, 1]"),
    (["--set", "train.nope=1"], "unknown option 'train.nope'"),
    (["--set", "train.steps"], "--set: expected SECTION.FIELD=VALUE"),
    (["--set", "model.video_patch=3,8,8"], "model.video_patch: temporal patch 3 must divide data.frames=8"),
    (["--config", "/nonexistent.json"], "--config: file not found"),
    (["--level", "none", "--curriculum", "fraction"], "--curriculum (harmony.curriculum): needs harmony.level"),
    # regression: --eval-data without --data was silently ignored (a full run, exit 0)
    (["--eval-data", "/nonexistent.jsonl"], "--eval-data (data.eval_manifest): needs data.manifest (--data)"),
    # regression: inf passed every range check (--lr inf ran and died with a NaN loss, exit 1)
    (["--lr", "inf"], "--lr (train.lr): expected a finite number, got 'inf'"),
    (["--set", "model.temperature=inf"], "model.temperature: expected a finite number"),
])
def test_bad_options_exit_2_naming_the_option(argv: list[str], message: str, capsys) -> None:
    assert main(argv + ["--print-config"]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_config_file_json_and_precedence(tmp_path, capsys) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"preset": "small", "train": {"steps": 7, "lr": 0.01}, "harmony": {"method": "gradvac"}}))
    assert main(["--config", str(p), "--steps", "9", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "small" and cfg["model"]["d_model"] == 256
    assert cfg["train"]["steps"] == 9 and cfg["train"]["lr"] == 0.01 and cfg["harmony"]["method"] == "gradvac"


@pytest.mark.parametrize("content,message", [
    ('{"train": {"stepz": 3}}', "unknown option 'train.stepz'"),
    ('{"trainer": {}}', "unknown section 'trainer'"),
    ('{"train": {"steps": "x"}}', "train.steps: expected an integer"),
    ("{not json", "invalid JSON"),
])
def test_bad_config_files(tmp_path, content: str, message: str) -> None:
    p = tmp_path / "c.json"
    p.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(file=str(p))


def test_bad_key_in_config_file_names_the_file(tmp_path, capsys) -> None:
    # regression: an unknown key or a badly typed value in --config named the key but not the file
    for content, message in [('{"train": {"stepz": 3}}', "unknown option 'train.stepz'"),
                             ('{"train": {"steps": "x"}}', "train.steps: expected an integer")]:
        p = tmp_path / "c.json"
        p.write_text(content)
        assert main(["--config", str(p), "--print-config"]) == 2
        err = capsys.readouterr().err
        assert f"{p}: {message}" in err and "Traceback" not in err, err


def test_optional_fields_coerce_without_types_uniontype(monkeypatch) -> None:
    # regression: _coerce referenced types.UnionType (Python 3.10+) although the package
    # declares Python >= 3.9, so every Optional field (e.g. --stop-after) failed on 3.9
    import types

    from gradharmony.vatt import config

    # the config module's view of ``types`` as on 3.9 (typing itself needs the real one)
    monkeypatch.setattr(config, "types", types.SimpleNamespace())
    cfg = build_config(overrides={"train.stop_after": "5", "data.manifest": "none"})
    assert cfg.train.stop_after == 5 and cfg.data.manifest is None


def test_yaml_needs_pyyaml_or_works(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="PyYAML is not installed"):
            build_config(file=str(p))
    else:
        assert build_config(file=str(p)).train.steps == 5


def test_cli_run_on_a_manifest_then_resume_errors(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    rows = make_clips(str(data), n=13, bad={12: "missing"})  # 12 good: one batch of 8 + 4 held out
    manifest = write_jsonl(str(data), rows)
    out = tmp_path / "run"
    argv = ["--data", manifest, "--skip-bad", "--steps", "2", "--batch-size", "4", "--method", "pcgrad"]
    argv = tiny_argv(str(out)) + argv
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and "eval/v2t_R@1" in summary
    assert "eval/probe_acc" in summary  # labels known: probe on half of the eval clips
    assert summary["eval_data"].startswith("held out")  # no --eval-data: never-trained-on clips
    # a second fresh run into the same folder is refused, resume of a missing checkpoint too
    assert main(argv) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(argv + ["--resume", str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # finished run resumed: nothing left to do, still exits 0
    assert main(argv + ["--resume", "latest"]) == 0
    # regression: resuming with other model options was a load_state_dict traceback (exit 1)
    assert main(argv + ["--resume", "latest", "--set", "model.d_model=32"]) == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "model.d_model=32" in err and "Traceback" not in err, err


def test_cli_bad_manifest_exits_2(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    manifest = write_jsonl(str(data), make_clips(str(data), n=4, bad={1: "caption"}))
    assert main(tiny_argv(str(tmp_path / "run")) + ["--data", manifest]) == 2
    err = capsys.readouterr().err
    assert "line 2: empty caption" in err and os.path.basename(manifest) in err


def test_cli_missing_eval_manifest_exits_2_naming_it(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    manifest = write_jsonl(str(data), make_clips(str(data), n=4))
    missing = str(tmp_path / "nope" / "eval.jsonl")
    assert main(tiny_argv(str(tmp_path / "run")) + ["--data", manifest, "--eval-data", missing]) == 2
    err = capsys.readouterr().err
    assert missing in err and "manifest not found" in err and "Traceback" not in err, err


def test_out_that_is_a_file_exits_2(tmp_path, capsys) -> None:
    # regression: --out naming an existing file was a FileExistsError traceback (exit 1)
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(tiny_argv(str(f))) == 2
    err = capsys.readouterr().err
    assert "train.out" in err and "is not a folder" in err and "Traceback" not in err, err


def test_unreadable_or_foreign_checkpoint_exits_2(tmp_path, capsys) -> None:
    # regression: a corrupt checkpoint or a plain state dict given to --resume was an
    # UnpicklingError / KeyError traceback (exit 1, the NaN-loss code)
    import torch

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000003.pt").write_bytes(b"junk")
    assert main(tiny_argv(str(out)) + ["--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "step_00000003.pt: not a readable checkpoint" in err and "Traceback" not in err, err
    sd = tmp_path / "weights.pt"
    torch.save({"model": {}}, str(sd))
    assert main(tiny_argv(str(tmp_path / "run2")) + ["--resume", str(sd)]) == 2
    err = capsys.readouterr().err
    assert "weights.pt: not a gradharmony-pretrain checkpoint (missing optimizer" in err, err
