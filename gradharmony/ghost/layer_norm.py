"""nn.LayerNorm: per-sample gradients of gamma and beta are small (d each): materialized.

gamma: ``sum_t b_{i,t} * xhat_{i,t}`` with xhat the normalized input; beta: ``sum_t b_{i,t}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import LayerRule, Use, gram_of, per_sample_rows, register


@register(nn.LayerNorm)
class LayerNormRule(LayerRule):
    name = "layer_norm"

    def prepare(self, module: nn.LayerNorm, uses: list[Use], B: int) -> list[Tensor]:
        """Per-sample gradients (B, K, d) of gamma and beta (those that require grad)."""
        D = math.prod(module.normalized_shape)
        xs, bs = [], []
        for u in uses:
            x = u.inputs[0]
            per_sample_rows(x, B, f"LayerNorm {module}")
            xhat = F.layer_norm(x.detach(), module.normalized_shape, None, None, module.eps)
            xs.append(xhat.reshape(B, -1, D))
            bs.append(torch.stack([g.reshape(B, -1, D) for g in u.grads], dim=1))
        xhat = torch.cat(xs, 1) if len(xs) > 1 else xs[0]
        b = torch.cat(bs, 2) if len(bs) > 1 else bs[0]
        out = []
        if module.weight is not None and module.weight.requires_grad:
            out.append(torch.einsum("bktd,btd->bkd", b, xhat.to(b.dtype)))
        if module.bias is not None and module.bias.requires_grad:
            out.append(b.sum(2))
        return out

    def gram(self, module: nn.Module, state, K: int) -> Tensor:
        return sum(gram_of(g) for g in state)

    def combine(self, module: nn.Module, state, w: Tensor) -> list[Tensor]:
        shape = module.normalized_shape
        return [torch.einsum("bk,bkd->d", w.to(g.dtype), g).view(shape) for g in state]
