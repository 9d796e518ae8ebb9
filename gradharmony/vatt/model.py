"""VATT (Akbari et al. 2021): raw-signal tokenizers, Transformer backbone(s), common-space heads.

Shapes (B batch, P candidate narrations, d = ``d_model``)::

    video (B, C, T, H, W) --Conv3d(kernel=stride=patch)--> (B, Nv, d)   + pos emb, DropToken
    audio (B, L)          --Conv1d(kernel=stride=patch)--> (B, Na, d)   + pos emb, DropToken
    text  (B, P, S) ids   --Embedding-->                   (B*P, S, d)  + pos emb, padding mask
    each: [AGG] token prepended, Transformer, LayerNorm, AGG output -> h_m (B, d) / (B, P, d)

    z_v_va = normalize(g_v->va(h_v))          (B, va)      video in video-audio space
    z_a_va = normalize(g_a->va(h_a))          (B, va)
    z_v_vt = normalize(g_va->vt(g_v->va(h_v)))  (B, vt)    video-text space stacked on va
    z_t_vt = normalize(g_t->vt(h_t))          (B, P, vt)

The backbone is one modality-agnostic Transformer (``backbone="shared"``, VATT-MA) or three
modality-specific ones (``"specific"``). Heads are linear (as in MMV's FAC spaces).

Gradient harmonization hooks in at the shared video representation: ``forward(batch, branch=fn)``
calls ``fn(h_v, 2)`` and feeds one view to the video-audio path and the other to the video-text
path (``gh.Harmonizer.branch``), so the per-sample gradients of the two CMA losses w.r.t. ``h_v``
are harmonized before they reach the backbone.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config

__all__ = ["VATT", "VideoTokenizer", "AudioTokenizer", "TextTokenizer", "Transformer", "drop_tokens"]

BranchFn = Callable[[Tensor, int], tuple[Tensor, ...]]


def drop_tokens(x: Tensor, rate: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """DropToken: keep a random ``ceil((1 - rate) * N)`` of the N tokens of each sample.

    x: (B, N, d) -> (B, N_keep, d); kept tokens stay in their original order.
    """
    if rate <= 0.0:
        return x
    b, n, d = x.shape
    keep = max(1, int(round(n * (1.0 - rate))))
    noise = torch.rand(b, n, generator=generator, device=x.device)
    idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    return x.gather(1, idx[..., None].expand(b, keep, d))


class VideoTokenizer(nn.Module):
    """3D patches: (B, C, T, H, W) -> (B, T/pt * H/ph * W/pw, d) with learned positions."""

    def __init__(self, channels: int, d: int, patch: tuple[int, int, int], grid: tuple[int, int, int]):
        super().__init__()
        self.proj = nn.Conv3d(channels, d, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1] * grid[2], d))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, video: Tensor) -> Tensor:
        return self.proj(video).flatten(2).transpose(1, 2) + self.pos


class AudioTokenizer(nn.Module):
    """1D patches of the raw waveform: (B, L) -> (B, L/patch, d) with learned positions."""

    def __init__(self, d: int, patch: int, n_tokens: int):
        super().__init__()
        self.proj = nn.Conv1d(1, d, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, d))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, audio: Tensor) -> Tensor:
        return self.proj(audio[:, None]).transpose(1, 2) + self.pos


class TextTokenizer(nn.Module):
    """Word embeddings: ids (N, S) -> (N, S, d) with learned positions (id 0 = padding)."""

    def __init__(self, vocab_size: int, d: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        return self.embed(ids) + self.pos[:, : ids.shape[1]]


class Block(nn.Module):
    """Pre-LN Transformer block (self-attention + GELU MLP)."""

    def __init__(self, d: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, int(d * mlp_ratio)), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(int(d * mlp_ratio), d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, N, d); key_mask: (B, N) bool, True = attend."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Stack of blocks with a final LayerNorm; returns the aggregation-token output (B, d)."""

    def __init__(self, d: int, depth: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens: Tensor, agg: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """tokens (B, N, d), agg (1, 1, d) modality aggregation token, key_mask (B, N) -> (B, d)."""
        x = torch.cat([agg.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(key_mask.shape[0], 1), key_mask], dim=1)
        for blk in self.blocks:
            x = blk(x, key_mask)
        return self.norm(x[:, 0])


class VATT(nn.Module):
    """Video-Audio-Text Transformer with FAC-style common spaces; see the module docstring."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        m, d = cfg.model, cfg.data
        self.drop_token, dm = m.drop_token, m.d_model
        grid = (d.frames // m.video_patch[0], d.size // m.video_patch[1], d.size // m.video_patch[2])
        self.video_tok = VideoTokenizer(d.channels, dm, m.video_patch, grid)
        self.audio_tok = AudioTokenizer(dm, m.audio_patch, d.audio_samples // m.audio_patch)
        self.text_tok = TextTokenizer(vocab_size, dm, d.max_text_len)
        self.agg = nn.ParameterDict({k: nn.Parameter(torch.randn(1, 1, dm) * 0.02) for k in ("video", "audio", "text")})
        n_backbones = 1 if m.backbone == "shared" else 3
        self.backbones = nn.ModuleList(Transformer(dm, m.depth, m.heads, m.mlp_ratio, m.dropout)
                                       for _ in range(n_backbones))
        self.v_to_va = nn.Linear(dm, m.va_dim)
        self.a_to_va = nn.Linear(dm, m.va_dim)
        self.va_to_vt = nn.Linear(m.va_dim, m.vt_dim)
        self.t_to_vt = nn.Linear(dm, m.vt_dim)

    def backbone(self, modality: str) -> Transformer:
        if len(self.backbones) == 1:
            return self.backbones[0]
        return self.backbones[("video", "audio", "text").index(modality)]

    def encode_video(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> h_v (B, d); DropToken in training."""
        tok = self.video_tok(video)
        if self.training:
            tok = drop_tokens(tok, self.drop_token)
        return self.backbone("video")(tok, self.agg["video"])

    def encode_audio(self, audio: Tensor) -> Tensor:
        """(B, L) -> h_a (B, d); DropToken in training."""
        tok = self.audio_tok(audio)
        if self.training:
            tok = drop_tokens(tok, self.drop_token)
        return self.backbone("audio")(tok, self.agg["audio"])

    def encode_text(self, text: Tensor) -> Tensor:
        """(B, P, S) ids -> h_t (B, P, d)."""
        b, p, s = text.shape
        ids = text.reshape(b * p, s)
        return self.backbone("text")(self.text_tok(ids), self.agg["text"], key_mask=ids != 0).view(b, p, -1)

    def heads(self, h_va: Tensor, h_vt: Tensor, h_a: Tensor, h_t: Tensor) -> dict[str, Tensor]:
        """Common-space embeddings (L2-normalised) from the backbone features."""
        return {
            "z_v_va": F.normalize(self.v_to_va(h_va), dim=-1),
            "z_a_va": F.normalize(self.a_to_va(h_a), dim=-1),
            "z_v_vt": F.normalize(self.va_to_vt(self.v_to_va(h_vt)), dim=-1),
            "z_t_vt": F.normalize(self.t_to_vt(h_t), dim=-1),
        }

    def forward(self, batch: dict[str, Tensor], branch: Optional[BranchFn] = None) -> dict[str, Tensor]:
        """Embeddings of a batch; ``branch(h_v, 2)`` splits the video features between the two paths.

        Returns h_v (B, d) and z_v_va, z_a_va (B, va), z_v_vt (B, vt), z_t_vt (B, P, vt).
        """
        h_v = self.encode_video(batch["video"])
        h_va, h_vt = branch(h_v, 2) if branch is not None else (h_v, h_v)
        out = self.heads(h_va, h_vt, self.encode_audio(batch["audio"]), self.encode_text(batch["text"]))
        out["h_v"] = h_v
        return out
