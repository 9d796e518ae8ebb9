"""solve: gram -> per-sample solve (sum / PCGrad / GradVac), no combine, on every backend."""

from __future__ import annotations

import pytest
import torch
from _helpers import check_solve, fresh_seed, make_inputs, op_table, skip_if_too_big_for

from gradharmony.engine import reference as R


@pytest.mark.parametrize("dtype,B,K,D,scale", op_table())
def test_solve(backend, dtype, B, K, D, scale):
    skip_if_too_big_for(backend, B, K, D)
    seed = fresh_seed("solve", backend.name, dtype, B, K, D, scale)
    inp = make_inputs(B, K, D, dtype, backend.device, scale, seed)
    backend.skip_unless(inp.G)
    for method in (0, 1, 2):
        for order in (None, inp.order):
            target = inp.target if method == 2 else None
            info = (f"seed={seed} backend={backend.name} dtype={dtype} B={B} K={K} D={D} "
                    f"scale={scale:g} method={method} order={'rand' if order is not None else None}")
            res = backend.impl.solve(inp.G, method, order, target)
            assert type(res).__name__ == "SolveOutput", info
            check_solve(res.gram, res.cos, res.weights, res.phi, inp.G, method, order, target, info)


def test_solve_degenerate(backend):
    """Zero samples, zero-width rows and all-zero gradients: cos 0, w 1 (nothing projected),
    phi 0, no NaN."""
    target = torch.full((3, 3), 0.5, device=backend.device)
    for shape in ((0, 3, 5), (2, 3, 0), (4, 3, 10)):
        G = torch.zeros(*shape, device=backend.device)
        backend.skip_unless(G)
        for m in (0, 1, 2):
            M, cos, w, phi = backend.impl.solve(G, m, None, target)
            assert M.shape == cos.shape == (shape[0], 3, 3) and w.shape == (shape[0], 3)
            assert (M == 0).all() and (cos == 0).all() and (w == 1).all()
            assert phi is None if m != 2 else (phi == 0).all()


def test_solve_matches_fused(backend):
    """solve is fused without its combine: same M, cos, w, phi (up to the Gram's summation
    order, which may differ between the kernels' paths)."""
    seed = fresh_seed("solve-fused", backend.name)
    inp = make_inputs(5, 3, 64, torch.float32, backend.device, 1.0, seed)
    for m in (1, 2):
        t = inp.target if m == 2 else None
        s = backend.impl.solve(inp.G, m, inp.order, t)
        f = backend.impl.fused(inp.G, m, inp.order, t, "none")
        for name in ("gram", "cos", "weights", "phi"):
            a, b = getattr(s, name), getattr(f, name)
            if a is None:
                assert b is None
                continue
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda msg: f"{name} seed={seed}: {msg}")
    torch.testing.assert_close(R.gram_solve(inp.G.cpu(), 1).weights, backend.impl.solve(inp.G, 1, None, None).weights.cpu(),
                               rtol=1e-4, atol=1e-5)
