"""Embedded data determinism, tokenizer, sampler, and the manifest loader's good and bad paths."""
from __future__ import annotations

import json
import os
import wave

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradharmony.vatt.config import DataConfig
from gradharmony.vatt.data import DataError, EpochBatchSampler, WordTokenizer, collate
from gradharmony.vatt.manifest import ManifestDataset, read_wav
from gradharmony.vatt.synthetic import DigitsAVT

CFG = DataConfig(frames=4, size=16, audio_samples=256, num_narrations=2, max_text_len=8, train_size=64,
                 eval_size=16, misaligned_fraction=0.5)


# ---------------------------------------------------------------- embedded data

def test_digits_clips_are_deterministic_and_typed() -> None:
    a, b = DigitsAVT(CFG, "train", seed=3), DigitsAVT(CFG, "train", seed=3)
    for i in (0, 7, 63):
        ca, cb = a[i], b[i]
        for k in ("video", "audio", "text", "text_mask"):
            np.testing.assert_array_equal(ca[k], cb[k])
    c = a[5]
    assert c["video"].shape == (3, 4, 16, 16) and c["video"].dtype == np.float32
    assert c["audio"].shape == (256,) and np.abs(c["audio"]).max() <= 1.0
    assert c["text"].shape == (2, 8) and c["text_mask"].all()
    assert not np.array_equal(DigitsAVT(CFG, "train", seed=4)[5]["video"], c["video"])


def test_digits_ground_truth_matches_clips_and_fraction() -> None:
    ds = DigitsAVT(CFG, "train", seed=0)
    labels, mis = ds.ground_truth()
    for i in range(len(ds)):
        clip = ds[i]
        assert clip["label"] == labels[i] and clip["misaligned"] == mis[i]
        assert (clip["noise_kind"] > 0) == bool(mis[i])
    assert 0.3 < mis.mean() < 0.7
    assert DigitsAVT(CFG, "eval", seed=0).ground_truth()[1].sum() == 0  # eval clips are aligned


def test_narrations_name_the_class_unless_misaligned() -> None:
    from gradharmony.vatt.synthetic import DIGIT_NAMES

    ds = DigitsAVT(CFG, "train", seed=1)
    for i in range(20):
        clip = ds[i]
        words = {ds.tokenizer.vocab[t] for t in clip["text"][0] if t}
        named = [n for n in DIGIT_NAMES if n in words]
        assert (named == [DIGIT_NAMES[clip["label"]]]) == (clip["noise_kind"] != 2)


