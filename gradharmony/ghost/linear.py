"""nn.Linear: weight by the ghost Gram (or materialized, per layer, by cost), bias by sums."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import LayerRule, Use, combine_linear, gram_of, linear_gram, register, stacked_grads


@register(nn.Linear)
class LinearRule(LayerRule):
    """Inputs (N, d_in) or (N, ..., d_in); ``G_i = sum_t b_{i,t} a_{i,t}^T``, bias ``sum_t b_{i,t}``."""

    name = "linear"
    mode = "auto"  # "ghost" | "materialize" | "auto" (tests force each)

    def gram(self, module: nn.Module, uses: list[Use], B: int, K: int) -> Tensor:
        a, b = stacked_grads(uses, B, f"Linear {module}", 1)
        M = 0
        if module.weight.requires_grad:
            M = linear_gram(a.to(b.dtype), b, self.mode)
        if module.bias is not None and module.bias.requires_grad:
            M = M + gram_of(b.sum(2))
        return M

    def combine(self, module: nn.Module, uses: list[Use], w: Tensor) -> list[Tensor]:
        B = w.shape[0]
        a, b = stacked_grads(uses, B, f"Linear {module}", 1)
        out = []
        if module.weight.requires_grad:
            out.append(combine_linear(a.to(b.dtype), b, w))
        if module.bias is not None and module.bias.requires_grad:
            out.append(((w.to(b.dtype)[:, :, None] * b.sum(2)).sum((0, 1))))
        return out
