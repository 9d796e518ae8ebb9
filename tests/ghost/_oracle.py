"""Explicit float64 oracle of the path decomposition.

Each parameter gets B per-sample copies; sample i's forward runs with copy i (a loop of
``functional_call`` over samples), the K losses are computed on the stacked outputs as in
the batch, and ``dL_k / d copy_i`` is exactly ``g_{k,i}``, the part of ``dL_k/dtheta`` that
flows through sample i's forward pass. Gram, rule, curriculum and combination then run in
the reference engine (:func:`gradharmony.harmonize`, ``backend="torch"``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

import gradharmony as gh


def per_sample_path_grads(model: nn.Module, sample_forward: Callable[[nn.Module, dict, int], dict],
                          losses_fn: Callable[[list], list], B: int) -> tuple[list[str], list[Tensor]]:
    """Names and per-loss per-sample gradients: K tensors (B, P) (None-param grads are NaN-free zeros)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    copies = {n: params[n].detach().unsqueeze(0).repeat(B, *([1] * params[n].ndim)).requires_grad_()
              for n in names}
    outs = []
    for i in range(B):
        outs.append(sample_forward(model, {n: copies[n][i] for n in names}, i))
    losses = losses_fn(outs)
    G, reached = [], []
    for L in losses:
        gs = torch.autograd.grad(L, [copies[n] for n in names], retain_graph=True, allow_unused=True)
        reached.append([g is not None for g in gs])
        G.append([torch.zeros_like(copies[n]) if g is None else g for n, g in zip(names, gs)])
    return names, G, reached


def expected_grads(model: nn.Module, sample_forward, losses_fn, B: int, rule: gh.Rule,
                   curriculum: Optional[gh.ConflictCurriculum], shared_only: bool = True) -> dict[str, Tensor]:
    names, G, reached = per_sample_path_grads(model, sample_forward, losses_fn, B)
    K = len(G)
    n_reach = [sum(reached[k][j] for k in range(K)) for j in range(len(names))]
    shared = [j for j in range(len(names)) if n_reach[j] >= 2 or (not shared_only and n_reach[j] >= 1)]
    out: dict[str, Tensor] = {}
    if shared:
        Gs = torch.stack([torch.cat([G[k][j].reshape(B, -1) for j in shared], 1) for k in range(K)], 1)
        res = gh.harmonize(Gs, rule, reduction="sum", curriculum=curriculum, backend="torch")
        off = 0
        for j in shared:
            n = G[0][j][0].numel()
            out[names[j]] = res.grad[off:off + n].view(G[0][j].shape[1:])
            off += n
    for j, nm in enumerate(names):
        if j in shared or n_reach[j] == 0:
            continue
        (k,) = [k for k in range(K) if reached[k][j]]
        out[nm] = G[k][j].sum(0)
    return out
