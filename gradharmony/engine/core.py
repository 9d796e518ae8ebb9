"""The engine: one op ``G (B, K, D) -> (out, M, cos, w, phi)`` on a chosen backend.

It runs the fused kernel when it can (sum / pcgrad / gradvac, K <= 8, no batch-level
sample weighting), otherwise gram -> solve -> combine; the API layer
(``gradharmony.api.pipeline``) adds the curriculum and the rule state update between
the solve and the combine, from the same phases.

The health check (:func:`health_check`) keeps finite input NaN-free at any scale and
applies the caller's ``nonfinite`` policy. Samples whose squared norms over- or underflow
the accumulation dtype (|g| beyond ~1e18 or below ~1e-15 in float32), or hold NaN/inf, are
solved on their Gram rebuilt in float64 from per-row rescaled gradients (:func:`_rebuild`):
cosines and every rule are invariant to a sample's scale, and the row scales are put back in
float64, so a row 1e-30 of another keeps its true direction and relative size. The check
runs on the host (one read of the diagonals; the rare samples repaired by index) or, where a
host read costs a device sync or a graph break and the policy is not "raise", on the device
by masks (:func:`use_device_check`, :func:`_health_device`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference
from .backends import FUSED_MAX_K, select_backend

__all__ = [
    "DEVICE_CHECK", "EngineOutput", "Health", "NONFINITE_POLICIES", "NonFiniteGradientError", "combine",
    "gram_pass", "health_check", "kernel_solve", "repaired_input", "run", "solve_rows", "use_device_check",
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
    finite: Optional[Tensor] = None  # (B,) bool, False for samples that held NaN/inf


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


def _row_scales(G: Tensor) -> Tensor:
    """Largest |entry| of each gradient row, (B, K) in G's dtype (NaN/inf where the row holds one)."""
    if G.shape[2] == 0:  # zero-width gradients: nothing to reduce
        return G.new_zeros(G.shape[:2])
    # max |entry| without a copy of |G|; NaN propagates through both reductions
    return torch.maximum(G.amax(-1), -G.amin(-1))


_CHUNK_ENTRIES = 1 << 22  # entries of G scaled at once by the device check


