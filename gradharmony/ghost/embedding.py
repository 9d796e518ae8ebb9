"""nn.Embedding: token-index matching, no dense (V, d) per-sample gradient.

``G_i = sum_t e_{id_t} b_{i,t}^T`` (e one-hot over the vocabulary, padding_idx left out), so
``<G^k_i, G^l_i> = sum_{t,s} [id_t = id_s != pad] (b^k_{i,t} . b^l_{i,s})``; the combined
gradient is one ``index_add`` of ``sum_k w_{k,i} b^k_{i,t}`` into the rows ``id_t``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import LayerRule, Use, per_sample_rows, register


@register(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Dense embeddings without ``max_norm`` or ``scale_grad_by_freq`` (those run the fallback)."""

    name = "embedding"

    def supports(self, module: nn.Module) -> bool:
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse

    def prepare(self, module: nn.Embedding, uses: list[Use], B: int) -> tuple[Tensor, Tensor, Tensor]:
        ids_l, b_l = [], []
        for u in uses:
            ids = u.inputs[0]
            per_sample_rows(ids, B, f"Embedding {module}")
            ids_l.append(ids.reshape(B, -1))
            b_l.append(torch.stack([g.reshape(B, -1, g.shape[-1]) for g in u.grads], dim=1))
        ids = torch.cat(ids_l, 1) if len(ids_l) > 1 else ids_l[0]
        b = torch.cat(b_l, 2) if len(b_l) > 1 else b_l[0]
        valid = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
        return ids, valid, b

    def gram(self, module: nn.Module, state, K: int) -> Tensor:
        ids, valid, b = state
        B, _, T, d = b.shape
        match = ((ids[:, :, None] == ids[:, None, :]) & valid[:, :, None]).to(b.dtype)  # (B, T, T)
        bf = b.reshape(B, K * T, d)
        bb = (bf @ bf.transpose(1, 2)).view(B, K, T, K, T)
        return torch.einsum("bksln,bsn->bkl", bb, match)

    def combine(self, module: nn.Module, state, w: Tensor) -> list[Tensor]:
        ids, valid, b = state
        c = torch.einsum("bk,bktd->btd", w.to(b.dtype), b)
        grad = torch.zeros(module.weight.shape, dtype=b.dtype, device=b.device)
        grad.index_add_(0, ids[valid], c[valid])
        return [grad]
