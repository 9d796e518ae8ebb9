"""Users' own clips, listed in a manifest (JSONL or CSV).

Layout (paths are relative to the manifest's folder, or absolute)::

    data/
      train.jsonl
      clips/0001.npy      video frames: uint8 or float (T, H, W, C) with C in {1, 3}, or (T, H, W)
      clips/0001.wav      PCM wav (8/16/32-bit, any rate, mono or multi-channel), or .npy (L,) float
      clips/0002.mp4      video files are decoded with PyAV when it is installed

JSONL, one clip per line::

    {"id": "0001", "video": "clips/0001.npy", "audio": "clips/0001.wav",
     "captions": ["a man cuts an onion", "chopping vegetables"], "label": 3, "misaligned": 0}

CSV with a header: ``id,video,audio,captions[,label][,misaligned]`` where ``captions`` separates
several narrations with ``|``. ``label`` (latent class for the linear probe) and ``misaligned``
(ground truth for the noise-detection AUROC) are optional.

Frames are sampled uniformly to ``data.frames`` and resized (bilinear) to ``data.size`` squared;
uint8 frames are scaled to [0, 1]; then normalised like the embedded data. Audio is averaged over
channels, linearly resampled to ``data.sample_rate`` and centre-cropped / zero-padded to
``data.audio_samples``. The vocabulary is built from the training manifest's captions.

Every row is checked when the manifest is opened, against the format above: ``id`` a non-empty
string or integer; ``captions`` a non-empty list of strings with at least one word each (or a
``|``-separated string); ``label`` an integer >= 0; ``misaligned`` 0 or 1; video ``.npy`` of dtype
uint8 or float, shape ``(T, H, W, C)`` with C in {1, 3} or ``(T, H, W)``, every dimension >= 1,
finite values; audio ``.npy`` a float ``(L,)`` array with L >= 1 and finite values; ``.wav`` PCM
with 8/16/32-bit samples, at least one channel and one frame, and a sample rate >= 1 Hz; video
files open in PyAV with a video stream; CSV rows have no more fields than the header. A bad row
raises :class:`~gradharmony.vatt.data.DataError` naming the manifest line, the file and the
problem, or with ``skip_bad=True`` (``--skip-bad``) it is skipped and its reason recorded in
``dataset.skipped`` (the trainer prints the count and writes it to ``summary.json`` and
``metrics.jsonl`` as ``data/skipped``).
"""
from __future__ import annotations

import csv
import json
import os
import wave
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig
from .data import DataError, WordTokenizer

__all__ = ["ManifestDataset", "read_wav", "read_frames"]

VIDEO_FILE_EXT = (".mp4", ".avi", ".mkv", ".webm", ".mov")


