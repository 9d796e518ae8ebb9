"""NCE and MIL-NCE against direct float64 formulas (loops, no vectorisation)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

from gradharmony.vatt.losses import gather_features, mil_nce_per_sample, nce_per_sample

TAU = 0.07


def nce_ref(za_all: torch.Tensor, zb_all: torch.Tensor, anchors: range, tau: float) -> list[float]:
    """l_i = -log e^{s_ii} / (e^{s_ii} + sum_{j!=i} e^{s(a_i,b_j)} + sum_{j!=i} e^{s(a_j,b_i)})."""
    za_all, zb_all = za_all.double(), zb_all.double()
    n = za_all.shape[0]
    out = []
    for i in anchors:
        s = lambda a, b: float(za_all[a] @ zb_all[b]) / tau  # noqa: E731
        pos = math.exp(s(i, i))
        neg = sum(math.exp(s(i, j)) for j in range(n) if j != i) + sum(math.exp(s(j, i)) for j in range(n) if j != i)
        out.append(-math.log(pos / (pos + neg)))
    return out


def mil_nce_ref(zv_all: torch.Tensor, zt_all: torch.Tensor, mask_all: torch.Tensor, anchors: range,
                tau: float) -> list[float]:
    zv_all, zt_all = zv_all.double(), zt_all.double()
    n, p, _ = zt_all.shape
    out = []
    for i in anchors:
        s = lambda a, b, q: float(zv_all[a] @ zt_all[b, q]) / tau  # noqa: E731
        pos = sum(math.exp(s(i, i, q)) for q in range(p) if mask_all[i, q])
        neg = sum(math.exp(s(i, j, q)) for j in range(n) for q in range(p) if j != i and mask_all[j, q])
        neg += sum(math.exp(s(j, i, q)) for j in range(n) for q in range(p) if j != i and mask_all[i, q])
        out.append(-math.log(pos / (pos + neg)))
    return out


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("n", [2, 5, 9])
def test_nce_matches_float64_formula(n: int) -> None:
    za, zb = _unit(n, 7, seed=n), _unit(n, 7, seed=n + 100)
    got = nce_per_sample(za, zb, temperature=TAU)
    torch.testing.assert_close(got.double(), torch.tensor(nce_ref(za, zb, range(n), TAU), dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_nce_local_anchors_of_a_gathered_batch() -> None:
    za, zb = _unit(8, 5, seed=1), _unit(8, 5, seed=2)
    got = nce_per_sample(za[4:], zb[4:], za, zb, offset=4, temperature=TAU)
    torch.testing.assert_close(got.double(), torch.tensor(nce_ref(za, zb, range(4, 8), TAU), dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,p", [(2, 1), (4, 3), (7, 2)])
def test_mil_nce_matches_float64_formula(n: int, p: int) -> None:
    zv, zt = _unit(n, 6, seed=n), _unit(n, p, 6, seed=n + p)
    mask = torch.ones(n, p, dtype=torch.bool)
    if p > 1:
        mask[0, -1] = False  # a clip with fewer narrations
    got = mil_nce_per_sample(zv, zt, mask, temperature=TAU)
    ref = torch.tensor(mil_nce_ref(zv, zt, mask, range(n), TAU), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_mil_nce_local_anchors_and_single_candidate_equals_nce() -> None:
    zv, zt = _unit(6, 4, seed=3), _unit(6, 3, 4, seed=4)
    mask = torch.ones(6, 3, dtype=torch.bool)
    got = mil_nce_per_sample(zv[2:4], zt[2:4], mask[2:4], zv, zt, mask, offset=2, temperature=TAU)
    torch.testing.assert_close(got.double(), torch.tensor(mil_nce_ref(zv, zt, mask, range(2, 4), TAU), dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    one = torch.ones(6, 1, dtype=torch.bool)
    torch.testing.assert_close(mil_nce_per_sample(zv, zt[:, :1], one, temperature=TAU),
                               nce_per_sample(zv, zt[:, 0], temperature=TAU))


def test_gather_without_process_group_is_identity() -> None:
    x = torch.randn(3, 2)
    y, off = gather_features(x)
    assert y is x and off == 0


def test_losses_have_gradients_for_all_inputs() -> None:
    zv, zt = _unit(4, 3, seed=5).requires_grad_(), _unit(4, 2, 3, seed=6).requires_grad_()
    mil_nce_per_sample(zv, zt, torch.ones(4, 2, dtype=torch.bool)).sum().backward()
    assert torch.isfinite(zv.grad).all() and torch.isfinite(zt.grad).all()


# ------------------------------------------------------------------ properties (hypothesis)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 7), d=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_nce_is_symmetric_and_permutation_equivariant(n: int, d: int, seed: int) -> None:
    za, zb = _unit(n, d, seed=seed), _unit(n, d, seed=seed + 1)
    la = nce_per_sample(za, zb, temperature=TAU)
    torch.testing.assert_close(la, nce_per_sample(zb, za, temperature=TAU), rtol=1e-5, atol=1e-5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(nce_per_sample(za[perm], zb[perm], temperature=TAU), la[perm], rtol=1e-5, atol=1e-5)
    # -log softmax is positive; float32 rounds a well-separated sample's loss to exactly 0
    assert (la >= 0).all()
    assert (nce_per_sample(za.double(), zb.double(), temperature=TAU) > 0).all()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 6), p=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_mil_nce_ignores_padded_candidates(n: int, p: int, seed: int) -> None:
    zv, zt = _unit(n, 5, seed=seed), _unit(n, p + 1, 5, seed=seed + 1)
    mask = torch.ones(n, p + 1, dtype=torch.bool)
    mask[:, -1] = False  # an extra, padded candidate with arbitrary content
    torch.testing.assert_close(mil_nce_per_sample(zv, zt, mask, temperature=TAU),
                               mil_nce_per_sample(zv, zt[:, :p], mask[:, :p], temperature=TAU), rtol=1e-5, atol=1e-5)
