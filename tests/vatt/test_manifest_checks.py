"""Every value the manifest format does not allow is an error at open time naming line, file and problem,
or a skipped and counted clip under --skip-bad."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
import pytest

from gradharmony.vatt.cli import main
from gradharmony.vatt.config import DataConfig
from gradharmony.vatt.data import DataError
from gradharmony.vatt.manifest import ManifestDataset

from .conftest import read_metrics, tiny_argv
from .test_data import make_clips, write_jsonl

CFG = DataConfig(frames=4, size=16, audio_samples=256, num_narrations=2, max_text_len=8)


def _wav_rate_0(root: str, row: dict[str, Any]) -> str:
    path = os.path.join(root, row["audio"])  # row 2 has a .wav (make_clips: even rows)
    with open(path, "r+b") as f:
        f.seek(24)  # the sample-rate field of the canonical 44-byte header
        f.write((0).to_bytes(4, "little"))
    return "wav sample rate is 0 Hz"


def _npy(name: str, arr: np.ndarray, key: str, message: str) -> Callable[[str, dict[str, Any]], str]:
    def make(root: str, row: dict[str, Any]) -> str:
        np.save(os.path.join(root, "clips", name), arr)
        row[key] = f"clips/{name}"
        return message

    return make


def _field(key: str, value: Any, message: str) -> Callable[[str, dict[str, Any]], str]:
    def make(root: str, row: dict[str, Any]) -> str:
        row[key] = value
        return message

    return make


nan_frames = np.random.default_rng(1).random((4, 8, 8, 3)).astype(np.float32)
nan_frames[2, 3, 3, 1] = np.nan
inf_audio = np.zeros(300, np.float32)
inf_audio[7] = np.inf

BAD = {
    "wav_rate_0": _wav_rate_0,
    "misaligned_2": _field("misaligned", 2, "'misaligned' must be 0 or 1, got 2"),
    "misaligned_neg": _field("misaligned", -1, "'misaligned' must be 0 or 1, got -1"),
    "misaligned_text": _field("misaligned", "yes", "'misaligned' must be an integer, got 'yes'"),
    "misaligned_bool": _field("misaligned", True, "'misaligned' must be an integer, got True"),
    "label_negative": _field("label", -3, "'label' must be an integer >= 0, got -3"),
    "label_fraction": _field("label", 1.5, "'label' must be an integer, got 1.5"),
    "id_list": _field("id", [1], "'id' must be a non-empty string or an integer"),
    "id_empty": _field("id", " ", "'id' must be a non-empty string or an integer"),
    "captions_number": _field("captions", 5, "'captions' must be a list of strings, got 5"),
    "captions_empty": _field("captions", [], "empty caption"),
    "caption_not_text": _field("captions", ["ok", 3], "empty caption (caption 2 is 3)"),
    "video_path_number": _field("video", 7, "missing 'video' path"),
    "nan_frames": _npy("nan.npy", nan_frames, "video", "non-finite values (NaN/inf) in video frames"),
    "int16_frames": _npy("i16.npy", np.ones((4, 8, 8, 3), np.int16), "video", "must be uint8 or float, got dtype int16"),
    "empty_frames": _npy("e.npy", np.ones((0, 8, 8, 3), np.uint8), "video", "wrong shape (0, 8, 8, 3)"),
    "inf_audio": _npy("inf.npy", inf_audio, "audio", "non-finite values (NaN/inf) in audio"),
    "int_audio": _npy("ia.npy", np.ones(300, np.int16), "audio", "must be a float waveform, got dtype int16"),
    "stereo_npy_audio": _npy("st.npy", np.ones((300, 2), np.float32), "audio", "wrong shape (300, 2) for audio"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_value_is_an_error_naming_line_file_and_problem(tmp_path, kind: str) -> None:
    root = str(tmp_path)
    rows = make_clips(root, n=4)
    message = BAD[kind](root, rows[2])
    path = write_jsonl(root, rows)
    with pytest.raises(DataError) as e:
        ManifestDataset(path, CFG)
    msg = str(e.value)
    assert message in msg and f"{path} line 3" in msg, msg
    ds = ManifestDataset(path, CFG, skip_bad=True)  # --skip-bad: skipped and counted, the rest loads
    assert len(ds) == 3 and len(ds.skipped) == 1 and message in ds.skipped[0]
    for i in range(len(ds)):
        clip = ds[i]
        assert np.isfinite(clip["video"]).all() and np.isfinite(clip["audio"]).all()


def test_csv_row_with_more_fields_than_the_header(tmp_path) -> None:
    root = str(tmp_path)
    rows = make_clips(root, n=3)
    path = os.path.join(root, "train.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,video,audio,captions,label,misaligned\n")
        for i, r in enumerate(rows):
            extra = ",surplus" if i == 1 else ""
            f.write(f"{r['id']},{r['video']},{r['audio']},{'|'.join(r['captions'])},{r['label']},{r['misaligned']}{extra}\n")
    with pytest.raises(DataError, match=r"train\.csv line 3: more fields than the CSV header"):
        ManifestDataset(path, CFG)


def test_skip_bad_count_is_printed_and_written(tmp_path, capsys) -> None:
    root = str(tmp_path / "data")
    rows = make_clips(root, n=11)
    BAD["wav_rate_0"](root, rows[2])
    BAD["nan_frames"](root, rows[5])
    BAD["misaligned_2"](root, rows[7])
    manifest = write_jsonl(root, rows)
    out = tmp_path / "run"
    argv = tiny_argv(str(out)) + ["--data", manifest, "--batch-size", "4", "--set", "train.batch_size=4"]
    assert main(argv) == 2  # without --skip-bad: the first bad row stops it at the door
    err = capsys.readouterr().err
    assert "line 3" in err and "wav sample rate is 0 Hz" in err and "Traceback" not in err, err
    assert main(argv + ["--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "--skip-bad: 3 bad clips skipped" in printed and "data/skipped" in printed, printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data/skipped"] == 3
    assert [r["data/skipped"] for r in read_metrics(str(out)) if "data/skipped" in r] == [3]


def test_fewer_clips_than_one_batch_exits_2(tmp_path, capsys) -> None:
    root = str(tmp_path / "data")
    rows = make_clips(root, n=6, bad={0: "missing", 1: "caption"})
    manifest = write_jsonl(root, rows)
    argv = tiny_argv(str(tmp_path / "run")) + ["--data", manifest, "--skip-bad"]  # batch 8
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{manifest}: 4 usable clips (2 skipped) is fewer than one batch (--batch-size 8)" in err, err
    assert "Traceback" not in err
