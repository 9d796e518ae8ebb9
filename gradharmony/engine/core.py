"""The engine: one op ``G (B, K, D) -> (out, M, cos, w, phi)`` on a chosen backend.

It runs the fused kernel when it can (sum / pcgrad / gradvac, K <= 8, no batch-level
sample weighting), otherwise gram -> solve -> combine; the API layer
(``gradharmony.api.pipeline``) adds the curriculum and the rule state update between
the solve and the combine, from the same phases. After the
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

__all__ = [
    "EngineOutput", "Health", "NONFINITE_POLICIES", "NonFiniteGradientError", "gram_pass", "health_check",
    "kernel_solve", "repaired_input", "run", "solve_rows",
]

NONFINITE_POLICIES = ("raise", "skip", "zero", "propagate")

SolveFn = Callable[[Tensor], tuple[Tensor, Optional[Tensor]]]


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


@dataclass
class Health:
    """Result of the one health check of a call (see :func:`health_check`).

    Attributes:
        gram: (B, K, K) Gram matrices to report: the true ``G_b G_b^T`` (may hold inf or 0
            where it does not fit the dtype); for non-finite samples under ``"skip"`` /
            ``"zero"`` the Gram of the repaired gradients (rows zeroed / entries zeroed).
        gram_solve: (B, K, K) Gram matrices to solve on: ``gram``, with the rows that over-
            or underflow replaced by the Gram of the sample divided by its largest entry.
        finite: (B,) bool, False for samples whose gradients hold NaN/inf.
        repaired: (n,) indices of samples whose ``gram_solve`` row differs from the Gram
            the backend returned (their coefficients must be solved again), or None.
        nonfinite_samples: (m,) indices of the samples with NaN/inf, or None.
    """

    gram: Tensor
    gram_solve: Tensor
    finite: Tensor
    repaired: Optional[Tensor] = None
    nonfinite_samples: Optional[Tensor] = None

    @property
    def clean(self) -> bool:
        return self.repaired is None and self.nonfinite_samples is None


def check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")


def health_check(G: Tensor, M: Tensor, nonfinite: str = "raise") -> Health:
    """The health check of the Gram diagonals of ``G`` (B, K, D); one host sync.

    Samples whose squared norms are NaN/inf, zero or out of the safe range of the
    accumulation dtype are looked at again (a rare path): non-finite ones follow the
    ``nonfinite`` policy ("raise": :class:`NonFiniteGradientError`; "skip": treated as
    zero gradients, to be given weight 0 by the caller; "zero": the non-finite entries
    zeroed; "propagate": left as they are), finite ones get a rescaled Gram to solve on.

    Args:
        G: (B, K, D) gradients; M: their Gram matrices (B, K, K) from a backend.
    """
    check_policy(nonfinite)
    B = G.shape[0]
    finite = torch.ones(B, dtype=torch.bool, device=G.device)
    if not _needs_repair(M):  # the one host sync of a call
        return Health(gram=M, gram_solve=M, finite=finite)
    idx = _bad_samples(M)
    Gi = G.index_select(0, idx)
    finite_rows = torch.isfinite(Gi).all(-1).all(-1)  # (n,)
    nonfinite_idx = None
    if not bool(finite_rows.all()):
        if nonfinite == "raise":
            raise NonFiniteGradientError(_first_nonfinite(G, idx, torch.isfinite(Gi).all(-1)))
        nonfinite_idx = idx[~finite_rows]
        finite[nonfinite_idx] = False
        if nonfinite == "propagate":  # leave them as computed, repair the others
            idx, Gi = idx[finite_rows], Gi[finite_rows]
        elif nonfinite == "zero":
            Gi = torch.nan_to_num(Gi, nan=0.0, posinf=0.0, neginf=0.0)
        else:  # skip: out of the batch; a zero gradient keeps every later step finite
            Gi = torch.where(finite_rows.view(-1, 1, 1), Gi, torch.zeros_like(Gi))
    M, M_solve = M.clone(), M.clone()
    if idx.numel() > 0:
        true_i = reference.gram(Gi.to(torch.float64)).to(M.dtype)  # may be 0/inf: it is the truth
        M[idx] = true_i
        # rescale only where needed (a row zeroed under "zero" may be in range again)
        d = true_i.diagonal(dim1=1, dim2=2)
        safe = ((d >= _tiny(M.dtype)) & (d <= _huge(M.dtype))).all(-1)
        M_solve[idx] = torch.where(safe.view(-1, 1, 1), true_i, _scaled_gram(Gi).to(M.dtype))
    return Health(gram=M, gram_solve=M_solve, finite=finite,
                  repaired=idx if idx.numel() > 0 else None, nonfinite_samples=nonfinite_idx)


def kernel_solve(be, G: Tensor, method: int, order: Optional[Tensor], target: Optional[Tensor],
                 reduction: Optional[str]) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(out, M, cos, w, phi)`` of a kernel rule from the backend, in one place.

    With ``reduction`` ("none"/"sum") the backend's fused op also combines (``out``);
    with ``None`` the backend's solve op gives only M, cos, w, phi (the caller combines with
    other weights) and ``out`` is None.
    """
    if reduction is not None:
        return tuple(be.fused(G, method, order, target, reduction))
    # a kernel rule under a curriculum: the backend's solve op (Gram + in-kernel solve, no
    # combine) gives M, cos, w, phi; the caller combines with the curriculum's weights
    M, cos, w, phi = be.solve(G, method, order, target)
    return None, M, cos, w, phi