def test_collate_shapes() -> None:
    ds = DigitsAVT(CFG, "train", seed=0)
    b = collate([ds[i] for i in range(3)])
    assert b["video"].shape == (3, 3, 4, 16, 16) and b["audio"].shape == (3, 256)
    assert b["text"].shape == (3, 2, 8) and b["text_mask"].shape == (3, 2) and b["index"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------- tokenizer / sampler

def test_word_tokenizer() -> None:
    tok = WordTokenizer.build(["Hello, World!", "hello there"])
    assert tok.vocab == ["<pad>", "<unk>", "hello", "world", "there"]
    assert tok.encode("HELLO unseen world.", 5).tolist() == [2, 1, 3, 0, 0]
    ids, mask = tok.encode_many(["hello", "there"], 3, 2)
    assert ids.tolist() == [[2, 0], [4, 0], [0, 0]] and mask.tolist() == [True, True, False]


def test_sampler_is_resumable_and_ranks_partition_the_global_batch() -> None:
    s = EpochBatchSampler(10, 4, seed=0)
    seq = [s.next_indices()[0].tolist() for _ in range(5)]
    assert all(len(set(b)) == 4 for b in seq)
    s2 = EpochBatchSampler(10, 4, seed=0)
    s2.next_indices(); s2.next_indices()
    s3 = EpochBatchSampler(10, 4, seed=0)
    s3.load_state_dict(s2.state_dict())
    assert [s3.next_indices()[0].tolist() for _ in range(3)] == seq[2:]
    r0, r1 = EpochBatchSampler(10, 4, 0, rank=0, world_size=2), EpochBatchSampler(10, 4, 0, rank=1, world_size=2)
    g0, l0 = r0.next_indices()
    g1, l1 = r1.next_indices()
    assert g0.tolist() == g1.tolist() == seq[0] and l0.tolist() + l1.tolist() == seq[0]


# ---------------------------------------------------------------- manifest

def write_wav(path: str, x: np.ndarray, rate: int, channels: int = 1) -> None:
    data = (np.clip(x, -1, 1) * 32767).astype("<i2")
    if channels > 1:
        data = np.repeat(data[:, None], channels, axis=1)
    with wave.open(path, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())


def make_clips(root: str, n: int = 4, bad: dict[int, str] | None = None) -> list[dict]:
    """n clips (npy frames, wav or npy audio); ``bad`` maps row -> 'missing' | 'shape' | 'caption' | 'wav'."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    rows = []
    for i in range(n):
        v, a = f"clips/{i}.npy", f"clips/{i}.wav" if i % 2 == 0 else f"clips/{i}_a.npy"
        np.save(os.path.join(root, v), rng.integers(0, 255, size=(6, 20, 24, 3), dtype=np.uint8))
        if a.endswith(".wav"):
            write_wav(os.path.join(root, a), rng.uniform(-0.5, 0.5, 400), rate=16000, channels=1 + i % 3)
        else:
            np.save(os.path.join(root, a), rng.uniform(-0.5, 0.5, 300).astype(np.float32))
        rows.append({"id": str(i), "video": v, "audio": a, "captions": [f"clip number {i}", "a test clip"],
                     "label": i % 2, "misaligned": int(i == 1)})
    for i, kind in (bad or {}).items():
        if kind == "missing":
            rows[i]["video"] = "clips/nope.npy"
        elif kind == "shape":
            np.save(os.path.join(root, rows[i]["video"]), np.zeros((6, 20, 24, 5), dtype=np.uint8))
        elif kind == "caption":
            rows[i]["captions"] = ["ok", "  "]
        elif kind == "wav":
            rows[i]["audio"] = "clips/garbage.wav"
            with open(os.path.join(root, "clips/garbage.wav"), "wb") as f:
                f.write(b"not a wav file at all")
    return rows


def write_jsonl(root: str, rows: list[dict]) -> str:
    path = os.path.join(root, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def test_manifest_jsonl_loads_and_normalises(tmp_path) -> None:
    ds = ManifestDataset(write_jsonl(str(tmp_path), make_clips(str(tmp_path))), CFG)
    assert len(ds) == 4 and ds.skipped == []
    assert ds.tokenizer.vocab[:4] == ["<pad>", "<unk>", "clip", "number"]
    for i in range(4):
        c = ds[i]
        assert c["video"].shape == (3, 4, 16, 16) and c["audio"].shape == (256,)
        assert c["text"].shape == (2, 8) and c["text_mask"].tolist() == [True, True]
    labels, mis = ds.ground_truth()
    assert labels.tolist() == [0, 1, 0, 1] and mis.tolist() == [0, 1, 0, 0]


def test_manifest_csv(tmp_path) -> None:
    rows = make_clips(str(tmp_path), 2)
    path = tmp_path / "m.csv"
    lines = ["id,video,audio,captions"] + [f"{r['id']},{r['video']},{r['audio']},{'|'.join(r['captions'])}" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    ds = ManifestDataset(str(path), CFG)
    assert len(ds) == 2 and ds[1]["label"] == -1 and ds[0]["text_mask"].all()


def test_wav_reader_resamples_stereo(tmp_path) -> None:
    p = str(tmp_path / "x.wav")
    write_wav(p, np.linspace(-0.5, 0.5, 100), rate=16000, channels=2)
    x, rate = read_wav(p)
    assert rate == 16000 and x.shape == (100,)
    np.testing.assert_allclose(x, np.linspace(-0.5, 0.5, 100), atol=1e-4)


@pytest.mark.parametrize("kind,message", [("missing", "clips/nope.npy: file not found"),
                                          ("shape", "wrong shape (6, 20, 24, 5)"),
                                          ("caption", "empty caption"),
                                          ("wav", "garbage.wav: unreadable wav")])
def test_manifest_bad_clip_names_file_and_problem(tmp_path, kind: str, message: str) -> None:
    path = write_jsonl(str(tmp_path), make_clips(str(tmp_path), bad={2: kind}))
    with pytest.raises(DataError) as e:
        ManifestDataset(path, CFG)
    assert message in str(e.value) and "line 3" in str(e.value)


def test_manifest_skip_bad_counts(tmp_path) -> None:
    path = write_jsonl(str(tmp_path), make_clips(str(tmp_path), n=5, bad={0: "missing", 3: "shape", 4: "caption"}))
    ds = ManifestDataset(path, CFG, skip_bad=True)
    assert len(ds) == 2 and len(ds.skipped) == 3
    assert "file not found" in ds.skipped[0] and "wrong shape" in ds.skipped[1]


def test_manifest_errors_for_missing_or_invalid_manifest(tmp_path) -> None:
    with pytest.raises(DataError, match="manifest not found"):
        ManifestDataset(str(tmp_path / "none.jsonl"), CFG)
    p = tmp_path / "bad.jsonl"
    p.write_text('{"video": "a.npy"\n')
    with pytest.raises(DataError, match="line 1: invalid JSON"):
        ManifestDataset(str(p), CFG)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), batch=st.integers(1, 8), world=st.sampled_from([1, 2, 4]), seed=st.integers(0, 99))
def test_sampler_epochs_are_permutations_and_ranks_partition(n: int, batch: int, world: int, seed: int) -> None:
    b = batch * world
    assume(b <= n)
    samplers = [EpochBatchSampler(n, b, seed, rank=r, world_size=world) for r in range(world)]
    per_epoch = n // b
    for _ in range(2 * per_epoch):
        outs = [s.next_indices() for s in samplers]
        glob = outs[0][0]
        assert all((o[0] == glob).all() for o in outs)
        assert np.concatenate([o[1] for o in outs]).tolist() == glob.tolist()
        assert len(set(glob.tolist())) == b
    assert samplers[0].epoch == 1


def test_video_files_through_pyav(tmp_path, monkeypatch) -> None:
    """The PyAV path with a stand-in ``av`` module (PyAV itself is optional)."""
    import sys
    import types

    frames = [np.full((12, 10, 3), 40 * k, dtype=np.uint8) for k in range(5)]

    class Frame:
        def __init__(self, a: np.ndarray):
            self.a = a

        def to_ndarray(self, format: str) -> np.ndarray:  # noqa: A002 - PyAV's name
            assert format == "rgb24"
            return self.a

    class Container:
        streams = types.SimpleNamespace(video=[object()])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def decode(self, video: int):
            return (Frame(f) for f in frames)

    monkeypatch.setitem(sys.modules, "av", types.SimpleNamespace(open=lambda path: Container()))
    rows = make_clips(str(tmp_path), n=1)
    (tmp_path / "clips" / "v.mp4").write_bytes(b"fake")
    rows[0]["video"] = "clips/v.mp4"
    ds = ManifestDataset(write_jsonl(str(tmp_path), rows), CFG)
    v = ds[0]["video"]
    assert v.shape == (3, 4, 16, 16)
    np.testing.assert_allclose(v[0, 0], (0.0 - 0.4) / 0.3, atol=1e-6)  # first frame is black
    np.testing.assert_allclose(v[0, -1], (160 / 255 - 0.4) / 0.3, atol=1e-5)  # last sampled frame


def test_video_file_without_pyav_is_a_clear_error(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    rows = make_clips(str(tmp_path), n=1)
    (tmp_path / "clips" / "v.mp4").write_bytes(b"fake")
    rows[0]["video"] = "clips/v.mp4"
    with pytest.raises(DataError, match="v.mp4: decoding video files needs PyAV"):
        ManifestDataset(write_jsonl(str(tmp_path), rows), CFG)