def _row_scaled_gram(G: Tensor, s: Tensor) -> Tensor:
    """Gram of G with row k of each sample divided by ``s[b, k]`` (0, NaN, inf: by 1).

    Entries are at most D in magnitude: no over- or underflow of a squared norm. In the
    accumulation dtype; chunked over D (4M entries per chunk) so that no copy of G is made at
    once.
    """
    s_safe = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s)).unsqueeze(-1)
    B, K, D = G.shape
    dt = reference.acc_dtype(G.dtype)
    chunk = max(1, _CHUNK_ENTRIES // max(1, B * K))
    if D <= chunk:
        return reference.gram(G / s_safe)
    M = torch.zeros(B, K, K, dtype=dt, device=G.device)
    buf = torch.empty(B, K, chunk, dtype=G.dtype, device=G.device)  # one buffer for every chunk
    for a in range(0, D, chunk):
        n = min(chunk, D - a)
        g = torch.div(G[:, :, a : a + n], s_safe, out=buf[:, :, :n]).to(dt)
        M.baddbmm_(g, g.transpose(1, 2))
    return M


def _rebuild(Ms: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """``(M_true, M_solve)`` in float64 from the row-scaled Gram ``Ms`` and the row scales ``s``.

    ``M_true[b, i, j] = Ms[b, i, j] s_i s_j`` (may be 0 or inf where it does not fit float64);
    ``M_solve`` is the same Gram divided by the sample's largest ``s_k^2``: its largest
    diagonal entry is in [1, D] and the relative scales of the rows are kept to float64
    range (ratios down to ~1e-150), so every rule (scale-invariant per sample) is solved on
    the true geometry even when one row is 1e-30 of another.
    """
    Ms = Ms.to(torch.float64)
    s = s.to(torch.float64)
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    smax = s.amax(-1, keepdim=True) if s.shape[-1] else s.new_zeros(s.shape[0], 1)
    t = s / torch.where(smax > 0, smax, torch.ones_like(smax))
    M_solve = Ms * t.unsqueeze(-1) * t.unsqueeze(-2)
    ss = s.unsqueeze(-1) * s.unsqueeze(-2)
    M_true = torch.where(Ms == 0, torch.zeros_like(Ms), Ms * ss)
    return M_true, M_solve


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
    """Result of the health check of a call (see :func:`health_check`).

    Attributes:
        gram: (B, K, K) Gram matrices to report: the true ``G_b G_b^T`` (may hold inf or 0
            where it does not fit the dtype); for non-finite samples under ``"skip"`` /
            ``"zero"`` the Gram of the repaired gradients (rows zeroed / entries zeroed).
        gram_solve: (B, K, K) Gram matrices to solve on: ``gram`` in its dtype when no row
            needed a repair; else float64, with the repaired samples' rows replaced by their
            Gram rebuilt from per-row rescaled gradients (see :func:`_rebuild`).
        finite: (B,) bool, False for samples whose gradients hold NaN/inf.
        repaired: (n,) indices of samples whose ``gram_solve`` row differs from the Gram
            the backend returned (their coefficients must be solved again), or None.
        nonfinite_samples: (m,) indices of the samples with NaN/inf, or None.
        masked: True when the check ran on the device (no host sync): every row of
            ``gram_solve`` (float64) is the rescaled Gram, all rows are solved on it, ``finite``
            is the only record of non-finite samples (``repaired`` and ``nonfinite_samples``
            are None: they are not known on the host), and ``combine_input`` is what to combine.
        combine_input: (B, K, D) the gradients to combine under a masked check ("zero": the
            entries zeroed), or None for G itself.
    """

    gram: Tensor
    gram_solve: Tensor
    finite: Tensor
    repaired: Optional[Tensor] = None
    nonfinite_samples: Optional[Tensor] = None
    masked: bool = False
    combine_input: Optional[Tensor] = None

    @property
    def clean(self) -> bool:
        return not self.masked and self.repaired is None and self.nonfinite_samples is None


def check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")


#: Where the health check runs when the caller does not say (see :func:`use_device_check`):
#: None = on the device for every tensor not on the CPU and under ``torch.compile``; True /
#: False force the device / host check (tests and benchmarks).
DEVICE_CHECK: Optional[bool] = None


def use_device_check(G: Tensor, nonfinite: str) -> bool:
    """Whether the health check of ``G`` runs on the device (no host sync).

    Never under ``nonfinite="raise"``: raising is a host decision (the one host sync of such a
    call). Otherwise on the device for tensors on an accelerator, where a host read stalls the
    stream, and while ``torch.compile`` traces (a host read would break the graph). Eager CPU
    tensors keep the host check: on the CPU reading the diagonal is no device sync, and the
    host check costs one small reduction where the device check costs passes over G.
    """
    if nonfinite == "raise":
        return False
    if DEVICE_CHECK is not None:
        return DEVICE_CHECK
    return G.device.type != "cpu" or torch.compiler.is_compiling()


def _health_device(G: Tensor, nonfinite: str) -> Health:
    """The health check without a host sync: every sample goes through the rescaled Gram.

    One pass over G for the per-row scales (their NaN/inf mark the non-finite rows), one for
    the Gram of the rescaled rows (chunked over D), and under "zero" one copy of G with the
    non-finite entries zeroed. Nothing is decided on the host.
    """
    s = _row_scales(G)
    finite = torch.isfinite(s).all(-1)
    combine_input = None
    if nonfinite == "zero":
        G = combine_input = torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)
        s = _row_scales(G)
    else:  # a non-finite sample is left as computed (its plain Gram), as by the host check
        s = torch.where(finite.unsqueeze(-1), s, torch.ones_like(s))
    M_true, M_solve = _rebuild(_row_scaled_gram(G, s), s)
    if nonfinite == "skip":  # out of the batch: a zero gradient keeps every later step finite
        keep = finite.view(-1, 1, 1)
        M_true = torch.where(keep, M_true, torch.zeros_like(M_true))
        M_solve = torch.where(keep, M_solve, torch.zeros_like(M_solve))
    acc = reference.acc_dtype(G.dtype)
    return Health(gram=M_true.to(acc), gram_solve=M_solve, finite=finite, masked=True,
                  combine_input=combine_input)


def health_check(G: Tensor, M: Optional[Tensor], nonfinite: str = "raise", *, device: bool = False) -> Health:
    """The health check of the Gram diagonals of ``G`` (B, K, D).

    Host check (``device=False``; one host sync): samples whose squared norms are NaN/inf,
    zero or out of the safe range of the accumulation dtype are looked at again (a rare
    path): non-finite ones follow the ``nonfinite`` policy ("raise":
    :class:`NonFiniteGradientError`; "skip": treated as zero gradients, to be given weight 0
    by the caller; "zero": the non-finite entries zeroed; "propagate": left as they are),
    finite ones get their Gram rebuilt from per-row rescaled gradients, in float64, to
    solve on (a row 1e-30 of another keeps its direction: cosines and projections are right).

    Device check (``device=True``, not for "raise"): the same results for every sample
    without a host decision (see :func:`_health_device`); ``M`` is not needed.

    Args:
        G: (B, K, D) gradients; M: their Gram matrices (B, K, K) from a backend.
    """
    check_policy(nonfinite)
    if device:
        if nonfinite == "raise":
            raise ValueError("nonfinite='raise' needs the host check (raising is a host decision)")
        return _health_device(G, nonfinite)
    assert M is not None
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
    M = M.clone()
    M_solve = M
    if idx.numel() > 0:
        Gi = Gi.to(torch.float64)  # the few repaired samples: exact enough at any float32 scale
        s = _row_scales(Gi)
        true_i, solve_i = _rebuild(_row_scaled_gram(Gi, s), s)
        M[idx] = true_i.to(M.dtype)  # may be 0/inf: it is the truth
        M_solve = M.to(torch.float64, copy=True)
        M_solve[idx] = solve_i
    return Health(gram=M, gram_solve=M_solve, finite=finite,
                  repaired=idx if idx.numel() > 0 else None, nonfinite_samples=nonfinite_idx)


def combine(be, G: Tensor, w: Tensor, reduction: str, health: Health, nonfinite: str) -> Tensor:
    """The backend's combine of the gradients the health check says to combine.

    Under a masked (device) check with "skip", the rows of skipped samples are set to 0 in
    the per-sample output (their NaN times weight 0 is NaN), then summed for "sum".
    """
    if not health.masked:
        return be.combine(repaired_input(G, health, nonfinite), w, reduction)
    Gc = health.combine_input if health.combine_input is not None else G
    if nonfinite != "skip":
        return be.combine(Gc, w, reduction)
    out = be.combine(Gc, w, "none").masked_fill_(~health.finite.unsqueeze(-1), 0)
    return out.sum(0) if reduction == "sum" else out


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
               rows: Optional[Tensor] = None,
               dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(cos, w, phi)`` solved on ``M_solve`` (B, K, K).

    With ``solved`` (from a kernel on the unrepaired Gram) only ``rows`` are solved again.
    ``dtype``: the dtype of the results when all rows are solved (default ``M_solve``'s; the
    health check's float64 ``gram_solve`` is solved in float64 and given back in the
    accumulation dtype).
    """
    if solved is None:
        cos, w, phi = _solve(M_solve, method, order, target, solve_fn)
        if dtype is not None:
            cos, w = cos.to(dtype), w.to(dtype)
            phi = phi.to(dtype) if phi is not None else None
        return cos, w, phi
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
    if use_device_check(G, nonfinite):  # no host sync: solve every row on the rescaled Gram
        h = health_check(G, None, nonfinite, device=True)
        cos, w, phi = solve_rows(h.gram_solve, method, order, target, solve_fn, dtype=h.gram.dtype)
        if nonfinite == "skip":
            w = torch.where(h.finite.unsqueeze(-1), w, torch.zeros_like(w))
        out = combine(be, G, w, reduction, h, nonfinite)
        return EngineOutput(out=out, gram=h.gram, cos=cos, weights=w, phi=phi, sample_weights=None,
                            backend=be.name, nonfinite_samples=None, finite=h.finite)
    solved = None
    out = None
    if method is not None and K <= FUSED_MAX_K:
        out, M, cos, w, phi = kernel_solve(be, G, method, order, target, reduction)
        solved = (cos, w, phi)
    else:
        M = be.gram(G)
    h = health_check(G, M, nonfinite)
    cos, w, phi = solve_rows(h.gram_solve, method, order, target, solve_fn, solved, h.repaired, dtype=M.dtype)
    if nonfinite == "skip" and h.nonfinite_samples is not None:
        w = w.clone()
        w[h.nonfinite_samples] = 0
    stale = h.repaired is not None or (h.nonfinite_samples is not None and nonfinite in ("skip", "zero"))
    if out is None or stale:
        out = be.combine(repaired_input(G, h, nonfinite), w, reduction)
    return EngineOutput(out=out, gram=h.gram, cos=cos, weights=w, phi=phi, sample_weights=None,
                        backend=be.name, nonfinite_samples=h.nonfinite_samples, finite=h.finite)


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