class ManifestDataset:
    """Clips listed in a JSONL/CSV manifest; see the module docstring for the layout."""

    def __init__(self, path: str, cfg: DataConfig, tokenizer: Optional[WordTokenizer] = None,
                 skip_bad: bool = False):
        self.path, self.cfg, self.skip_bad = path, cfg, skip_bad
        self.root = os.path.dirname(os.path.abspath(path))
        self.skipped: list[str] = []
        rows = _read_manifest(path)
        self.rows: list[dict[str, Any]] = []
        for lineno, row in rows:
            try:
                self.rows.append(self._check_row(lineno, row))
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped.append(str(e))
        if not self.rows:
            raise DataError(f"{path}: no usable clips ({len(self.skipped)} skipped)")
        self.tokenizer = tokenizer or WordTokenizer.build(c for r in self.rows for c in r["captions"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        try:
            video = self._load_video(row)
            audio = self._load_audio(row)
        except DataError as e:
            raise DataError(f"{self._where(row['lineno'])}: {e}") from None
        text, mask = self.tokenizer.encode_many(row["captions"], self.cfg.num_narrations, self.cfg.max_text_len)
        return {"video": video, "audio": audio, "text": text, "text_mask": mask, "label": row["label"],
                "misaligned": row["misaligned"], "index": index}

    def ground_truth(self) -> tuple[np.ndarray, np.ndarray]:
        """(label (N,), misaligned (N,)), -1 where unknown."""
        return (np.array([r["label"] for r in self.rows], dtype=np.int64),
                np.array([r["misaligned"] for r in self.rows], dtype=np.int64))

    # ------------------------------------------------------------------ checks

    def _where(self, lineno: int) -> str:
        return f"{self.path} line {lineno}"

    def _resolve(self, lineno: int, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{self._where(lineno)}: missing '{field}' path")
        p = value if os.path.isabs(value) else os.path.join(self.root, value)
        if not os.path.isfile(p):
            raise DataError(f"{self._where(lineno)}: {value}: file not found")
        return p

    def _check_row(self, lineno: int, row: dict[str, Any]) -> dict[str, Any]:
        where = self._where(lineno)
        if None in row:  # csv.DictReader puts surplus fields under the key None
            raise DataError(f"{where}: more fields than the CSV header ({row[None]!r} left over)")
        ident = row.get("id", lineno)
        if isinstance(ident, bool) or not isinstance(ident, (str, int)) or (isinstance(ident, str)
                                                                            and not ident.strip()):
            raise DataError(f"{where}: 'id' must be a non-empty string or an integer, got {ident!r}")
        captions = row.get("captions", row.get("caption"))
        if isinstance(captions, str):
            captions = captions.split("|")
        if captions is None or (isinstance(captions, list) and not captions):
            raise DataError(f"{where}: empty caption (no 'captions')")
        if not isinstance(captions, list):
            raise DataError(f"{where}: 'captions' must be a list of strings, got {captions!r}")
        for k, c in enumerate(captions):
            if not isinstance(c, str) or not WordTokenizer.split(c):
                raise DataError(f"{where}: empty caption (caption {k + 1} is {c!r})")
        video = self._resolve(lineno, row.get("video"), "video")
        audio = self._resolve(lineno, row.get("audio"), "audio")
        label = _opt_int(row.get("label"), where, "label")
        if label < -1 or (label == -1 and row.get("label") is not None):
            raise DataError(f"{where}: 'label' must be an integer >= 0, got {row.get('label')!r}")
        misaligned = _opt_int(row.get("misaligned"), where, "misaligned")
        if row.get("misaligned") is not None and misaligned not in (0, 1):
            raise DataError(f"{where}: 'misaligned' must be 0 or 1, got {row.get('misaligned')!r}")
        checked = {"id": str(ident), "video": video, "audio": audio, "captions": captions,
                   "label": label, "misaligned": misaligned, "lineno": lineno}
        try:
            _probe_video(video)
            _probe_audio(audio)
        except DataError as e:
            raise DataError(f"{self._where(lineno)}: {e}") from None
        return checked

    # ------------------------------------------------------------------ loading

    def _load_video(self, row: dict[str, Any]) -> np.ndarray:
        frames = read_frames(row["video"])  # (T, H, W, C) float in [0, 1]
        t = torch.from_numpy(frames).permute(3, 0, 1, 2)  # (C, T, H, W)
        c = self.cfg.channels
        if t.shape[0] != c:
            t = t.mean(0, keepdim=True).expand(c, -1, -1, -1) if c in (1, 3) else t
        idx = torch.linspace(0, t.shape[1] - 1, self.cfg.frames).round().long()
        t = t[:, idx]
        t = F.interpolate(t.permute(1, 0, 2, 3), size=(self.cfg.size, self.cfg.size), mode="bilinear",
                          align_corners=False).permute(1, 0, 2, 3)
        return ((t - 0.4) / 0.3).contiguous().numpy().astype(np.float32)

    def _load_audio(self, row: dict[str, Any]) -> np.ndarray:
        wav, sr = read_audio(row["audio"], self.cfg.sample_rate)
        if sr != self.cfg.sample_rate:
            n_out = max(1, int(round(len(wav) * self.cfg.sample_rate / sr)))
            wav = np.interp(np.linspace(0, len(wav) - 1, n_out), np.arange(len(wav)), wav)
        n = self.cfg.audio_samples
        if len(wav) >= n:
            start = (len(wav) - n) // 2
            wav = wav[start:start + n]
        else:
            wav = np.pad(wav, (0, n - len(wav)))
        return wav.astype(np.float32)


# ---------------------------------------------------------------------- readers


def _read_manifest(path: str) -> list[tuple[int, dict[str, Any]]]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: manifest not found")
    rows: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            missing = {"video", "audio"} - set(reader.fieldnames or [])
            if missing or not ({"captions", "caption"} & set(reader.fieldnames or [])):
                raise DataError(f"{path}: CSV header must have id,video,audio,captions (got {reader.fieldnames})")
            for k, row in enumerate(reader):
                rows.append((k + 2, {key: (v if v != "" else None) for key, v in row.items()}))
        else:
            for k, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {k + 1}: invalid JSON: {e}") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {k + 1}: expected a JSON object")
                rows.append((k + 1, row))
    if not rows:
        raise DataError(f"{path}: manifest is empty")
    return rows


def _opt_int(value: Any, where: str, field: str) -> int:
    """An optional integer field (-1 when absent); floats must be integral, booleans are refused."""
    if value is None:
        return -1
    try:
        if isinstance(value, bool):
            raise ValueError
        f = float(value)
        if not (np.isfinite(f) and f.is_integer()):
            raise ValueError
        return int(f)
    except (TypeError, ValueError):
        raise DataError(f"{where}: '{field}' must be an integer, got {value!r}") from None


def _check_finite(arr: np.ndarray, path: str, what: str) -> None:
    """Raise DataError if a float array holds NaN/inf (checked in slices: the array may be memory-mapped)."""
    if arr.dtype.kind != "f":
        return
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    step = max(1, (1 << 22) // max(1, flat.shape[1]))
    for i in range(0, flat.shape[0], step):
        if not np.isfinite(flat[i:i + step]).all():
            raise DataError(f"{path}: non-finite values (NaN/inf) in {what}")


def _check_frames_shape(shape: tuple[int, ...], path: str) -> None:
    ok = len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))
    if not ok or min(shape) < 1:
        raise DataError(f"{path}: wrong shape {tuple(shape)} for video frames (expected (T, H, W, C) with C "
                        f"in {{1, 3}}, or (T, H, W))")


def _probe_video(path: str) -> None:
    """Validity check of a video file: a .npy's dtype, shape and values; a video file's container."""
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as e:  # noqa: BLE001 - any decoding failure is a data error
            raise DataError(f"{path}: unreadable .npy ({type(e).__name__}: {e})") from e
        if arr.dtype != np.uint8 and arr.dtype.kind != "f":
            raise DataError(f"{path}: video frames must be uint8 or float, got dtype {arr.dtype}")
        _check_frames_shape(arr.shape, path)
        _check_finite(arr, path, "video frames")
    elif path.lower().endswith(VIDEO_FILE_EXT):
        av = _import_av(path)
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise DataError(f"{path}: no video stream")
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: unreadable video ({type(e).__name__}: {e})") from e
    else:
        raise DataError(f"{path}: unsupported video format (use .npy or {', '.join(VIDEO_FILE_EXT)})")


def _probe_audio(path: str) -> None:
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: unreadable .npy ({type(e).__name__}: {e})") from e
        if arr.dtype.kind != "f":
            raise DataError(f"{path}: audio .npy must be a float waveform, got dtype {arr.dtype}")
        if arr.ndim != 1 or arr.shape[0] < 1:
            raise DataError(f"{path}: wrong shape {tuple(arr.shape)} for audio (expected a 1-D waveform (L,))")
        _check_finite(arr, path, "audio")
    elif path.lower().endswith(".wav"):
        try:
            with wave.open(path, "rb") as w:
                if w.getnframes() < 1:
                    raise DataError(f"{path}: empty wav")
                if w.getsampwidth() not in (1, 2, 4):
                    raise DataError(f"{path}: unsupported wav sample width {w.getsampwidth()}")
                if w.getframerate() < 1:
                    raise DataError(f"{path}: wav sample rate is {w.getframerate()} Hz (must be >= 1)")
                if w.getnchannels() < 1:
                    raise DataError(f"{path}: wav has no channels")
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: unreadable wav ({type(e).__name__}: {e})") from e
    else:
        raise DataError(f"{path}: unsupported audio format (use .wav or .npy)")


def _import_av(path: str) -> Any:
    try:
        import av  # type: ignore[import-not-found]
    except ImportError as e:
        raise DataError(f"{path}: decoding video files needs PyAV (pip install av); or convert to .npy") from e
    return av


def read_frames(path: str) -> np.ndarray:
    """float32 (T, H, W, C) in [0, 1] from a .npy array or a video file (PyAV)."""
    if path.endswith(".npy"):
        try:
            arr = np.load(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: unreadable .npy ({type(e).__name__}: {e})") from e
        _check_frames_shape(arr.shape, path)
        if arr.ndim == 3:
            arr = arr[..., None]
        arr = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: non-finite values in video frames")
        return arr
    av = _import_av(path)
    try:
        with av.open(path) as container:
            frames = [fr.to_ndarray(format="rgb24") for fr in container.decode(video=0)]
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: unreadable video ({type(e).__name__}: {e})") from e
    if not frames:
        raise DataError(f"{path}: video has no frames")
    return np.stack(frames).astype(np.float32) / 255.0


def read_audio(path: str, default_rate: int) -> tuple[np.ndarray, int]:
    """(float64 mono waveform (L,), sample rate); ``.npy`` files are assumed at ``default_rate``."""
    if path.endswith(".npy"):
        arr = np.load(path).astype(np.float64)
        if arr.ndim != 1:
            raise DataError(f"{path}: wrong shape {arr.shape} for audio (expected (L,))")
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: non-finite values in audio")
        return arr, default_rate
    return read_wav(path)


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """PCM wav via the stdlib ``wave`` module: (float64 mono waveform in [-1, 1] (L,), rate)."""
    try:
        with wave.open(path, "rb") as w:
            width, channels, rate, n = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: unreadable wav ({type(e).__name__}: {e})") from e
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0
    else:
        raise DataError(f"{path}: unsupported wav sample width {width}")
    if x.size == 0:
        raise DataError(f"{path}: empty wav")
    if rate < 1 or channels < 1:
        raise DataError(f"{path}: wav sample rate is {rate} Hz with {channels} channels (must be >= 1)")
    return x.reshape(-1, channels).mean(1), rate
