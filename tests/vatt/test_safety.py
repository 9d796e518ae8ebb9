"""Checkpoints never run code and detect corruption; the run folder survives torn writes, kills and full disks."""
from __future__ import annotations

import errno
import json
import os
import pickle
from datetime import timedelta

import pytest
import torch

from gradharmony.vatt.checkpoint import list_checkpoints, load_checkpoint, load_model
from gradharmony.vatt.cli import main
from gradharmony.vatt.config import ConfigError

from .conftest import read_metrics, tiny_argv


class _RunsCode:
    """Unpickling this calls os.makedirs(marker): what a crafted checkpoint could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _crafted(path: str, marker: str, raw: bool) -> None:
    payload = {k: {} for k in ("model", "optimizer", "scheduler", "harmony", "rng", "sampler", "tracker",
                               "meter", "train_state")}
    payload["x"] = _RunsCode(marker)
    if raw:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)


@pytest.mark.parametrize("raw", [False, True])
def test_crafted_checkpoint_runs_no_code(tmp_path, capsys, raw: bool) -> None:
    marker = str(tmp_path / "pwned")
    # handed to --resume
    evil = str(tmp_path / "evil.pt")
    _crafted(evil, marker, raw)
    assert main(tiny_argv(str(tmp_path / "a")) + ["--resume", evil]) == 2
    err = capsys.readouterr().err
    assert "evil.pt: not a readable checkpoint" in err and "Traceback" not in err, err
    # planted where --resume latest finds it
    out = tmp_path / "b"
    (out / "checkpoints").mkdir(parents=True)
    _crafted(str(out / "checkpoints" / "step_00000009.pt"), marker, raw)
    assert main(tiny_argv(str(out)) + ["--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "step_00000009.pt: not a readable checkpoint" in err, err
    assert not os.path.exists(marker)
    # the check that matters: the same file does run code when loaded unsafely
    if not raw:
        torch.load(evil, weights_only=False)
        assert os.path.exists(marker)


def _flip_byte_in_tensor(path: str) -> None:
    ck = torch.load(path, weights_only=True)
    t = max(ck["model"].values(), key=lambda v: v.numel())
    data = t.contiguous().numpy().tobytes()
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    at = raw.find(data)
    assert at >= 0
    raw[at + len(data) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(bytes(raw))


def test_flipped_byte_in_a_stored_tensor_is_an_error_naming_the_file(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = tiny_argv(str(out)) + ["--set", "train.steps=4", "--stop-after", "2"]
    assert main(argv) == 0
    path = list_checkpoints(str(out / "checkpoints"))[-1]
    load_checkpoint(path)  # intact: loads
    _flip_byte_in_tensor(path)
    with pytest.raises(ConfigError, match="does not match its stored SHA-256"):
        load_checkpoint(path)
    capsys.readouterr()
    assert main(tiny_argv(str(out)) + ["--set", "train.steps=4", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "step_00000002.pt: content does not match its stored SHA-256" in err, err


def test_load_model_from_a_checkpoint(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(tiny_argv(str(out))) == 0
    path = list_checkpoints(str(out / "checkpoints"))[-1]
    model, cfg, tok = load_model(path)
    assert cfg.model.d_model == 16 and not model.training
    from gradharmony.vatt.synthetic import DigitsAVT
    from gradharmony.vatt.data import load_batch

    ds = DigitsAVT(cfg.data, "eval", cfg.train.seed)
    assert tok.vocab == ds.tokenizer.vocab
    with torch.no_grad():
        z = model(load_batch(ds, range(4)))
    ck = torch.load(path, weights_only=True)
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
    assert z["z_v_va"].shape == (4, cfg.model.va_dim) and torch.isfinite(z["z_v_va"]).all()


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = tiny_argv(str(out)) + ["--set", "train.steps=4"]
    assert main(argv + ["--stop-after", "2"]) == 0
    with open(out / "metrics.jsonl", "ab") as f:  # power loss during the next append: torn + NUL padding
        f.write(b'{"step": 3, "train/lo' + b"\x00" * 37)
    capsys.readouterr()
    assert main(argv + ["--resume", "latest"]) == 0
    err = capsys.readouterr().err
    assert "unparseable last record dropped" in err and "Traceback" not in err, err
    assert [r["step"] for r in read_metrics(str(out)) if "train/loss" in r] == [1, 2, 3, 4]


def test_unparseable_metrics_line_before_the_last_exits_2(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = tiny_argv(str(out)) + ["--set", "train.steps=4"]
    assert main(argv + ["--stop-after", "2"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, "{garbage")
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(argv + ["--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line 2: unparseable" in err and "Traceback" not in err, err


def test_resuming_a_finished_run_adds_no_second_final_eval(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = tiny_argv(str(out)) + ["--resume", "latest"]
    for _ in range(3):  # the quick-start command, run three times
        assert main(argv) == 0
    evals = [r["step"] for r in read_metrics(str(out)) if "eval/v2t_R@1" in r]
    assert evals == [2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and "eval/v2t_R@1" in summary


def test_stale_tmp_checkpoint_files_are_removed(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = tiny_argv(str(out)) + ["--set", "train.steps=4"]
    assert main(argv + ["--stop-after", "2"]) == 0
    stale = out / "checkpoints" / ".tmp_k1ll3d.pt"
    stale.write_bytes(b"half a checkpoint")
    stale_metrics = out / ".tmp_metrics_k1ll3d"
    stale_metrics.write_text('{"step": 1}\n')
    assert main(argv + ["--resume", "latest"]) == 0
    assert not stale.exists() and not stale_metrics.exists()
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002.pt", "step_00000004.pt"]


def test_out_under_a_file_exits_2_naming_out(tmp_path, capsys) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(tiny_argv(str(f / "run"))) == 2
    err = capsys.readouterr().err
    assert "--out:" in err and "cannot write the run folder" in err and "Traceback" not in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_out_exits_2_naming_out(tmp_path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(tiny_argv(str(ro / "run"))) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err
    assert "--out:" in err and "Traceback" not in err, err


def test_permission_denied_on_out_exits_2_naming_out(tmp_path, capsys, monkeypatch) -> None:
    # what a read-only parent folder does for a non-root user (root ignores permissions)
    ro = str(tmp_path / "ro")
    real = os.makedirs

    def makedirs(name, *a, **kw):
        if str(name).startswith(ro):
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real(name, *a, **kw)

    monkeypatch.setattr(os, "makedirs", makedirs)
    assert main(tiny_argv(os.path.join(ro, "run"))) == 2
    err = capsys.readouterr().err
    assert f"--out: {ro}/run: cannot write the run folder (Permission denied: {ro}/run)" in err, err


def test_full_disk_at_the_start_exits_2_naming_out(tmp_path, capsys) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink("/dev/full", out / "config.json")  # every write to it fails with ENOSPC
    assert main(tiny_argv(str(out))) == 2
    err = capsys.readouterr().err
    assert "--out:" in err and "No space left" in err and "Traceback" not in err, err


def test_full_disk_during_the_run_exits_3_saying_what_was_kept(tmp_path, capsys, monkeypatch) -> None:
    from gradharmony.vatt import checkpoint

    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    out = tmp_path / "run"
    assert main(tiny_argv(str(out)) + ["--set", "train.steps=4", "--set", "train.ckpt_every=2"]) == 3
    err = capsys.readouterr().err
    assert "no space left" in err and "step_00000002.pt" in err and "kept:" in err and "Traceback" not in err, err
    assert os.listdir(out / "checkpoints") == ["step_00000002.pt"]  # no half-written file left


def test_ddp_process_group_gets_the_configured_timeout(monkeypatch) -> None:
    import torch.distributed as dist

    from gradharmony.vatt import distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    ctx = distributed.init_distributed("cpu", timeout_s=42.0)
    assert ctx.world_size == 2 and seen == {"backend": "gloo", "timeout": timedelta(seconds=42)}
    distributed.init_distributed("cpu")
    assert seen["timeout"] == timedelta(seconds=600)
