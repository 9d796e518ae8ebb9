"""The one seed, input and tolerance helper of the test suite (imported by every test module).

- :func:`fresh_seed`: a fresh seed per case, printed in every failure message; replay one with
  ``GH_TEST_SEED=<seed>`` (``GRADHARMONY_TEST_SEED`` is read too).
- :func:`make_inputs`: per-sample gradients with zero rows and an all-zero sample, random
  visiting orders, GradVac targets and combination weights.
- :func:`assert_within_2x`: flash-attention's rule: the kernel's error against a float64
  oracle is at most twice the reference's own error in the same dtype, plus a small
  scale-aware slack. :func:`check_solve` / :func:`check_fused` apply it to every output.
"""

from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from gradharmony.engine import reference as R


def fresh_seed(*key) -> int:
    """A seed for one case: ``GH_TEST_SEED`` (or ``GRADHARMONY_TEST_SEED``) mixed with ``key``
    when set, else fresh from the OS."""
    env = os.environ.get("GH_TEST_SEED") or os.environ.get("GRADHARMONY_TEST_SEED")
    base = int(env) if env else random.SystemRandom().randrange(2**31)
    return (base + zlib.crc32(repr(key).encode())) % (2**31)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


class Inputs(NamedTuple):
    G: Tensor  # (B, K, D)
    order: Tensor  # (B, K, K) int64, each row a permutation
    target: Tensor  # (K, K) in [-0.5, 0.5)
    w: Tensor  # (B, K) float32


def make_inputs(B: int, K: int, D: int, dtype: torch.dtype, device, scale: float, seed: int,
                zero_rows: bool = True) -> Inputs:
    """Gaussian G times ``scale`` (drawn in float64, then cast), about 15% zero rows and (B > 2)
    an all-zero sample 1; random orders, targets and weights, all from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(B, K, D, generator=gen, dtype=torch.float64) * scale
    if zero_rows and B * K > 2:
        G[torch.rand(B, K, generator=gen) < 0.15] = 0
        if B > 2:
            G[1] = 0
    order = torch.stack(
        [torch.stack([torch.randperm(K, generator=gen) for _ in range(K)]) for _ in range(B)]
    ) if B else torch.zeros(0, K, K, dtype=torch.int64)
    target = torch.rand(K, K, generator=gen) - 0.5
    w = torch.randn(B, K, generator=gen)
    return Inputs(G.to(dtype).to(device), order.to(device), target.to(device), w.to(device))


def assert_within_2x(name: str, got: Tensor, ref: Tensor, oracle: Tensor, atol: float, info: str) -> None:
    """``|got - oracle| <= 2 |ref - oracle|_max + atol`` elementwise; shows the first mismatches."""
    got, ref, oracle = (x.detach().double().cpu() for x in (got, ref, oracle))
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)} ({info})"
    assert torch.isfinite(got).all(), f"{name}: non-finite output ({info})"
    err = (got - oracle).abs()
    err_ref = (ref - oracle).abs().max().item() if ref.numel() else 0.0
    bound = 2 * err_ref + atol
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = [(i, got[tuple(i)].item(), ref[tuple(i)].item(), oracle[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{name}: max err {err.max().item():.3e} > 2 * ref err {err_ref:.3e} + {atol:.1e} "
            f"({info}); first mismatches (index, got, ref, oracle): {rows}"
        )


def _w_tol(method: int, D: int, acc: torch.dtype) -> tuple[bool, float]:
    # D == 1 (all gradients collinear): GradVac sees cosines of exactly +-1 up to rounding and
    # sqrt(1 - phi^2) turns an eps difference into sqrt(eps); the rule itself is that sensitive.
    ill = method == 2 and D == 1
    return ill, (1e2 * eps(acc) ** 0.5 if ill else 1e3 * eps(acc))


def check_solve(M: Tensor, cos: Tensor, w: Tensor, phi: Optional[Tensor], G: Tensor, method: int,
                order: Optional[Tensor], target: Optional[Tensor], info: str) -> None:
    """The solve outputs (M, cos, w, phi) vs ``reference.gram_solve`` in G's dtype and a float64
    oracle; accumulation dtypes and shapes as documented."""
    ref = R.gram_solve(G, method, order, target)
    orc = R.gram_solve(G.double(), method, order, target)
    acc = R.acc_dtype(G.dtype)
    B, K, D = G.shape
    assert M.dtype == acc and cos.dtype == acc and w.dtype == acc, f"dtypes {M.dtype} {cos.dtype} {w.dtype} ({info})"
    if method == 2:
        assert phi is not None and phi.dtype == acc and phi.shape == (B, K, K), info
    else:
        assert phi is None, info
    eps_a = eps(acc)
    norms = orc.gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # (B, K)
    nmax = norms.max().item() if norms.numel() else 0.0
    assert_within_2x("M", M, ref.gram, orc.gram, 8 * eps_a * max(D, 1) ** 0.5 * nmax**2, info)
    assert_within_2x("cos", cos, ref.cos, orc.cos, 64 * eps_a, info)
    # w acts through w_k g_k: compare it weighted by the row norms (scale- and rank-robust)
    sc = (norms / norms.amax(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)).cpu()
    _, tol_w = _w_tol(method, D, acc)
    assert_within_2x("w*|g|", w.double().cpu() * sc, ref.weights.double().cpu() * sc,
                     orc.weights.double().cpu() * sc, tol_w, info)
    if method == 2 and not (D == 1 and K >= 3):  # D == 1: phi after a full projection is ~0/0
        assert_within_2x("phi", phi, ref.phi, orc.phi, 1e3 * eps_a, info)


def check_combine(out: Tensor, G: Tensor, w: Tensor, reduction: str, info: str, extra_rel: float = 0.0) -> None:
    """``out`` vs ``reference.combine`` in G's dtype and a float64 oracle."""
    assert out.dtype == G.dtype, f"out dtype {out.dtype} != {G.dtype} ({info})"
    oracle = R.combine(G.double(), w.double(), reduction)
    scale = torch.einsum("bk,bkd->bd", w.double().abs(), G.double().abs())
    if reduction == "sum":
        scale = scale.sum(0)
    smax = scale.max().item() if scale.numel() else 0.0
    atol = (4 * eps(G.dtype) + extra_rel) * smax + 1e-300
    assert_within_2x(f"out[{reduction}]", out, R.combine(G, w, reduction), oracle, atol, info)


