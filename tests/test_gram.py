"""gram: ``M_b = G_b G_b^T`` on every backend vs the reference and a float64 oracle."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_within_2x, eps, fresh_seed, make_inputs, op_table, skip_if_too_big_for

from gradharmony.engine import reference as R


@pytest.mark.parametrize("dtype,B,K,D,scale", op_table(big_k=True))
def test_gram(backend, dtype, B, K, D, scale):
    skip_if_too_big_for(backend, B, K, D)
    seed = fresh_seed("gram", backend.name, dtype, B, K, D, scale)
    G = make_inputs(B, K, D, dtype, backend.device, scale, seed).G
    backend.skip_unless(G)
    info = f"seed={seed} backend={backend.name} dtype={dtype} B={B} K={K} D={D} scale={scale:g}"
    M = backend.impl.gram(G)
    assert M.dtype == R.acc_dtype(dtype) and M.shape == (B, K, K), info
    Go = G.double()
    norms = R.gram(Go).diagonal(dim1=1, dim2=2).sqrt()
    atol = 8 * eps(R.acc_dtype(dtype)) * max(D, 1) ** 0.5 * norms.max().item() ** 2
    assert_within_2x("gram", M, R.gram(G), R.gram(Go), atol, info)


@pytest.mark.parametrize("shape", [(0, 3, 5), (3, 2, 0)])
def test_gram_empty(backend, shape):
    G = torch.randn(*shape, device=backend.device)
    backend.skip_unless(G)
    M = backend.impl.gram(G)
    assert M.shape == (shape[0], shape[1], shape[1]) and (M == 0).all()
