"""Layer registry of the ghost Gram: one :class:`LayerRule` per layer type.

A rule knows, for one module type, how to turn the module's captured inputs ``a`` and the
gradients ``b^k`` of the K losses w.r.t. its outputs into

- ``gram``: its contribution (B, K, K) to the per-sample Gram matrices
  ``<G^k_i, G^l_i>`` over the module's own parameters, and
- ``combine``: the gradients of its parameters for per-sample, per-loss weights
  ``w (B, K)``: ``sum_i sum_k w_{k,i} G^k_i`` (one contraction, no per-sample tensor).

Rows of a captured tensor belong to samples in contiguous groups: a layer input with
``N = B * m`` rows gives rows ``i*m .. (i+1)*m - 1`` to sample i (a (B*P, S, d) text batch
reshaped from (B, P, S, d) has this layout).

Adding a layer type is one small module with a ``@register(nn.SomeLayer)`` rule; the
registry is filled when :mod:`gradharmony.ghost` is imported (its ``__init__`` imports
every rule module explicitly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["Use", "LayerRule", "register", "rule_for", "RULES", "per_sample_rows"]


@dataclass
class Use:
    """One call of a module during the captured forward.

    Attributes:
        inputs: the positional inputs of the call (tensors as they were).
        out: the output tensor (the tensor the loss gradients are taken with respect to).
        grads: after the backward passes, K entries: dL_k/d out, or None where loss k
            does not reach this output.
    """

    inputs: tuple
    out: Tensor
    grads: list = field(default_factory=list)


def per_sample_rows(x: Tensor, B: int, what: str) -> int:
    """Rows per sample ``m = N / B`` of a captured tensor with N rows (error if not a multiple)."""
    N = x.shape[0]
    if B <= 0 or N % B:
        raise ValueError(
            f"{what}: a captured tensor has {N} rows, not a multiple of the batch size {B}; "
            "rows of one sample must be contiguous groups of N / B rows"
        )
    return N // B


class LayerRule:
    """Base of the per-layer-type rules (see the module docstring).

    ``gram(module, uses, B, K)`` -> (B, K, K); ``combine(module, uses, w)`` -> one
    gradient per parameter in ``params(module)`` (same order). ``uses`` holds every call of
    the module in the forward pass with its K output gradients (a zero tensor stands in
    for a loss that does not reach a call).
    """

    name = "layer"

    def supports(self, module: nn.Module) -> bool:
        """False when this instance's options fall outside the rule (then the fallback runs)."""
        return True

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters(recurse=False) if p.requires_grad]

    def gram(self, module: nn.Module, uses: list[Use], B: int, K: int) -> Tensor:
        raise NotImplementedError

    def combine(self, module: nn.Module, uses: list[Use], w: Tensor) -> list[Tensor]:
        raise NotImplementedError


RULES: dict[type, LayerRule] = {}


def register(*types: type) -> Callable[[type], type]:
    """Class decorator: the decorated :class:`LayerRule` handles modules of ``types``."""

    def deco(cls: type) -> type:
        inst = cls()
        for t in types:
            RULES[t] = inst
        return cls

    return deco


def rule_for(module: nn.Module) -> Optional[LayerRule]:
    """The registered rule for ``module``'s exact type, if it supports its options."""
    r = RULES.get(type(module))
    if r is not None and r.supports(module):
        return r
    return None


def stacked_grads(uses: list[Use], B: int, what: str, trailing: int) -> tuple[Tensor, Tensor]:
    """Inputs (B, T, d_in) and output gradients (B, K, T, d_out) of all uses, concatenated over T.

    ``trailing`` is the number of trailing feature dims of the inputs that are kept as one
    (1 for Linear: (..., d_in)); the outputs' last dim is d_out.
    """
    a_parts, b_parts = [], []
    for u in uses:
        a = u.inputs[0]
        m = per_sample_rows(a, B, what)
        d_in = a.shape[-1]
        a_parts.append(a.reshape(B, -1, d_in))
        b_parts.append(torch.stack([g.reshape(B, -1, g.shape[-1]) for g in u.grads], dim=1))
        del m
    a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1)
    b = b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts, dim=2)
    return a, b


def linear_gram(a: Tensor, b: Tensor, mode: str = "auto") -> Tensor:
    """Per-sample Gram (B, K, K) of the weight gradients ``G^k_i = sum_t b^k_{i,t} a_{i,t}^T``.

    Args:
        a: (B, T, d_in) inputs; b: (B, K, T, d_out) output gradients.
        mode: "ghost" (``sum_{t,s} (a_t.a_s)(b^k_t.b^l_s)``, Opacus's ghost-norm identity
            across losses, cost ~ T^2 (d_in + K^2 d_out)), "materialize" (per-sample
            gradients (B, K, d_out*d_in) of this layer, cost ~ K T d_in d_out), or "auto"
            (the cheaper of the two by that count).
    """
    B, K, T, d_out = b.shape
    d_in = a.shape[-1]
    if mode == "auto":
        mode = "ghost" if ghost_cost(T, d_in, d_out, K) <= materialize_cost(T, d_in, d_out, K) else "materialize"
    if mode == "ghost":
        aa = a @ a.transpose(1, 2)  # (B, T, T)
        bf = b.reshape(B, K * T, d_out)
        bb = (bf @ bf.transpose(1, 2)).view(B, K, T, K, T)
        return torch.einsum("bksln,bsn->bkl", bb, aa)
    G = (b.transpose(2, 3).reshape(B, K * d_out, T) @ a).reshape(B, K, d_out * d_in)
    return G @ G.transpose(1, 2)


def ghost_cost(T: int, d_in: int, d_out: int, K: int) -> int:
    """Multiply-adds of the ghost Gram of one sample (see :func:`linear_gram`)."""
    return T * T * d_in + (K * T) ** 2 * d_out + K * K * T * T


def materialize_cost(T: int, d_in: int, d_out: int, K: int) -> int:
    """Multiply-adds of the materialized per-sample gradients and their Gram, one sample."""
    return K * T * d_in * d_out + K * K * d_in * d_out


def combine_linear(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """``sum_i (sum_k w_{k,i} b^k_i)^T a_i``: (d_out, d_in) from a (B, T, d_in), b (B, K, T, d_out), w (B, K)."""
    c = torch.einsum("bk,bktd->btd", w.to(b.dtype), b)
    return c.reshape(-1, c.shape[-1]).T @ a.reshape(-1, a.shape[-1])


def gram_of(G: Tensor) -> Tensor:
    """(B, K, K) Gram of small materialized per-sample gradients G (B, K, D)."""
    return G @ G.transpose(1, 2)
