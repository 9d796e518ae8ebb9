"""Shared property assertions, reused for every method (TorchJD ``_asserts.py`` style).

Each takes a ``run(G) -> HarmonizeResult`` callable (so that stateful rules can be made
fresh for each call) and per-sample gradients ``G: (B, K, D)``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

import gradharmony as gh
from gradharmony.api.functional import HarmonizeResult

Run = Callable[[Tensor], HarmonizeResult]

METHODS = ("sum", "pcgrad", "gradvac", "cagrad", "mgda")
#: scales of the scaling properties (0 = an all-zero sample)
SCALES = (0.0, 1e-20, 1e-10, 1.0, 1e10, 1e20)
#: relative tolerances of weights/cosines per dtype and method family
RTOL = {torch.float64: 1e-8, torch.float32: 2e-4}
RTOL_ITER = {torch.float64: 1e-6, torch.float32: 2e-3}  # iterative solvers (cagrad, mgda)


def make_rule(method: str, K: int) -> gh.Rule:
    """A fresh rule; sequential rules in fixed order; GradVac with a non-trivial target."""
    if method in ("pcgrad", "gradvac"):
        rule = gh.get_rule(method, order="fixed")
        if method == "gradvac":
            t = torch.full((K, K), 0.3, dtype=torch.float64)
            t.fill_diagonal_(0)
            rule.phi_hat = t  # type: ignore[attr-defined]
        return rule
    return gh.get_rule(method)


def runner(method: str, reduction: str = "none", backend: str = "torch", **kw) -> Run:
    def run(G: Tensor) -> HarmonizeResult:
        return gh.harmonize(G, make_rule(method, G.shape[1]), reduction=reduction, backend=backend, **kw)

    return run


def rtol_for(method: str, dtype: torch.dtype) -> float:
    return (RTOL_ITER if method in ("cagrad", "mgda") else RTOL)[dtype]


def close(a: Tensor, b: Tensor, rtol: float, scale: Optional[float] = None, msg: str = "") -> None:
    """|a - b| <= rtol * scale elementwise (scale defaults to max |b|, floored at tiny)."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    assert a64.shape == b64.shape, f"{msg}: shape {tuple(a64.shape)} != {tuple(b64.shape)}"
    if scale is None:
        scale = float(b64.abs().max()) if b64.numel() else 0.0
    tol = rtol * max(scale, 1e-300)
    err = (a64 - b64).abs()
    if err.numel() and not bool((err <= tol).all()):
        idx = int(err.flatten().argmax())
        raise AssertionError(
            f"{msg}: max |diff| {float(err.max()):.3e} > {tol:.3e} at flat index {idx}: "
            f"got {float(a64.flatten()[idx]):.9e}, expected {float(b64.flatten()[idx]):.9e}"
        )


def assert_finite(res: HarmonizeResult, msg: str = "") -> None:
    for name in ("grad", "cos", "weights"):
        t = getattr(res, name)
        assert torch.isfinite(t).all(), f"{msg}: non-finite {name}: {t}"


def assert_gram_psd(res: HarmonizeResult, G: Tensor) -> None:
    """Gram = G G^T (float64 check), symmetric, PSD."""
    M = res.gram.to(torch.float64)
    B, K, _ = G.shape
    assert M.shape == (B, K, K)
    ref = torch.einsum("bkd,bjd->bkj", G.to(torch.float64), G.to(torch.float64))
    scale = ref.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(1e-300)[:, None, None] if B else 1.0
    tol = 1e-12 if G.dtype == torch.float64 else 1e-5
    assert ((M - ref).abs() <= tol * scale).all(), "gram != G G^T"
    assert torch.equal(M, M.transpose(1, 2)) or ((M - M.transpose(1, 2)).abs() <= tol * scale).all(), "gram not symmetric"
    if B:
        ev = torch.linalg.eigvalsh(M / scale)
        assert (ev >= -10 * tol).all(), f"gram not PSD: min eigenvalue {float(ev.min())}"


def assert_cos_valid(res: HarmonizeResult, G: Tensor) -> None:
    """Cosines in [-1, 1], symmetric, equal to the float64 cosines; zero rows -> cosine 0."""
    cos = res.cos.to(torch.float64)
    assert ((cos >= -1) & (cos <= 1)).all(), "cosine outside [-1, 1]"
    G64 = G.to(torch.float64)
    n = G64.norm(dim=-1)
    ref = torch.einsum("bkd,bjd->bkj", G64, G64) / (n.unsqueeze(2) * n.unsqueeze(1))
    ref = torch.nan_to_num(ref, nan=0.0).clamp(-1, 1)
    tol = 1e-10 if G.dtype == torch.float64 else 1e-4
    close(cos, ref, tol, scale=1.0, msg="cos vs float64 cosines")
    close(cos, cos.transpose(1, 2), tol, scale=1.0, msg="cos symmetric")


def assert_grad_matches_weights(res: HarmonizeResult, G: Tensor, reduction: str = "none") -> None:
    """``.grad`` is exactly the weights applied to G (einsum in float64)."""
    out = torch.einsum("bk,bkd->bd", res.weights.to(torch.float64), G.to(torch.float64))
    if reduction == "sum":
        out = out.sum(0)
    elif reduction == "mean":
        out = out.sum(0) / max(1, G.shape[0])
    rtol = 1e-12 if G.dtype == torch.float64 else 1e-5
    scale = float(torch.einsum("bk,bkd->bd", res.weights.to(torch.float64).abs(), G.to(torch.float64).abs()).max()) if G.numel() else 1.0
    close(res.grad, out, rtol, scale=scale, msg=f"grad vs weights (reduction={reduction})")


