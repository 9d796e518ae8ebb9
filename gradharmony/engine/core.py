"""The engine: one op ``G (B, K, D) -> (out, M, cos, w, phi)`` on a chosen backend.

It runs the fused kernel when it can (sum / pcgrad / gradvac, K <= 8, no batch-level
sample weighting), otherwise gram -> solve -> sample weights -> combine. After the
Gram pass it makes one health check of the B*K Gram diagonals (one host sync) and
repairs the rare samples whose squared norms over- or underflow the accumulation
dtype (|g| beyond ~1e19 or below ~1e-15 in float32): their coefficients are solved on
the Gram of the sample rescaled by its largest entry (every rule here is invariant to
that scale), so no NaN comes out of finite input at any scale. The same check finds
non-finite gradients and applies the caller's ``nonfinite`` policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference
from .backends import FUSED_MAX_K, select_backend

__all__ = ["EngineOutput", "NONFINITE_POLICIES", "NonFiniteGradientError", "run"]

NONFINITE_POLICIES = ("raise", "skip", "zero", "propagate")

SolveFn = Callable[[Tensor], tuple[Tensor, Optional[Tensor]]]
WeightFn = Callable[[Tensor], Tensor]


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or inf (see the ``nonfinite`` option)."""


@dataclass
class EngineOutput:
    out: Tensor  # (B, D) or (D,)
    gram: Tensor  # (B, K, K)
    cos: Tensor  # (B, K, K)
    weights: Tensor  # (B, K), sample weights folded in
    phi: Optional[Tensor]  # (B, K, K) gradvac visit cosines
    sample_weights: Optional[Tensor]  # (B,) applied per-sample factor, or None
    backend: str
    nonfinite_samples: Optional[Tensor] = None  # (n,) indices of samples that held NaN/inf


def _tiny(dtype: torch.dtype) -> float:
    # Below this squared norm float accumulation has lost too many bits; rescale.
    return 1e-280 if dtype == torch.float64 else 1e-30


def _huge(dtype: torch.dtype) -> float:
    # Above this squared norm products of two norms may overflow; rescale.
    return 1e280 if dtype == torch.float64 else 1e36


def _needs_repair(M: Tensor) -> bool:
    """True when some squared norm is NaN/inf, zero or outside the safe range.

    One small reduction and one host sync: ``aminmax`` propagates NaN, and every
    comparison with NaN is False.
    """
    if M.shape[0] == 0:
        return False
    lo, hi = torch.aminmax(M.diagonal(dim1=1, dim2=2))
    lo_, hi_ = torch.stack([lo, hi]).tolist()
    return not (lo_ >= _tiny(M.dtype) and hi_ <= _huge(M.dtype))


def _bad_samples(M: Tensor) -> Tensor:
    """Indices (n,) of the samples that need the rescaled solve or hold NaN/inf."""
    diag = M.diagonal(dim1=1, dim2=2)
    ok = (diag >= _tiny(M.dtype)) & (diag <= _huge(M.dtype))  # False for NaN
    return (~ok).any(-1).nonzero().squeeze(-1)


def _solve(M: Tensor, method: Optional[int], order, target, solve_fn: Optional[SolveFn]):
    if method is not None:
        return reference.solve(M, method, order, target)
    assert solve_fn is not None
    w, phi = solve_fn(M)
    return reference.cosine(M), w, phi


def _scaled_gram(G: Tensor) -> Tensor:
    """Gram of each sample divided by its largest |entry|^2 (no over/underflow)."""
    if G.shape[2] == 0:  # zero-width gradients: amax has nothing to reduce; the Gram is 0
        return reference.gram(G)
    amax = G.abs().amax(dim=(1, 2), keepdim=True).to(reference.acc_dtype(G.dtype))
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return reference.gram(G.to(amax.dtype) / amax)


def _first_nonfinite(G: Tensor, idx: Tensor, finite_rows: Tensor) -> str:
    s, k = (~finite_rows).nonzero()[0].tolist()
    return (
        f"gradient of loss {k} for sample {int(idx[s])} is not finite "
        f"(per-sample gradients of shape {tuple(G.shape)}); pass nonfinite='skip' to drop "
        "such samples, 'zero' to zero the non-finite entries, or 'propagate' to pass them "
        "through (e.g. for torch.amp.GradScaler)"
    )