def check_fused(res, G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor],
                reduction: str, info: str) -> None:
    """The fused outputs (out, M, cos, w, phi): the solve part as :func:`check_solve`, the output
    against the reference's output (reference weights) and a float64 oracle."""
    out, M, cos, w, phi = res
    check_solve(M, cos, w, phi, G, method, order, target, info)
    acc = R.acc_dtype(G.dtype)
    ref = R.fused(G, method, order, target, reduction)
    orc = R.fused(G.double(), method, order, target, reduction)
    ill, tol_w = _w_tol(method, G.shape[2], acc)
    scale = torch.einsum("bk,bkd->bd", orc.weights.abs(), G.double().abs())
    if reduction == "sum":
        scale = scale.sum(0)
    smax = scale.max().item() if scale.numel() else 0.0
    atol = (4 * eps(G.dtype) + (G.shape[1] * tol_w if ill else 64 * eps(acc))) * smax
    assert out.dtype == G.dtype, info
    assert_within_2x("out", out, ref.out, orc.out, atol + 1e-300, info)


#: dtype -> three scales of the op tables (float16 keeps its squares finite)
SCALES = {
    torch.float32: (1e-20, 1.0, 1e17),
    torch.float64: (1e-20, 1.0, 1e20),
    torch.bfloat16: (1e-20, 1.0, 1e17),
    torch.float16: (1e-2, 1.0, 1e2),
}
#: (B, K, D) of the op tables: B = 1, odd sizes, every padded K (1, 2, 3, 5, 8); the last two
#: run only compiled (the Triton interpreter takes ~seconds per call there)
OP_SHAPES = ((1, 1, 5), (3, 2, 7), (5, 3, 100), (2, 8, 33), (4, 5, 1000), (37, 4, 4099))
INTERPRETER_MAX_ELEMS = 4000


#: extra shapes of gram / combine: K beyond the fused kernels' limit (8), D split over tasks
BIG_K_SHAPES = ((2, 9, 4099), (4, 12, 70001))


def op_table(big_k: bool = False):
    """(dtype, B, K, D, scale) cases of the per-op suites, ids included; ``big_k`` adds
    :data:`BIG_K_SHAPES` (gram and combine take any K)."""
    import pytest

    cases = []
    for di, dtype in enumerate(SCALES):
        for si, (B, K, D) in enumerate(OP_SHAPES + (BIG_K_SHAPES if big_k else ())):
            scale = SCALES[dtype][(di + si) % 3]
            cases.append(pytest.param(dtype, B, K, D, scale, id=f"{str(dtype)[6:]}-B{B}-K{K}-D{D}-s{scale:g}"))
    return cases


def skip_if_too_big_for(backend, B: int, K: int, D: int) -> None:
    import pytest

    if backend.interpreted and B * K * D > INTERPRETER_MAX_ELEMS:
        pytest.skip("Triton interpreter: small shapes only")


#: every engine backend; the ``backend`` fixture (tests/conftest.py) runs a test on each
BACKENDS = ("torch", "cpp", "cuda", "triton")


@dataclass
class BackendCase:
    name: str
    impl: object  # the engine backend (gram / combine / solve / fused)
    device: torch.device
    interpreted: bool  # Triton under the interpreter: keep shapes small

    def skip_unless(self, G: Tensor) -> None:
        """Skip the case when the backend does not take G (dtype, K)."""
        import pytest

        if not self.impl.supports(G.to(self.device)):
            pytest.skip(f"backend {self.name!r} does not take {G.dtype} with K = {G.shape[1]}")


def backend_case(name: str) -> BackendCase:
    """The backend ``name`` on the device it runs on here, or ``pytest.skip`` saying why not
    (cuda without a GPU, triton without a GPU or the interpreter, cpp without a compiler)."""
    import pytest

    from gradharmony.engine.backends import get_backend

    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("backend 'cuda' needs a CUDA GPU")
    if name == "cpp" and os.environ.get("GRADHARMONY_SKIP_EXT"):
        pytest.skip("GRADHARMONY_SKIP_EXT is set")
    try:
        be = get_backend(name)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    on_gpu = name == "cuda" or (name == "triton" and torch.cuda.is_available())
    device = torch.device("cuda" if on_gpu else "cpu")
    return BackendCase(name, be, device, name == "triton" and not on_gpu)
