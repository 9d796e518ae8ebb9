"""nn.Linear: weight by the ghost Gram (or materialized, per layer, by cost), bias by sums."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import LayerRule, Use, bias_per_sample, combine_linear, gram_of, linear_gram, register, stack_calls, use_views


@register(nn.Linear)
class LinearRule(LayerRule):
    """Inputs (N, d_in) or (N, ..., d_in); ``G_i = sum_t b_{i,t} a_{i,t}^T``, bias ``sum_t b_{i,t}``."""

    name = "linear"
    mode = "auto"  # "ghost" | "materialize" | "auto" (tests force each)

    def prepare(self, module: nn.Module, uses: list[Use], B: int):
        return stack_calls(use_views(uses, B, f"Linear {module}"))

    def gram(self, module: nn.Module, state, K: int) -> Tensor:
        M = 0
        if module.weight.requires_grad:
            M = linear_gram(state, self.mode)
        if module.bias is not None and module.bias.requires_grad:
            M = M + gram_of(bias_per_sample(state))
        return M

    def combine(self, module: nn.Module, state, w: Tensor) -> list[Tensor]:
        out = []
        if module.weight.requires_grad:
            out.append(combine_linear(state, w).view_as(module.weight))  # conv weights: (out, C, *kernel)
        if module.bias is not None and module.bias.requires_grad:
            out.append(torch.einsum("bk,bkd->d", w.to(state.dtype), bias_per_sample(state)))
        return out
