"""Free parameters broadcast over the batch (position embeddings, aggregation tokens).

A parameter p of shape (1, ...) that a module adds to, or concatenates with, every row of
its input is expanded during the captured forward to ``p.expand(N, ...)`` (N = rows of the
call's first tensor input), so that the gradient w.r.t. the expanded tensor holds one slice
per row. Sample i's gradient is the sum of its rows' slices (and over every call): a (B, K,
numel) per-sample tensor, the size of one token's activations per sample, materialized.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Use, per_sample_rows


def is_free(p: Tensor) -> bool:
    """A parameter of shape (1, ...) (ndim >= 2) is treated as broadcast over the batch."""
    return p.ndim >= 2 and p.shape[0] == 1


def per_sample(p: Tensor, uses: list[Use], B: int, name: str) -> Tensor:
    """(B, K, numel) per-sample gradients of free parameter ``p`` summed over its uses."""
    total = None
    for u in uses:
        per_sample_rows(u.out, B, f"parameter {name}")
        g = torch.stack([x.reshape(B, -1, p[0].numel()).sum(1) for x in u.grads], dim=1)
        total = g if total is None else total + g
    assert total is not None
    return total


def combine(p: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """``sum_i sum_k w_{k,i} g_{k,i}`` shaped as p, from per-sample gradients g (B, K, numel)."""
    return torch.einsum("bk,bkd->d", w.to(g.dtype), g).view(p.shape)
