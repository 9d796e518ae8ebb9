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

__all__ = ["Use", "LayerRule", "register", "rule_for", "RULES", "per_sample_rows", "Stacked", "stack_calls"]


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

    ``prepare(module, uses, B)`` -> a state (views of the captured tensors where possible,
    kept from the Gram to the combination); ``gram(module, state, K)`` -> (B, K, K);
    ``combine(module, state, w)`` -> one gradient per parameter in ``params(module)`` (same
    order). ``uses`` holds every call of the module in the forward pass with its K output
    gradients (a zero tensor stands in for a loss that does not reach a call).
    """

    name = "layer"

    def supports(self, module: nn.Module) -> bool:
        """False when this instance's options fall outside the rule (then the fallback runs)."""
        return True

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters(recurse=False) if p.requires_grad]

    def prepare(self, module: nn.Module, uses: list[Use], B: int):
        raise NotImplementedError

    def gram(self, module: nn.Module, state, K: int) -> Tensor:
        raise NotImplementedError

    def combine(self, module: nn.Module, state, w: Tensor) -> list[Tensor]:
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


def use_views(uses: list[Use], B: int, what: str) -> list[tuple[Tensor, list[Tensor]]]:
    """Per call: inputs a (B, T_u, d_in) and K output gradients b^k (B, T_u, d_out).

    Views of the captured tensors where their layout allows (no copies, no concatenation):
    a layer called several times (a modality-agnostic backbone) keeps one entry per call.
    """
    out = []
    for u in uses:
        a = u.inputs[0]
        per_sample_rows(a, B, what)
        out.append((a.reshape(B, -1, a.shape[-1]), [g.reshape(B, -1, g.shape[-1]) for g in u.grads]))
    return out


class Stacked:
    """A linear map's captured tensors over all its calls, in the layout its Gram and combination use.

    Attributes:
        a: (B, T, d_in) inputs, the tokens of all calls of one sample along T.
        b: K output gradients (B, T, d_out), same token order.
    Views of the captured tensors when the layer ran once; one concatenation over the calls
    otherwise (a modality-agnostic backbone runs each layer once per modality).
    """

    __slots__ = ("a", "b")

    def __init__(self, a: Tensor, b: list[Tensor]) -> None:
        self.a, self.b = a, b


def stack_calls(calls: list[tuple[Tensor, list[Tensor]]]) -> Stacked:
    """:class:`Stacked` from per-call inputs a (B, T_u, d_in) and K output gradients (B, T_u, d_out).

    Inputs are cast to the gradients' dtype.
    """
    K = len(calls[0][1])
    dt = calls[0][1][0].dtype
    if len(calls) == 1:
        a, b = calls[0]
        return Stacked(a.to(dt), list(b))
    return Stacked(torch.cat([a.to(dt) for a, _ in calls], dim=1),
                   [torch.cat([bs[k] for _, bs in calls], dim=1) for k in range(K)])


def linear_gram(st: Stacked, mode: str = "auto") -> Tensor:
    """Per-sample Gram (B, K, K) of the weight gradients ``G^k_i = sum_t b^k_{i,t} a_{i,t}^T``.

    Args:
        st: the layer's :class:`Stacked` tensors (a (B, T, d_in), K times b (B, T, d_out)).
        mode: "ghost": ``<G^k_i, G^l_i> = <b^k_i, (a_i a_i^T) b^l_i>`` (Opacus's ghost-norm
            identity across losses, associated so that the (T, T) input Gram multiplies each
            output gradient once: cost ~ T^2 (d_in + K d_out) + K^2 T d_out per sample);
            "materialize": this layer's per-sample gradients (B, K, d_out*d_in), then their
            Gram (cost ~ K T d_in d_out + K^2 d_in d_out); "auto": the cheaper of the two
            by those counts.
    """
    a, b = st.a, st.b
    K = len(b)
    B, T, d_out = b[0].shape
    d_in = a.shape[-1]
    if mode == "auto":
        mode = "ghost" if ghost_cost(T, d_in, d_out, K) <= materialize_cost(T, d_in, d_out, K) else "materialize"
    if mode == "ghost":
        aa = torch.bmm(a, a.transpose(1, 2))  # (B, T, T)
        flat = [bk.reshape(B, 1, -1) for bk in b]
        M = torch.empty(B, K, K, dtype=b[0].dtype, device=b[0].device)
        for l in range(K):
            y = torch.bmm(aa, b[l]).view(B, -1, 1)  # (a a^T) b^l, one (T, T) x (T, d_out) product per loss
            for k in range(l + 1):
                M[:, k, l] = M[:, l, k] = torch.bmm(flat[k], y).view(B)
        return M
    G = torch.empty(B, K, d_out * d_in, dtype=b[0].dtype, device=b[0].device)  # per-sample gradients
    for k in range(K):
        torch.bmm(b[k].transpose(1, 2), a, out=G[:, k].view(B, d_out, d_in))
    return torch.bmm(G, G.transpose(1, 2))


def ghost_cost(T: int, d_in: int, d_out: int, K: int) -> int:
    """Multiply-adds of the ghost Gram of one sample (see :func:`linear_gram`)."""
    return T * T * d_in + K * T * T * d_out + K * K * T * d_out


def materialize_cost(T: int, d_in: int, d_out: int, K: int) -> int:
    """Multiply-adds of the materialized per-sample gradients and their Gram, one sample."""
    return K * T * d_in * d_out + K * K * d_in * d_out


def weighted(b: list[Tensor], w: Tensor) -> Tensor:
    """``sum_k w_{k,i} b^k_i``: (B, ...) from K tensors (B, ...) and w (B, K)."""
    w = w.to(b[0].dtype)
    shape = (-1,) + (1,) * (b[0].ndim - 1)
    c = b[0] * w[:, 0].view(shape)
    for k in range(1, len(b)):
        c.add_(b[k] * w[:, k].view(shape))
    return c


def combine_linear(st: Stacked, w: Tensor) -> Tensor:
    """``sum_i (sum_k w_{k,i} b^k_i)^T a_i`` over all calls: (d_out, d_in); w (B, K)."""
    c = weighted(st.b, w)
    return c.reshape(-1, c.shape[-1]).T @ st.a.reshape(-1, st.a.shape[-1])


def bias_per_sample(st: Stacked) -> Tensor:
    """(B, K, d_out) per-sample bias gradients ``sum_t b^k_{i,t}`` over all calls."""
    return torch.stack([bk.sum(1) for bk in st.b], dim=1)


def gram_of(G: Tensor) -> Tensor:
    """(B, K, K) Gram of small materialized per-sample gradients G (B, K, D)."""
    return G @ G.transpose(1, 2)
