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
        """Per-sample gradients (B, K, d) of gamma and beta (those that require grad).

        Summed call by call and loss by loss (no stacked or concatenated copy of the b^k).
        """
        D = math.prod(module.normalized_shape)
        want_w = module.weight is not None and module.weight.requires_grad
        want_b = module.bias is not None and module.bias.requires_grad
        K = len(uses[0].grads)
        gw: list = [None] * K
        gb: list = [None] * K
        for u in uses:
            x = u.inputs[0]
            per_sample_rows(x, B, f"LayerNorm {module}")
            xhat = None
            for k, g in enumerate(u.grads):
                g = g.reshape(B, -1, D)
                if want_w:
                    if xhat is None:
                        xhat = F.layer_norm(x.detach(), module.normalized_shape, None, None, module.eps)
                        xhat = xhat.reshape(B, -1, D).to(g.dtype)
                    part = torch.mul(g, xhat).sum(1)
                    gw[k] = part if gw[k] is None else gw[k].add_(part)
                if want_b:
                    part = g.sum(1)
                    gb[k] = part if gb[k] is None else gb[k].add_(part)
        out = []
        if want_w:
            out.append(torch.stack(gw, dim=1))
        if want_b:
            out.append(torch.stack(gb, dim=1))
        return out

    def gram(self, module: nn.Module, state, K: int) -> Tensor:
        return sum(gram_of(g) for g in state)

    def combine(self, module: nn.Module, state, w: Tensor) -> list[Tensor]:
        shape = module.normalized_shape
        return [torch.einsum("bk,bkd->d", w.to(g.dtype), g).view(shape) for g in state]