def solve_rows(M_solve: Tensor, method: Optional[int], order, target, solve_fn: Optional[SolveFn],
               solved: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None,
               rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(cos, w, phi)`` solved on ``M_solve`` (B, K, K).

    With ``solved`` (from a kernel on the unrepaired Gram) only ``rows`` are solved again.
    """
    if solved is None:
        return _solve(M_solve, method, order, target, solve_fn)
    cos, w, phi = solved
    if rows is None or rows.numel() == 0:
        return cos, w, phi
    order_i = order.index_select(0, rows) if order is not None else None
    cos_i, w_i, phi_i = _solve(M_solve.index_select(0, rows), method, order_i, target, solve_fn)
    cos, w = cos.clone(), w.clone()
    cos[rows] = cos_i.to(cos.dtype)
    w[rows] = w_i.to(w.dtype)
    if phi is not None and phi_i is not None:
        phi = phi.clone()
        phi[rows] = phi_i.to(phi.dtype)
    return cos, w, phi


def repaired_input(G: Tensor, health: Health, nonfinite: str) -> Tensor:
    """G with the ``nonfinite`` policy applied ("skip": rows zeroed; "zero": entries zeroed)."""
    if health.nonfinite_samples is None or nonfinite not in ("skip", "zero"):
        return G
    if nonfinite == "zero":
        return torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)
    Gs = G.clone()
    Gs[health.nonfinite_samples] = 0
    return Gs


def run(
    G: Tensor,
    *,
    backend: str = "auto",
    method: Optional[int] = None,
    order: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    solve_fn: Optional[SolveFn] = None,
    reduction: str = "none",
    nonfinite: str = "raise",
) -> EngineOutput:
    """Harmonize validated, contiguous per-sample gradients without sample weighting.

    Gram -> one health check -> solve -> combine (fused into one kernel where possible).
    Callers that weight samples (a curriculum) use the phases :func:`health_check`,
    :func:`solve_rows` and the backend's ``combine`` (see ``gradharmony.api.pipeline``).
    Samples skipped under ``nonfinite="skip"`` get weight 0 and a zero output row.

    Args:
        G: (B, K, D) contiguous floating tensor.
        backend: "auto" or a backend name (see :mod:`gradharmony.engine.backends`).
        method: kernel method id (0 sum, 1 pcgrad, 2 gradvac) or ``None`` to use ``solve_fn``.
        order, target: rule parameters for the kernel methods.
        solve_fn: ``M -> (w, phi)`` for rules without a kernel.
        reduction: "none" or "sum".
        nonfinite: one of :data:`NONFINITE_POLICIES`.
    """
    check_policy(nonfinite)
    be = select_backend(backend, G)
    K = G.shape[1]
    solved = None
    out = None
    if method is not None and K <= FUSED_MAX_K:
        out, M, cos, w, phi = kernel_solve(be, G, method, order, target, reduction)
        solved = (cos, w, phi)
    else:
        M = be.gram(G)
    h = health_check(G, M, nonfinite)
    cos, w, phi = solve_rows(h.gram_solve, method, order, target, solve_fn, solved, h.repaired)
    if nonfinite == "skip" and h.nonfinite_samples is not None:
        w = w.clone()
        w[h.nonfinite_samples] = 0
    stale = h.repaired is not None or (h.nonfinite_samples is not None and nonfinite in ("skip", "zero"))
    if out is None or stale:
        out = be.combine(repaired_input(G, h, nonfinite), w, reduction)
    return EngineOutput(out=out, gram=h.gram, cos=cos, weights=w, phi=phi, sample_weights=None,
                        backend=be.name, nonfinite_samples=h.nonfinite_samples)


def gram_pass(G: Tensor, *, backend: str = "auto", nonfinite: str = "raise") -> tuple[Tensor, Tensor, Tensor]:
    """Gram matrices with the health check of :func:`run`, for two-phase callers.

    Args:
        G: (B, K, D) contiguous gradients (e.g. one chunk of samples).
    Returns:
        ``(M, M_solve, finite)`` (see :class:`Health`).
    """
    check_policy(nonfinite)
    h = health_check(G, select_backend(backend, G).gram(G), nonfinite)
    return h.gram, h.gram_solve, h.finite
