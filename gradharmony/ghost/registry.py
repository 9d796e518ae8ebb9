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
    """A linear map's captured tensors over all its calls, as its Gram and combination use them.

    Attributes:
        calls: per call, inputs a (B, T_u, d_in) (in the gradients' dtype) and K output
            gradients b^k (B, T_u, d_out): views of the captured tensors, never concatenated
            (a modality-agnostic backbone runs each layer once per modality).
        T: tokens of all calls of one sample.
    """

    __slots__ = ("calls", "T")

    def __init__(self, calls: list[tuple[Tensor, list[Tensor]]]) -> None:
        self.calls, self.T = calls, sum(a.shape[1] for a, _ in calls)

    @property
    def dtype(self) -> torch.dtype:
        return self.calls[0][1][0].dtype

    def a_all(self) -> Tensor:
        """(B, T, d_in) inputs of all calls along T (a view for one call, else one concatenation)."""
        if len(self.calls) == 1:
            return self.calls[0][0]
        return torch.cat([a for a, _ in self.calls], dim=1)


def stack_calls(calls: list[tuple[Tensor, list[Tensor]]]) -> Stacked:
    """:class:`Stacked` from per-call inputs a (B, T_u, d_in) and K output gradients (B, T_u, d_out)."""
    dt = calls[0][1][0].dtype
    return Stacked([(a.to(dt), list(b)) for a, b in calls])


def linear_gram(st: Stacked, mode: str = "auto") -> Tensor:
    """Per-sample Gram (B, K, K) of the weight gradients ``G^k_i = sum_t b^k_{i,t} a_{i,t}^T``.

    Args:
        st: the layer's :class:`Stacked` calls (a (B, T_u, d_in), K times b (B, T_u, d_out)).
        mode: "ghost": ``<G^k_i, G^l_i> = <b^k_i, (a_i a_i^T) b^l_i>`` over the T tokens of
            all calls (Opacus's ghost-norm identity across losses, associated so that the
            (T, T) input Gram multiplies each output gradient once: cost ~ T^2 (d_in + K d_out)
            + K^2 T d_out per sample); "materialize": this layer's per-sample gradients
            (B, K, d_out*d_in), then their Gram (cost ~ K T d_in d_out + K^2 d_in d_out);
            "auto": the cheaper of the two by those counts.
    """
    calls = st.calls
    b0 = calls[0][1]
    K = len(b0)
    B, _, d_out = b0[0].shape
    d_in = calls[0][0].shape[-1]
    T = st.T
    if mode == "auto":
        mode = "ghost" if ghost_cost(T, d_in, d_out, K) <= materialize_cost(T, d_in, d_out, K) else "materialize"
    if mode == "ghost":
        a = st.a_all()
        aa = torch.bmm(a, a.transpose(1, 2))  # (B, T, T)
        del a
        offs = [0]
        for au, _ in calls:
            offs.append(offs[-1] + au.shape[1])
        M = torch.zeros(B, K, K, dtype=st.dtype, device=b0[0].device)
        for l in range(K):
            y = None  # (a a^T) b^l: (B, T, d_out), one (T, T) x (T, d_out) product per loss
            for v, (_, bv) in enumerate(calls):
                cols = aa[:, :, offs[v]:offs[v + 1]]
                y = torch.bmm(cols, bv[l]) if y is None else y.baddbmm_(cols, bv[l])
            for u, (_, bu) in enumerate(calls):
                yu = y[:, offs[u]:offs[u + 1]].reshape(B, -1, 1)
                for k in range(l + 1):
                    M[:, k, l] += torch.bmm(bu[k].reshape(B, 1, -1), yu).view(B)
        iu = torch.triu_indices(K, K, 1)
        M[:, iu[1], iu[0]] = M[:, iu[0], iu[1]]
        return M
    G = torch.empty(B, K, d_out * d_in, dtype=st.dtype, device=b0[0].device)  # per-sample gradients
    for k in range(K):
        Gk = G[:, k].view(B, d_out, d_in)
        for j, (a, b) in enumerate(calls):
            if j == 0:
                torch.bmm(b[k].transpose(1, 2), a, out=Gk)
            else:
                Gk.baddbmm_(b[k].transpose(1, 2), a)
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
    out = None
    for a, b in st.calls:
        c = weighted(b, w)
        part = c.reshape(-1, c.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        out = part if out is None else out.add_(part)
    return out


def bias_per_sample(st: Stacked) -> Tensor:
    """(B, K, d_out) per-sample bias gradients ``sum_t b^k_{i,t}`` over all calls."""
    K = len(st.calls[0][1])
    return torch.stack([sum(b[k].sum(1) for _, b in st.calls) for k in range(K)], dim=1)


def gram_of(G: Tensor) -> Tensor:
    """(B, K, K) Gram of small materialized per-sample gradients G (B, K, D)."""
    return G @ G.transpose(1, 2)
