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


def linear_gram(calls: list[tuple[Tensor, list[Tensor]]], mode: str = "auto") -> Tensor:
    """Per-sample Gram (B, K, K) of the weight gradients ``G^k_i = sum_t b^k_{i,t} a_{i,t}^T``.

    Args:
        calls: per call of the layer, inputs a (B, T_u, d_in) and K output gradients
            b^k (B, T_u, d_out); the tokens of all calls of one sample form its sequence.
        mode: "ghost" (``sum_{t,s} (a_t.a_s)(b^k_t.b^l_s)``, Opacus's ghost-norm identity
            across losses, cost ~ T^2 (d_in + K(K+1)/2 d_out) per sample), "materialize"
            (this layer's per-sample gradients (B, K, d_in*d_out), cost ~ K T d_in d_out), or
            "auto" (the cheaper of the two by that count; T = tokens of all calls).
    """
    a0, b0 = calls[0]
    K = len(b0)
    B, _, d_out = b0[0].shape
    d_in = a0.shape[-1]
    dt = b0[0].dtype
    T = sum(a.shape[1] for a, _ in calls)
    if mode == "auto":
        mode = "ghost" if ghost_cost(T, d_in, d_out, K) <= materialize_cost(T, d_in, d_out, K) else "materialize"
    if mode == "ghost":
        M = torch.zeros(B, K, K, dtype=dt, device=b0[0].device)
        for au, bu in calls:
            for av, bv in calls:
                aa = torch.bmm(au.to(dt), av.to(dt).transpose(1, 2))  # (B, T_u, T_v)
                for k in range(K):
                    for l in range(k, K):
                        M[:, k, l] += (torch.bmm(bu[k], bv[l].transpose(1, 2)) * aa).sum((1, 2))
        iu = torch.triu_indices(K, K, 1)
        M[:, iu[1], iu[0]] = M[:, iu[0], iu[1]]
        return M
    Gs = []
    for k in range(K):
        G = None
        for a, b in calls:
            part = torch.bmm(a.to(dt).transpose(1, 2), b[k])  # (B, d_in, d_out)
            G = part if G is None else G.add_(part)
        Gs.append(G.view(B, -1))
    G = torch.stack(Gs, dim=1)  # (B, K, d_in*d_out)
    return torch.bmm(G, G.transpose(1, 2))


def ghost_cost(T: int, d_in: int, d_out: int, K: int) -> int:
    """Multiply-adds of the ghost Gram of one sample (see :func:`linear_gram`)."""
    return T * T * d_in + K * (K + 1) // 2 * T * T * (d_out + 1)


def materialize_cost(T: int, d_in: int, d_out: int, K: int) -> int:
    """Multiply-adds of the materialized per-sample gradients and their Gram, one sample."""
    return K * T * d_in * d_out + K * K * d_in * d_out


def weighted(b: list[Tensor], w: Tensor) -> Tensor:
    """``sum_k w_{k,i} b^k_i``: (B, ...) from K tensors (B, ...) and w (B, K)."""
    w = w.to(b[0].dtype)
    shape = (-1,) + (1,) * (b[0].ndim - 1)
    c = b[0] * w[:, 0].view(shape)
    for k in range(1, len(b)):
        c = c + b[k] * w[:, k].view(shape)
    return c


def combine_linear(calls: list[tuple[Tensor, list[Tensor]]], w: Tensor) -> Tensor:
    """``sum_i (sum_k w_{k,i} b^k_i)^T a_i`` over all calls: (d_out, d_in); w (B, K)."""
    out = None
    for a, b in calls:
        c = weighted(b, w)
        part = c.reshape(-1, c.shape[-1]).T @ a.reshape(-1, a.shape[-1]).to(c.dtype)
        out = part if out is None else out.add_(part)
    return out


def bias_per_sample(calls: list[tuple[Tensor, list[Tensor]]]) -> Tensor:
    """(B, K, d_out) per-sample bias gradients ``sum_t b^k_{i,t}`` over all calls."""
    K = len(calls[0][1])
    return torch.stack([sum(b[k].sum(1) for _, b in calls) for k in range(K)], dim=1)


def gram_of(G: Tensor) -> Tensor:
    """(B, K, K) Gram of small materialized per-sample gradients G (B, K, D)."""
    return G @ G.transpose(1, 2)