def run(
    G: Tensor,
    *,
    backend: str = "auto",
    method: Optional[int] = None,
    order: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    solve_fn: Optional[SolveFn] = None,
    weight_fn: Optional[WeightFn] = None,
    reduction: str = "none",
    nonfinite: str = "raise",
) -> EngineOutput:
    """Harmonize validated, contiguous per-sample gradients.

    Args:
        G: (B, K, D) contiguous floating tensor.
        backend: "auto" or a backend name (see :mod:`gradharmony.engine.backends`).
        method: kernel method id (0 sum, 1 pcgrad, 2 gradvac) or ``None`` to use ``solve_fn``.
        order, target: rule parameters for the kernel methods.
        solve_fn: ``M -> (w, phi)`` for rules without a kernel.
        weight_fn: ``cos (B, K, K) -> s (B,)`` per-sample factor (the curriculum).
        reduction: "none" or "sum".
        nonfinite: one of :data:`NONFINITE_POLICIES`.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    be = select_backend(backend, G)
    B, K, D = G.shape
    fusable = method is not None and K <= FUSED_MAX_K and weight_fn is None
    if fusable:
        out, M, cos, w, phi = be.fused(G, method, order, target, reduction)
        s = None
    elif method is not None and K <= FUSED_MAX_K:
        # a kernel rule under a curriculum: the backend's solve op (gram + in-kernel solve, no
        # combine) gives M, cos, w, phi; the weighted combine follows below
        M, cos, w, phi = be.solve(G, method, order, target)
        out = s = None
    else:
        M = be.gram(G)
        cos, w, phi = _solve(M, method, order, target, solve_fn)
        out = s = None

    nonfinite_idx = None
    if _needs_repair(M):  # the one host sync of a call
        idx = _bad_samples(M)
        Gi = G.index_select(0, idx)
        finite_rows = torch.isfinite(Gi).all(-1)  # (n, K)
        if not bool(finite_rows.all()):
            if nonfinite == "raise":
                raise NonFiniteGradientError(_first_nonfinite(G, idx, finite_rows))
            if nonfinite in ("skip", "zero"):
                bad_samples = idx[~finite_rows.all(-1)]
                Gs = G.clone()
                wf = weight_fn
                if nonfinite == "zero":
                    Gs = torch.nan_to_num_(Gs, nan=0.0, posinf=0.0, neginf=0.0)
                else:
                    Gs[bad_samples] = 0
                    if weight_fn is not None:
                        # a skipped sample is out of the batch for the curriculum too: its
                        # score must not enter the quantile or the normalization
                        keep = torch.ones(B, dtype=torch.bool, device=G.device)
                        keep[bad_samples] = False

                        def _skip_wf(cos: Tensor, keep: Tensor = keep, inner: WeightFn = weight_fn) -> Tensor:
                            s_keep = inner(cos[keep])
                            s_all = s_keep.new_zeros(cos.shape[0])
                            s_all[keep] = s_keep
                            return s_all

                        wf = _skip_wf
                res = run(Gs, backend=backend, method=method, order=order, target=target,
                          solve_fn=solve_fn, weight_fn=wf, reduction=reduction,
                          nonfinite="raise")
                res.nonfinite_samples = bad_samples
                if nonfinite == "skip":
                    # a skipped sample is out of the batch: weight 0, output row 0
                    res.weights[bad_samples] = 0
                return res
            # propagate: leave non-finite samples as computed, repair the others
            nonfinite_idx = idx[~finite_rows.all(-1)]
            keep = finite_rows.all(-1)
            idx, Gi = idx[keep], Gi[keep]
        if idx.numel() > 0:
            Mi = _scaled_gram(Gi).to(M.dtype)
            order_i = order.index_select(0, idx) if order is not None else None
            cos_i, w_i, phi_i = _solve(Mi, method, order_i, target, solve_fn)
            cos = cos.clone()
            w = w.clone()
            cos[idx] = cos_i
            w[idx] = w_i.to(w.dtype)
            if phi is not None and phi_i is not None:
                phi = phi.clone()
                phi[idx] = phi_i
            M = M.clone()
            true_gram = reference.gram(Gi.to(torch.float64)).to(M.dtype)  # may be 0/inf: it is the truth
            M[idx] = true_gram
            if fusable:
                out = be.combine(G, w, reduction)
    if not fusable:
        if weight_fn is not None:
            s = weight_fn(cos)
            w = w * s.to(w.dtype).unsqueeze(-1)
        out = be.combine(G, w, reduction)
    return EngineOutput(out=out, gram=M, cos=cos, weights=w, phi=phi, sample_weights=s,
                        backend=be.name, nonfinite_samples=nonfinite_idx)


def gram_pass(G: Tensor, *, backend: str = "auto", nonfinite: str = "raise") -> tuple[Tensor, Tensor, Tensor]:
    """Gram matrices with the same health check as :func:`run`, for two-phase callers.

    Args:
        G: (B, K, D) contiguous gradients (e.g. one chunk of samples).
    Returns:
        ``(M, M_solve, finite)``: the true Gram (B, K, K) (may hold inf/0 where it does not
        fit the dtype), the Gram to solve on (rescaled per sample where needed; rules are
        invariant to that scale; with ``nonfinite="zero"`` computed with the non-finite entries
        zeroed), and a (B,) bool mask of samples whose gradients are finite.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    be = select_backend(backend, G)
    M = be.gram(G)
    M_solve = M
    finite = torch.ones(G.shape[0], dtype=torch.bool, device=G.device)
    if _needs_repair(M):
        idx = _bad_samples(M)
        Gi = G.index_select(0, idx)
        finite_rows = torch.isfinite(Gi).all(-1)
        if not bool(finite_rows.all()):
            if nonfinite == "raise":
                raise NonFiniteGradientError(_first_nonfinite(G, idx, finite_rows))
            finite[idx[~finite_rows.all(-1)]] = False
            if nonfinite == "zero":
                Gi = torch.nan_to_num(Gi, nan=0.0, posinf=0.0, neginf=0.0)
        M, M_solve = M.clone(), M.clone()
        M[idx] = reference.gram(Gi.to(torch.float64)).to(M.dtype)
        M_solve[idx] = _scaled_gram(Gi).to(M.dtype)
    return M, M_solve, finite
