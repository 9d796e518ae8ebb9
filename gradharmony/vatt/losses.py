"""Per-sample contrastive losses of VATT: NCE (video-audio) and MIL-NCE (video-text).

Both return one loss per *local anchor* (B,), so they can be harmonized per sample. Negatives
come from the whole (possibly all-gathered, see :func:`gather_features`) batch of N clips; the
local anchors are rows ``offset .. offset + B`` of the gathered batch. s(x, y) = x . y / tau.

NCE, for anchor pair (v_i, a_i), negatives are all pairs sharing v_i or a_i (both directions)::

    l_i = -log  e^{s(v_i,a_i)} / (e^{s(v_i,a_i)} + sum_{j!=i} e^{s(v_i,a_j)} + sum_{j!=i} e^{s(v_j,a_i)})

MIL-NCE (Miech et al. 2020), positives are the P candidate narrations t_{i,p} of clip i::

    l_i = -log  sum_p e^{s(v_i,t_ip)} / (sum_p e^{s(v_i,t_ip)} + sum_{j!=i,p} e^{s(v_i,t_jp)} + sum_{j!=i,p} e^{s(v_j,t_ip)})

with padded candidates (``mask`` False) left out everywhere.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["nce_per_sample", "mil_nce_per_sample", "gather_features"]

NEG_INF = float("-inf")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the incoming gradients over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(x: Tensor) -> tuple[Tensor, int]:
    """All-gather ``x`` (B, ...) over the default process group, with gradients.

    Returns (gathered (world*B, ...), offset of this rank's rows). Without an initialised process
    group (or world size 1) returns (x, 0). The backward sums the gradients every rank's loss sends
    to this rank's rows (as open_clip's ``gather_features`` with ``gather_with_grad``), so with
    DDP's gradient averaging the parameter gradients equal those of one process on the global batch
    (each rank's loss is the mean over its local anchors; equal local batch sizes).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def nce_per_sample(za: Tensor, zb: Tensor, za_all: Optional[Tensor] = None, zb_all: Optional[Tensor] = None,
                   offset: int = 0, temperature: float = 0.07) -> Tensor:
    """Symmetric-negative NCE per anchor pair.

    za, zb: (B, D) local embeddings (L2-normalised); za_all, zb_all: (N, D) gathered (default: local).
    Returns (B,).
    """
    za_all = za if za_all is None else za_all
    zb_all = zb if zb_all is None else zb_all
    b = za.shape[0]
    rows = torch.arange(b, device=za.device)
    s_ab = za @ zb_all.T / temperature  # (B, N): (a_i, b_j)
    s_ba = zb @ za_all.T / temperature  # (B, N): (a_j, b_i)
    pos = s_ab[rows, rows + offset]
    s_ba = s_ba.index_put((rows, rows + offset), torch.full_like(pos, NEG_INF))
    return torch.logsumexp(torch.cat([s_ab, s_ba], dim=1), dim=1) - pos


def mil_nce_per_sample(zv: Tensor, zt: Tensor, mask: Tensor, zv_all: Optional[Tensor] = None,
                       zt_all: Optional[Tensor] = None, mask_all: Optional[Tensor] = None,
                       offset: int = 0, temperature: float = 0.07) -> Tensor:
    """MIL-NCE per clip over its P candidate narrations.

    zv: (B, D) local videos; zt: (B, P, D) local narrations; mask: (B, P) bool real candidates
    (at least one per clip); *_all: gathered (N, ...) versions (default: local). Returns (B,).
    """
    zv_all = zv if zv_all is None else zv_all
    zt_all = zt if zt_all is None else zt_all
    mask_all = mask if mask_all is None else mask_all
    b, p, _ = zt.shape
    n = zv_all.shape[0]
    rows = torch.arange(b, device=zv.device)
    s_vt = torch.einsum("bd,npd->bnp", zv, zt_all) / temperature  # (B, N, P): v_i vs t_{j,p}
    s_vt = s_vt.masked_fill(~mask_all[None], NEG_INF)
    s_tv = torch.einsum("bpd,nd->bpn", zt, zv_all) / temperature  # (B, P, N): v_j vs t_{i,p}
    s_tv = s_tv.masked_fill(~mask[:, :, None], NEG_INF)
    own = torch.zeros(b, n, dtype=torch.bool, device=zv.device)
    own[rows, rows + offset] = True
    pos = torch.logsumexp(s_vt[rows, rows + offset], dim=1)  # (B,)
    s_tv = s_tv.masked_fill(own[:, None, :], NEG_INF)  # positives counted once (from s_vt)
    every = torch.cat([s_vt.reshape(b, n * p), s_tv.reshape(b, p * n)], dim=1)
    return torch.logsumexp(every, dim=1) - pos
