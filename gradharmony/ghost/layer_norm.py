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

    def _stack(self, module: nn.LayerNorm, uses: list[Use], B: int) -> tuple[Tensor, Tensor]:
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
        return xhat.to(b.dtype), b

    def _per_sample(self, module: nn.LayerNorm, uses: list[Use], B: int) -> list[Tensor]:
        xhat, b = self._stack(module, uses, B)
        out = []
        if module.weight is not None and module.weight.requires_grad:
            out.append(torch.einsum("bktd,btd->bkd", b, xhat))
        if module.bias is not None and module.bias.requires_grad:
            out.append(b.sum(2))
        return out

    def gram(self, module: nn.Module, uses: list[Use], B: int, K: int) -> Tensor:
        return sum(gram_of(g) for g in self._per_sample(module, uses, B))

    def combine(self, module: nn.Module, uses: list[Use], w: Tensor) -> list[Tensor]:
        gs = self._per_sample(module, uses, w.shape[0])
        shape = module.normalized_shape
        return [torch.einsum("bk,bkd->d", w.to(g.dtype), g).view(shape) for g in gs]
