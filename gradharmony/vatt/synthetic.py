"""Embedded tri-modal data: moving handwritten digits, sounds, narrations, linked per instance.

No download: the images are scikit-learn's bundled 8x8 digits (``load_digits``). Clip ``i`` of a
split is generated on the fly from ``numpy.random.default_rng([seed, split, i])``, so the data set
is deterministic, costs no memory, and any clip can be re-read.

Every clip has a class (the digit, 10 values) and three *instance attributes*, drawn per clip and
shared by the three modalities, so that retrieval can be learned beyond the class
(``len(COLOURS) * len(SIZES) * len(SPEEDS) = 24`` attribute combinations per class):

* class (the digit): video = the digit's shape and a dimmed background tint (an easy cue); audio =
  a chord at ``(c + 2) * sr / 64`` Hz and its octave; narration = "seven";
* colour (6): video = the digit's colour; audio = a tone at the odd harmonic ``13 + 2 j`` of
  ``sr / 64`` (above the chords); narration = "red", "green", ...;
* size (2): video = digit side ``S/4`` or ``S/2``; audio = a tone at harmonic 29 or 1 of ``sr / 64`` (small
  sounds high, big low) and gain 0.6 or 0.9; narration = "small", "big";
* speed (2): video = 0.25 or 3 pixels per frame (at S = 32); audio = 2 or 6 loudness pulses per clip;
  narration = "slowly", "quickly".

* video (C, T, S, S): the digit (a scikit-learn image of the class, nearest-neighbour resized),
  coloured, moving in a random direction (bouncing at the borders) over a dim background tinted by
  the class (a deliberately easy class cue, with a random gradient) with pixel noise; stored as
  uint8, returned normalised to roughly zero mean / unit scale.
* audio (L,): the class chord plus the colour and size tones (every 64-sample window holds whole
  periods; class-, colour- and size-specific phases with per-clip jitter), gated by the speed's
  pulse rhythm, at the size's gain, plus noise.
* narrations (P candidates): distinct templates naming size, colour, digit and speed
  ("a big red seven is moving quickly across the screen", ...).

A ``misaligned_fraction`` of the *train* clips is misaligned: their audio (half of them) or their
narrations (the other half) come from another clip: another class *and* independently drawn
attributes. ``misaligned`` and ``noise_kind`` (0 aligned, 1 audio, 2 narration) keep the ground
truth; ``label`` is the class on screen, ``attributes`` the (colour, size, speed) indices of the
video. Train clips draw their digit images from 80% of the scikit-learn images, eval / probe clips
from the other 20%.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np

from .config import DataConfig
from .data import WordTokenizer

__all__ = ["DigitsAVT", "DIGIT_NAMES", "TEMPLATES", "COLOURS", "SIZES", "SPEEDS"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {s} size, {c} colour, {d} digit, {v} speed; the digit is within the first 8 words of each
TEMPLATES = (
    "a {s} {c} {d} is moving {v} across the screen",
    "here you can see a {s} {c} {d} moving {v}",
    "the {s} {c} digit {d} moves {v} in this video",
    "watch the {s} {c} {d} slide {v} over the background",
    "this clip shows a {s} {c} handwritten {d} moving {v}",
    "look at this {s} {c} {d} going by {v}",
)
SPLITS = {"train": 0, "eval": 1, "probe": 2}
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
PALETTE = np.array([[1.0, 0.15, 0.15], [0.15, 0.9, 0.15], [0.25, 0.35, 1.0], [1.0, 0.95, 0.15],
                    [0.75, 0.2, 1.0], [0.15, 0.95, 0.95]], dtype=np.float32)  # RGB of COLOURS
CLASS_TINT = np.array([[1.0, 0.3, 0.3], [0.3, 1.0, 0.3], [0.3, 0.3, 1.0], [1.0, 1.0, 0.3], [1.0, 0.3, 1.0],
                       [0.3, 1.0, 1.0], [1.0, 0.6, 0.2], [0.6, 0.3, 1.0], [0.8, 0.8, 0.8], [0.5, 1.0, 0.5]],
                      dtype=np.float32)  # background tint per class (dimmed), an easy class cue
SIZES = ("small", "big")  # digit side S/4 or S/2; audio: a high or a low tone, gain 0.6 or 0.9
SPEEDS = ("slowly", "quickly")  # 0.25 or 3 pixels per frame (at S = 32); 2 or 6 audio pulses per clip
SIZE_GAIN = (0.6, 0.9)
SIZE_HARMONIC = (29, 1)  # small things sound high, big ones low (harmonics of sr / 64)
SPEED_PX = (0.25, 3.0)
SPEED_PULSES = (2, 6)
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
        self.tokenizer = WordTokenizer.build(
            t.format(s=a, c=b, d=d, v=v) for t in TEMPLATES for d in DIGIT_NAMES for a in SIZES for b in COLOURS
            for v in SPEEDS)
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
        label = int(rng.integers(10))  # the first two draws are replayed by ground_truth()
        noise_kind = 0
        if rng.random() < self.misaligned_fraction:
            noise_kind = 1 + int(rng.integers(2))
        other = (label + 1 + int(rng.integers(9))) % 10
        attrs = _draw_attributes(rng)
        other_attrs = _draw_attributes(rng)  # the other clip's: misaligned in the attributes too
        audio_cls, audio_attrs = (other, other_attrs) if noise_kind == 1 else (label, attrs)
        text_cls, text_attrs = (other, other_attrs) if noise_kind == 2 else (label, attrs)
        text, mask = self._narrations(rng, text_cls, text_attrs)
        return {
            "video": self._video(rng, label, attrs),
            "audio": self._audio(rng, audio_cls, audio_attrs),
            "text": text,
            "text_mask": mask,
            "label": label,
            "attributes": np.array(attrs, dtype=np.int64),
            "misaligned": int(noise_kind > 0),
            "noise_kind": noise_kind,
            "index": index,
        }

    # ------------------------------------------------------------------ modalities

    def _video(self, rng: np.random.Generator, cls: int, attrs: tuple[int, int, int]) -> np.ndarray:
        """uint8 (C, T, S, S): the coloured digit moving over a gradient background."""
        c, t, s = self.cfg.channels, self.cfg.frames, self.cfg.size
        colour_i, size_i, speed_i = attrs
        images, _ = _digits()
        pool = self.pools[cls]
        img = images[pool[rng.integers(len(pool))]]
        dh = max(2, s // 2) if size_i else max(2, s // 4)
        grid = np.arange(dh) * img.shape[0] // dh  # nearest-neighbour resize 8x8 -> dh x dh
        img = img[grid][:, grid]
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        tint = CLASS_TINT[cls, :c] if c == 3 else np.full(c, 0.3 + 0.05 * cls, dtype=np.float32)
        base = (0.3 * tint + rng.uniform(-0.05, 0.05, size=c)).astype(np.float32)[:, None, None]
        grad = rng.uniform(-0.1, 0.1, size=(c, 2, 1, 1)).astype(np.float32)
        bg = base + grad[:, 0] * yy + grad[:, 1] * xx  # (C, S, S)
        hue = PALETTE[colour_i, :c] if c == 3 else np.full(c, 0.5 + 0.1 * colour_i)
        colour = np.clip(hue + rng.uniform(-0.08, 0.08, size=c), 0.0, 1.0).astype(np.float32)[:, None, None]
        span = s - dh
        pos = rng.uniform(0, span, size=2) if span > 0 else np.zeros(2)
        angle = rng.uniform(0, 2 * np.pi)
        vel = SPEED_PX[speed_i] * max(1.0, s / 32) * np.array([np.sin(angle), np.cos(angle)])
        frames = np.empty((c, t, s, s), dtype=np.float32)
        for f in range(t):
            y0, x0 = (int(round(p)) for p in pos)
            alpha = np.zeros((s, s), dtype=np.float32)
            alpha[y0:y0 + dh, x0:x0 + dh] = img
            frames[:, f] = bg * (1 - alpha) + colour * alpha
            pos, vel = _bounce(pos + vel, vel, span)
        frames += rng.normal(0.0, 0.05, size=frames.shape).astype(np.float32)
        return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def _audio(self, rng: np.random.Generator, cls: int, attrs: tuple[int, int, int]) -> np.ndarray:
        """float32 (L,): class chord + colour tone, gated by the speed's pulses, at the size's gain, plus noise."""
        n, sr = self.cfg.audio_samples, self.cfg.sample_rate
        colour_i, size_i, speed_i = attrs
        tt = np.arange(n, dtype=np.float64) / sr
        f0 = (cls + 2) * sr / 64.0
        fc = (13 + 2 * colour_i) * sr / 64.0
        fs = SIZE_HARMONIC[size_i] * sr / 64.0
        # phase-locked: class-, colour- and size-specific phases with per-clip jitter (visible to a patch embedding)
        ph = np.array([0.6 * cls, 1.2 * cls, 1.1 * colour_i, 2.0 * size_i]) + rng.uniform(-0.3, 0.3, size=4)
        tone = (np.sin(2 * np.pi * f0 * tt + ph[0]) + 0.6 * np.sin(2 * np.pi * 2.0 * f0 * tt + ph[1])
                + 0.8 * np.sin(2 * np.pi * fc * tt + ph[2]) + 0.6 * np.sin(2 * np.pi * fs * tt + ph[3]))
        pulses = SPEED_PULSES[speed_i]
        env = 0.5 + 0.5 * np.cos(2 * np.pi * pulses * (np.arange(n) / n) + rng.uniform(0, 2 * np.pi))
        gain = SIZE_GAIN[size_i] * rng.uniform(0.92, 1.08)
        wave = gain * tone * env / 3.0 + rng.normal(0.0, 0.05, size=n)
        return np.clip(wave, -1.0, 1.0).astype(np.float32)

    def _narrations(self, rng: np.random.Generator, cls: int,
                    attrs: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """P distinct templates about digit ``cls`` with ``attrs``: ids (P, S), mask (P,)."""
        p = self.cfg.num_narrations
        colour_i, size_i, speed_i = attrs
        words = {"s": SIZES[size_i], "c": COLOURS[colour_i], "d": DIGIT_NAMES[cls], "v": SPEEDS[speed_i]}
        order = rng.permutation(len(TEMPLATES))
        texts = [TEMPLATES[order[i % len(TEMPLATES)]].format(**words) for i in range(p)]
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


def _draw_attributes(rng: np.random.Generator) -> tuple[int, int, int]:
    """(colour, size, speed) indices into COLOURS, SIZES, SPEEDS."""
    return int(rng.integers(len(COLOURS))), int(rng.integers(len(SIZES))), int(rng.integers(len(SPEEDS)))


def _bounce(pos: np.ndarray, vel: np.ndarray, span: float) -> tuple[np.ndarray, np.ndarray]:
    """Reflect positions leaving [0, span]."""
    pos, vel = pos.copy(), vel.copy()
    for k in range(2):
        if pos[k] < 0:
            pos[k], vel[k] = -pos[k], -vel[k]
        elif pos[k] > span:
            pos[k], vel[k] = 2 * span - pos[k], -vel[k]
    return np.clip(pos, 0, max(span, 0)), vel
