"""combine: ``out_b = w_b^T G_b`` (reduction "none") or its sum over b ("sum") on every backend."""

from __future__ import annotations

import pytest
import torch
from _helpers import check_combine, fresh_seed, make_inputs, op_table, skip_if_too_big_for


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("dtype,B,K,D,scale", op_table(big_k=True))
def test_combine(backend, dtype, B, K, D, scale, reduction):
    skip_if_too_big_for(backend, B, K, D)
    seed = fresh_seed("combine", backend.name, dtype, B, K, D, scale, reduction)
    inp = make_inputs(B, K, D, dtype, backend.device, scale, seed)
    backend.skip_unless(inp.G)
    info = f"seed={seed} backend={backend.name} dtype={dtype} B={B} K={K} D={D} scale={scale:g}"
    out = backend.impl.combine(inp.G, inp.w, reduction)
    assert out.shape == ((B, D) if reduction == "none" else (D,)), info
    check_combine(out, inp.G, inp.w, reduction, info)


@pytest.mark.parametrize("shape", [(0, 3, 5), (3, 2, 0)])
def test_combine_empty(backend, shape):
    G = torch.randn(*shape, device=backend.device)
    backend.skip_unless(G)
    w = torch.ones(shape[0], shape[1], device=backend.device)
    assert backend.impl.combine(G, w, "none").shape == (shape[0], shape[2])
    out = backend.impl.combine(G, w, "sum")
    assert out.shape == (shape[2],) and (out == 0).all()