def assert_reductions_consistent(method: str, G: Tensor, backend: str = "torch") -> None:
    r_none = runner(method, "none", backend)(G)
    r_sum = runner(method, "sum", backend)(G)
    r_mean = runner(method, "mean", backend)(G)
    B = G.shape[0]
    rtol = 1e-12 if G.dtype == torch.float64 else 1e-5
    scale = float(r_none.grad.abs().sum(0).max()) if r_none.grad.numel() else 1.0
    close(r_sum.grad, r_none.grad.sum(0), rtol, scale=scale, msg="sum vs none.sum(0)")
    close(r_mean.grad, r_none.grad.sum(0) / max(B, 1), rtol, scale=scale / max(B, 1), msg="mean vs none.sum(0)/B")
    for r in (r_sum, r_mean):
        close(r.weights, r_none.weights, rtol, scale=1.0, msg="weights independent of the reduction")


def assert_non_conflicting(method: str, res: HarmonizeResult, G: Tensor) -> None:
    """PCGrad K = 2: g'_1 . g_2 >= 0 and g'_2 . g_1 >= 0; the combination conflicts with no g_k.

    For K = 2 the coefficient of g_2 in the output comes only from g'_1, so
    ``g'_1 = g_1 + (w_2 - 1) g_2`` and ``g'_2 = g_2 + (w_1 - 1) g_1``. MGDA: the min-norm
    point d has d . g_k >= |d|^2 >= 0 for every k.
    """
    G64 = G.to(torch.float64)
    w = res.weights.to(torch.float64)
    norms = G64.norm(dim=-1)  # (B, K)
    rel = 1e-10 if G.dtype == torch.float64 else 1e-4
    # rounding of the weights themselves: |w_k| |g_k| is the size of each term of the output
    wn = (w.abs() * norms).sum(-1)  # (B,)
    if method == "pcgrad" and G.shape[1] == 2:
        g1p = G64[:, 0] + (w[:, 1] - 1).unsqueeze(-1) * G64[:, 1]
        g2p = G64[:, 1] + (w[:, 0] - 1).unsqueeze(-1) * G64[:, 0]
        d12 = (g1p * G64[:, 1]).sum(-1)
        d21 = (g2p * G64[:, 0]).sum(-1)
        t12 = rel * (norms[:, 0] + (w[:, 1].abs() + 1) * norms[:, 1]) * norms[:, 1]
        t21 = rel * (norms[:, 1] + (w[:, 0].abs() + 1) * norms[:, 0]) * norms[:, 0]
        assert (d12 >= -t12).all(), f"g'_1 . g_2 < 0 after PCGrad: {d12} (tol {t12})"
        assert (d21 >= -t21).all(), f"g'_2 . g_1 < 0 after PCGrad: {d21} (tol {t21})"
    if method in ("pcgrad", "mgda") and G.shape[1] == 2 or method == "mgda":
        out = torch.einsum("bk,bkd->bd", w, G64)
        dots = torch.einsum("bd,bkd->bk", out, G64)
        rel2 = 1e-8 if G.dtype == torch.float64 else 2e-3
        t = rel2 * (wn + norms.amax(-1)).unsqueeze(-1) * norms
        assert (dots >= -t).all(), f"{method}: output conflicts with a loss gradient: {dots}"


def assert_permutation_equivariant(run: Run, G: Tensor, perm: Tensor) -> None:
    r = run(G)
    rp = run(G[perm])
    rtol = 1e-12 if G.dtype == torch.float64 else 1e-5
    close(rp.weights, r.weights[perm], rtol, scale=1.0, msg="weights under a permutation of samples")
    close(rp.cos, r.cos[perm], rtol, scale=1.0, msg="cos under a permutation of samples")
    close(rp.grad, r.grad[perm], rtol, msg="grad under a permutation of samples")


def assert_scaling(method: str, run: Run, G: Tensor, b: int, scales=SCALES) -> None:
    """Scale sample b by s: its weights/cos stay (s > 0), its grad row scales by s, other rows stay."""
    base = run(G)
    rtol = rtol_for(method, G.dtype)
    for s in scales:
        Gs = G.clone()
        Gs[b] = Gs[b] * s
        r = run(Gs)
        assert_finite(r, f"{method} scale {s:g} ({G.dtype})")
        others = [i for i in range(G.shape[0]) if i != b]
        if others:
            o = torch.tensor(others)
            close(r.weights[o], base.weights[o], rtol, scale=1.0, msg=f"other samples' weights, scale {s:g}")
            close(r.grad[o], base.grad[o], rtol, msg=f"other samples' grad, scale {s:g}")
        if s == 0:
            assert (r.grad[b] == 0).all(), f"an all-zero sample must give a zero row, got {r.grad[b]}"
            assert (r.cos[b] == 0).all(), "an all-zero sample has cosine 0 with everything"
            continue
        close(r.cos[b], base.cos[b], rtol, scale=1.0, msg=f"{method}: cos of a sample scaled by {s:g} ({G.dtype})")
        close(r.weights[b], base.weights[b], rtol, scale=float(base.weights[b].abs().max()) + 1.0,
              msg=f"{method}: weights of a sample scaled by {s:g} ({G.dtype})")
        expect = base.grad[b].to(torch.float64) * s
        close(r.grad[b], expect, rtol, msg=f"{method}: grad of a sample scaled by {s:g} ({G.dtype})")
