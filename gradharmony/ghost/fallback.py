"""Generic fallback: per-sample gradients of one module's own parameters via torch.func.

For a module without a registered rule, each call's input (N, ...) is split into B groups of
N / B rows; ``vmap`` over samples (and over the K output gradients) of ``grad`` of
``<module(x_i), b^k_i>`` gives the module's per-sample gradients (B, K, P_module), from which
its Gram and its combined gradient follow. Exact for any module whose rows of one sample do
not interact with other samples' rows; it costs B * K small backward passes of that module
and B * K * P_module memory, hence the warning that names the module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .registry import Use, per_sample_rows


def own_params(module: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def per_sample(module: nn.Module, uses: list[Use], B: int, name: str) -> Tensor:
    """(B, K, P_module) per-sample gradients of ``module``'s own parameters, summed over calls."""
    params = {n: p.detach() for n, p in own_params(module).items()}
    total = None
    for u in uses:
        if len(u.inputs) != 1 or not isinstance(u.inputs[0], Tensor):
            raise ValueError(f"the fallback for module {name} needs one tensor input per call")
        x = u.inputs[0].detach()
        m = per_sample_rows(x, B, f"module {name}")
        xs = x.reshape(B, m, *x.shape[1:])
        cot = torch.stack([g.reshape(B, m, *g.shape[1:]) for g in u.grads], dim=1)  # (B, K, m, ...)

        def inner(p: dict[str, Tensor], xi: Tensor, bi: Tensor) -> Tensor:
            return (functional_call(module, p, (xi,)) * bi).sum()

        per = vmap(vmap(grad(inner), in_dims=(None, None, 0)), in_dims=(None, 0, 0))(params, xs, cot)
        g = torch.cat([per[n].reshape(B, cot.shape[1], -1) for n in params], dim=2)
        total = g if total is None else total + g
    assert total is not None
    return total


def combine(module: nn.Module, g: Tensor, w: Tensor) -> list[Tensor]:
    """The module's parameter gradients ``sum_i sum_k w_{k,i} g_{k,i}`` from g (B, K, P_module)."""
    flat = torch.einsum("bk,bkd->d", w.to(g.dtype), g)
    out, off = [], 0
    for p in own_params(module).values():
        out.append(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    return out
