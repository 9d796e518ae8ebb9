"""Data plumbing shared by the embedded and the manifest data sets.

A *clip* (one sample) is a dict::

    video      float32 (C, T, H, W), roughly zero-mean
    audio      float32 (L,) raw waveform in [-1, 1]
    text       int64   (P, S) word ids, 0 = padding (P candidate narrations)
    text_mask  bool    (P,)  which candidates are real
    label      int     latent class (-1 when unknown)
    misaligned int     1 if audio or narration belong to another clip/class, 0 if aligned, -1 unknown
    index      int     position in the data set

:func:`collate` stacks clips into a batch dict of tensors; :class:`EpochBatchSampler` yields the
global batch indices epoch by epoch (deterministic from the seed) and has a ``state_dict`` so a
resumed run sees exactly the same batches.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["ClipDataset", "WordTokenizer", "EpochBatchSampler", "Subset", "collate", "load_batch", "DataError"]

PAD, UNK = "<pad>", "<unk>"


class DataError(ValueError):
    """A clip or manifest row is bad; the message names the file and the problem."""


class ClipDataset(Protocol):
    """What the trainer needs from a data set."""

    tokenizer: "WordTokenizer"

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class WordTokenizer:
    """Lower-case, whitespace tokenizer with a vocabulary built from a corpus.

    Punctuation attached to words is stripped. Id 0 is padding, id 1 unknown words.

    >>> tok = WordTokenizer.build(["A cat.", "a dog"])
    >>> tok.encode("a bird", 4).tolist()
    [2, 1, 0, 0]
    """

    def __init__(self, vocab: Sequence[str]):
        if list(vocab[:2]) != [PAD, UNK]:
            raise ValueError("vocab must start with <pad>, <unk>")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case words with surrounding punctuation removed."""
        words = (re.sub(r"^\W+|\W+$", "", w) for w in text.lower().split())
        return [w for w in words if w]

    @classmethod
    def build(cls, corpus: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        """Vocabulary of all words with at least ``min_count`` occurrences, in first-seen order."""
        counts: dict[str, int] = {}
        for text in corpus:
            for w in cls.split(text):
                counts[w] = counts.get(w, 0) + 1
        return cls([PAD, UNK] + [w for w, c in counts.items() if c >= min_count])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """int64 (max_len,) ids, truncated / zero-padded."""
        ids = [self.index.get(w, 1) for w in self.split(text)][:max_len]
        out = np.zeros(max_len, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def encode_many(self, texts: Sequence[str], num: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Encode up to ``num`` narrations: ids (num, max_len), mask (num,) of real candidates."""
        ids = np.zeros((num, max_len), dtype=np.int64)
        mask = np.zeros(num, dtype=bool)
        for p, t in enumerate(list(texts)[:num]):
            ids[p] = self.encode(t, max_len)
            mask[p] = True
        return ids, mask

    def state_dict(self) -> dict[str, Any]:
        return {"vocab": self.vocab}


def collate(clips: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack clips: video (B,C,T,H,W), audio (B,L), text (B,P,S), text_mask (B,P), label/misaligned/index (B,)."""
    out: dict[str, torch.Tensor] = {}
    for key in ("video", "audio", "text", "text_mask"):
        out[key] = torch.from_numpy(np.stack([c[key] for c in clips]))
    for key in ("label", "misaligned", "index"):
        out[key] = torch.tensor([int(c[key]) for c in clips], dtype=torch.long)
    return out


class EpochBatchSampler:
    """Global batches of indices, a fresh permutation each epoch, drop_last; resumable.

    The permutation of epoch e is ``default_rng([seed, e]).permutation(n)``; each rank takes its
    contiguous ``batch_size // world_size`` slice of the global batch, so a DDP run sees exactly
    the samples of a single-process run with the same global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world_size}")
        if n < batch_size:
            raise ValueError(f"data set of {n} clips is smaller than one batch ({batch_size})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(global batch indices (B,), this rank's indices (B/world,)) and advance."""
        if self.cursor + self.batch_size > self.n:
            self.epoch += 1
            self.cursor = 0
            self._perm = self._permutation(self.epoch)
        glob = self._perm[self.cursor: self.cursor + self.batch_size]
        self.cursor += self.batch_size
        per = self.batch_size // self.world_size
        return glob, glob[self.rank * per: (self.rank + 1) * per]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n, "batch_size": self.batch_size}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        if sd["n"] != self.n or sd["batch_size"] != self.batch_size:
            raise ValueError(f"checkpoint data loader was for {sd['n']} clips / batch {sd['batch_size']}, "
                             f"this run has {self.n} / {self.batch_size}")
        self.epoch, self.cursor = sd["epoch"], sd["cursor"]
        self._perm = self._permutation(self.epoch)


class Subset:
    """A range of another data set's clips (re-indexed from 0), keeping its tokenizer and ground truth."""

    def __init__(self, base: ClipDataset, indices: range):
        self.tokenizer = base.tokenizer
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        clip = dict(self.base[self.indices[i]])
        clip["index"] = i
        return clip

    def ground_truth(self) -> tuple[np.ndarray, np.ndarray]:
        """(label, misaligned) of the selected clips (-1 where unknown)."""
        if hasattr(self.base, "ground_truth"):
            lab, mis = self.base.ground_truth()
            idx = np.asarray(self.indices)
            return lab[idx], mis[idx]
        return np.full(len(self), -1), np.full(len(self), -1)


def load_batch(dataset: ClipDataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Read ``indices`` from ``dataset`` and collate."""
    return collate([dataset[int(i)] for i in indices])
