"""Embedded tri-modal data: moving handwritten digits, class-specific sounds, narrations.

No download: the images are scikit-learn's bundled 8x8 digits (``load_digits``). Clip ``i`` of a
split is generated on the fly from ``numpy.random.default_rng([seed, split, i])``, so the data set
is deterministic, costs no memory, and any clip can be re-read.

* video (C, T, S, S): a digit of the clip's class (scaled by ``S // 16``), in a class-tinted colour
  (one of ten hues, plus per-clip jitter), moving with constant velocity (bouncing at the
  borders) over a random colour-gradient background with pixel noise; stored as uint8,
  returned normalised to roughly zero mean / unit scale.
* audio (L,): a class-specific chord (``(c + 2) * sr / 64`` Hz and its octave, so every 64-sample
  window holds whole periods; class-specific phases with per-clip jitter) gated by a
  class-specific pulse rhythm (``2 + c`` pulses per clip), random gain, plus noise.

The class cues (hue, phase-locked tones) are deliberately easy so that a few CPU minutes
show learning; the digit shapes and the narrations carry the same class.
* narrations (P candidates): distinct templates mentioning the digit's name
  ("here you can see the number seven", ...).

A ``misaligned_fraction`` of the *train* clips is misaligned: their audio (half of them) or their
narrations (the other half) come from another class. ``misaligned`` and ``noise_kind``
(0 aligned, 1 audio, 2 narration) keep the ground truth; ``label`` is the class on screen.
Train clips draw their digit images from 80% of the scikit-learn images, eval / probe clips from
the other 20%.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np

from .config import DataConfig
from .data import WordTokenizer

__all__ = ["DigitsAVT", "DIGIT_NAMES", "TEMPLATES"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a {d} is moving across the screen",
    "here you can see the number {d}",
    "the digit {d} appears in this video",
    "watch the {d} slide over the background",
    "this clip shows a handwritten {d}",
    "look at this {d} going by",
)
SPLITS = {"train": 0, "eval": 1, "probe": 2}
PALETTE = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.3, 1.0], [1.0, 1.0, 0.2], [1.0, 0.2, 1.0],
                    [0.2, 1.0, 1.0], [1.0, 0.6, 0.1], [0.6, 0.3, 1.0], [0.9, 0.9, 0.9], [0.5, 1.0, 0.5]],
                   dtype=np.float32)  # one hue per class
CACHE_BYTES = 512 * 2**20  # rendered clips are kept in memory when the split fits in this budget


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _pools(held_out: bool) -> tuple[np.ndarray, ...]:
    """Per class, the indices of the scikit-learn images of that split (held out = every 5th)."""
    _, y = _digits()
    idx = np.arange(len(y))
    sel = idx[(idx % 5 == 0) == held_out]
    return tuple(sel[y[sel] == c] for c in range(10))


class DigitsAVT:
    """Deterministic tri-modal digits clips; see the module docstring.

    >>> from gradharmony.vatt.config import DataConfig
    >>> ds = DigitsAVT(DataConfig(train_size=16), "train", seed=0)
    >>> ds[0]["video"].shape, ds[0]["audio"].shape, ds[0]["text"].shape
    ((3, 8, 32, 32), (2048,), (3, 12))
    """

    def __init__(self, cfg: DataConfig, split: str = "train", seed: int = 0, size: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.cfg, self.split, self.seed = cfg, split, seed
        self.size = size if size is not None else (cfg.train_size if split == "train" else cfg.eval_size)
        self.misaligned_fraction = cfg.misaligned_fraction if split == "train" else 0.0
        self.tokenizer = WordTokenizer.build(t.format(d=d) for t in TEMPLATES for d in DIGIT_NAMES)
        self.pools = _pools(split != "train")
        self.skipped: list[str] = []
        clip_bytes = cfg.channels * cfg.frames * cfg.size ** 2 + 4 * cfg.audio_samples
        self._cache: Optional[dict[int, dict[str, Any]]] = {} if clip_bytes * self.size <= CACHE_BYTES else None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        if self._cache is not None and index in self._cache:
            clip = self._cache[index]
        else:
            clip = self._render(index)
            if self._cache is not None:
                self._cache[index] = clip
        out = dict(clip)
        out["video"] = (clip["video"].astype(np.float32) * (1.0 / 255.0) - 0.4) / 0.3
        return out

    def _render(self, index: int) -> dict[str, Any]:
        """Clip ``index`` with video as uint8 (C, T, S, S) (the compact, cached form)."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        label = int(rng.integers(10))
        noise_kind = 0
        if rng.random() < self.misaligned_fraction:
            noise_kind = 1 + int(rng.integers(2))
        other = (label + 1 + int(rng.integers(9))) % 10
        audio_cls = other if noise_kind == 1 else label
        text_cls = other if noise_kind == 2 else label
        text, mask = self._narrations(rng, text_cls)
        return {
            "video": self._video(rng, label),
            "audio": self._audio(rng, audio_cls),
            "text": text,
            "text_mask": mask,
            "label": label,
            "misaligned": int(noise_kind > 0),
            "noise_kind": noise_kind,
            "index": index,
        }

    # ------------------------------------------------------------------ modalities

    def _video(self, rng: np.random.Generator, cls: int) -> np.ndarray:
        """uint8 (C, T, S, S): the digit moving over a gradient background."""
        c, t, s = self.cfg.channels, self.cfg.frames, self.cfg.size
        images, _ = _digits()
        pool = self.pools[cls]
        img = images[pool[rng.integers(len(pool))]]
        scale = max(1, s // 16)
        img = np.kron(img, np.ones((scale, scale), dtype=np.float32))
        dh = min(img.shape[0], s)
        img = img[:dh, :dh]
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        base = rng.uniform(0.0, 0.4, size=(c, 1, 1)).astype(np.float32)
        grad = rng.uniform(-0.2, 0.2, size=(c, 2, 1, 1)).astype(np.float32)
        bg = base + grad[:, 0] * yy + grad[:, 1] * xx  # (C, S, S)
        hue = PALETTE[cls % len(PALETTE), :c] if c == 3 else np.full(c, 0.8)
        colour = np.clip(hue + rng.uniform(-0.15, 0.15, size=c), 0.0, 1.0).astype(np.float32)[:, None, None]
        span = s - dh
        pos = rng.uniform(0, span, size=2) if span > 0 else np.zeros(2)
        vel = rng.uniform(-1.5, 1.5, size=2) * max(1.0, s / 32)
        frames = np.empty((c, t, s, s), dtype=np.float32)
        for f in range(t):
            y0, x0 = (int(round(p)) for p in pos)
            alpha = np.zeros((s, s), dtype=np.float32)
            alpha[y0:y0 + dh, x0:x0 + dh] = img
            frames[:, f] = bg * (1 - alpha) + colour * alpha
            pos, vel = _bounce(pos + vel, vel, span)
        frames += rng.normal(0.0, 0.05, size=frames.shape).astype(np.float32)
        return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def _audio(self, rng: np.random.Generator, cls: int) -> np.ndarray:
        """float32 (L,): class chord gated by a class rhythm, plus noise."""
        n, sr = self.cfg.audio_samples, self.cfg.sample_rate
        tt = np.arange(n, dtype=np.float64) / sr
        f0 = (cls + 2) * sr / 64.0
        ph = 0.6 * cls + rng.uniform(-0.3, 0.3, size=2)
        tone = np.sin(2 * np.pi * f0 * tt + ph[0]) + 0.6 * np.sin(2 * np.pi * 2.0 * f0 * tt + 2.0 * ph[1])
        pulses = 2 + cls
        env = 0.5 + 0.5 * np.cos(2 * np.pi * pulses * (np.arange(n) / n) + rng.uniform(0, 2 * np.pi))
        wave = rng.uniform(0.5, 1.0) * tone * env / 1.6 + rng.normal(0.0, 0.1, size=n)
        return np.clip(wave, -1.0, 1.0).astype(np.float32)

    def _narrations(self, rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
        """P distinct templates about digit ``cls``: ids (P, S), mask (P,)."""
        p = self.cfg.num_narrations
        order = rng.permutation(len(TEMPLATES))
        texts = [TEMPLATES[order[i % len(TEMPLATES)]].format(d=DIGIT_NAMES[cls]) for i in range(p)]
        return self.tokenizer.encode_many(texts, p, self.cfg.max_text_len)

    def ground_truth(self) -> tuple[np.ndarray, np.ndarray]:
        """(label (N,), misaligned (N,)) for every clip, without rendering the media."""
        labels = np.empty(self.size, dtype=np.int64)
        mis = np.empty(self.size, dtype=np.int64)
        for i in range(self.size):
            rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
            labels[i] = rng.integers(10)
            mis[i] = rng.random() < self.misaligned_fraction
        return labels, mis


def _bounce(pos: np.ndarray, vel: np.ndarray, span: float) -> tuple[np.ndarray, np.ndarray]:
    """Reflect positions leaving [0, span]."""
    pos, vel = pos.copy(), vel.copy()
    for k in range(2):
        if pos[k] < 0:
            pos[k], vel[k] = -pos[k], -vel[k]
        elif pos[k] > span:
            pos[k], vel[k] = 2 * span - pos[k], -vel[k]
    return np.clip(pos, 0, max(span, 0)), vel
