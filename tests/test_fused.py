"""fused: gram -> per-sample solve -> combine on every backend vs the reference and a float64 oracle."""

from __future__ import annotations

import pytest
import torch
from _helpers import check_fused, fresh_seed, make_inputs, op_table, skip_if_too_big_for


@pytest.mark.parametrize("dtype,B,K,D,scale", op_table())
def test_fused(backend, dtype, B, K, D, scale):
    skip_if_too_big_for(backend, B, K, D)
    seed = fresh_seed("fused", backend.name, dtype, B, K, D, scale)
    inp = make_inputs(B, K, D, dtype, backend.device, scale, seed)
    backend.skip_unless(inp.G)
    for method in (0, 1, 2):
        for r, reduction in enumerate(("none", "sum")):
            order = inp.order if (method + r) % 3 else None
            target = inp.target if method == 2 else None
            info = (f"seed={seed} backend={backend.name} dtype={dtype} B={B} K={K} D={D} scale={scale:g} "
                    f"method={method} reduction={reduction} order={'rand' if order is not None else None}")
            res = backend.impl.fused(inp.G, method, order, target, reduction)
            assert type(res).__name__ == "FusedOutput", info
            assert res.out.shape == ((B, D) if reduction == "none" else (D,)), info
            check_fused(res, inp.G, method, order, target, reduction, info)


def test_fused_degenerate(backend):
    target = torch.full((3, 3), 0.5, device=backend.device)
    for shape in ((0, 3, 5), (2, 3, 0), (4, 3, 10)):
        G = torch.zeros(*shape, device=backend.device)
        backend.skip_unless(G)
        for m in (0, 1, 2):
            for reduction in ("none", "sum"):
                out, M, cos, w, phi = backend.impl.fused(G, m, None, target, reduction)
                assert out.shape == ((shape[0], shape[2]) if reduction == "none" else (shape[2],))
                assert (out == 0).all() and (cos == 0).all() and (w == 1).all()
