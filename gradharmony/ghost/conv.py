"""Patch tokenizers: nn.Conv1d/2d/3d with kernel == stride (no padding, dilation 1, groups 1).

Such a convolution is a linear map applied to non-overlapping patches: the input is cut
into patches (N, L, C * prod(kernel)) (a trailing remainder that the convolution ignores is
cropped) and the Linear rule applies with d_in = C * prod(kernel), d_out = out_channels.
"""

from __future__ import annotations

from torch import Tensor, nn

from .linear import LinearRule
from .registry import Use, per_sample_rows, register, stack_calls


def patches(x: Tensor, kernel: tuple[int, ...]) -> Tensor:
    """(N, C, *spatial) -> (N, L, C * prod(kernel)), patches in the convolution's output order."""
    n, c = x.shape[:2]
    dims = len(kernel)
    grid = [s // k for s, k in zip(x.shape[2:], kernel)]
    x = x[(slice(None), slice(None)) + tuple(slice(0, g * k) for g, k in zip(grid, kernel))]
    shape = [n, c]
    for g, k in zip(grid, kernel):
        shape += [g, k]
    x = x.reshape(shape)
    # (N, C, g1, k1, g2, k2, ...) -> (N, g1, g2, ..., C, k1, k2, ...)
    perm = [0] + [2 + 2 * i for i in range(dims)] + [1] + [3 + 2 * i for i in range(dims)]
    x = x.permute(perm)
    L = 1
    for g in grid:
        L *= g
    return x.reshape(n, L, -1)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class PatchConvRule(LinearRule):
    """Convolution with kernel_size == stride, padding 0, dilation 1, groups 1, zeros padding mode.

    The Linear rule's Gram and combination on the patches (only ``prepare`` differs).
    """

    name = "patch_conv"
    mode = "auto"

    def supports(self, module: nn.Module) -> bool:
        m = module
        return (tuple(m.kernel_size) == tuple(m.stride) and all(p == 0 for p in _tuple(m.padding))
                and all(d == 1 for d in m.dilation) and m.groups == 1 and m.padding_mode == "zeros")

    def prepare(self, module: nn.Module, uses: list[Use], B: int):
        calls = []
        for u in uses:
            x = u.inputs[0]
            per_sample_rows(x, B, f"{type(module).__name__} {module}")
            p = patches(x, tuple(module.kernel_size))  # (N, L, d_in)
            calls.append((p.reshape(B, -1, p.shape[-1]),
                          [g.flatten(2).transpose(1, 2).reshape(B, -1, g.shape[1]) for g in u.grads]))
        return stack_calls(calls)


def _tuple(p) -> tuple:
    if isinstance(p, str):  # "valid" is padding 0; "same" is not a patch map
        return (0,) if p == "valid" else (1,)
    return tuple(p)
