"""Gradient harmonization inside a model: the README's second usage block, runnable as is.

A toy tri-modal model (video, audio and text features -> linear encoders) trained with a
per-sample NCE (video-audio) and MIL-NCE (video-text) loss, first harmonized at the shared
video representation (``gh.Harmonizer.branch``), then at parameter level
(``gh.HarmonizedOptimizer(granularity="sample")``). Seconds on a CPU::

    python examples/harmonize_in_a_model.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradharmony as gh

B, P, D_IN, D = 32, 3, 24, 16  # batch, narrations per clip, input and embedding sizes
TAU = 0.07


def nce(h: Tensor, a: Tensor) -> Tensor:
    """Per-sample InfoNCE (B,) of video embeddings h (B, D) against audio embeddings a (B, D)."""
    logits = F.normalize(h, dim=-1) @ F.normalize(a, dim=-1).T / TAU
    return F.cross_entropy(logits, torch.arange(len(h)), reduction="none")


def milnce(h: Tensor, t: Tensor) -> Tensor:
    """Per-sample MIL-NCE (B,) of video embeddings h (B, D) against P narrations per clip t (B, P, D)."""
    sim = torch.einsum("bd,cpd->bcp", F.normalize(h, dim=-1), F.normalize(t, dim=-1)) / TAU  # (B, B, P)
    pos = torch.logsumexp(sim.diagonal(dim1=0, dim2=1).T, dim=1)  # (B,) the clip's own narrations
    return torch.logsumexp(sim.flatten(1), dim=1) - pos


class ToyVATT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.video, self.audio, self.text = nn.Linear(D_IN, D), nn.Linear(D_IN, D), nn.Linear(D_IN, D)
        self.head_va, self.head_vt = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, video: Tensor, audio: Tensor, text: Tensor, branch=None) -> tuple[Tensor, Tensor]:
        """Per-sample losses (l_va (B,), l_vt (B,)); ``branch`` splits the shared video features."""
        video_features = self.video(video)
        h_va, h_vt = branch(video_features, 2) if branch is not None else (video_features, video_features)
        return nce(self.head_va(h_va), self.audio(audio)), milnce(self.head_vt(h_vt), self.text(text))


def batch(gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Correlated modalities: audio and narrations are noisy views of the video."""
    video = torch.randn(B, D_IN, generator=gen)
    audio = video + 0.5 * torch.randn(B, D_IN, generator=gen)
    text = video[:, None] + 0.5 * torch.randn(B, P, D_IN, generator=gen)
    return video, audio, text


def main(steps: int = 20, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    # feature level: harmonize at the shared representation (the branch op)
    model = ToyVATT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cur = gh.ConflictCurriculum(schedule="fraction", start=0.5, end=1.0, ramp_steps=steps)
    harm = gh.Harmonizer("pcgrad", curriculum=cur)
    for _ in range(steps):
        video, audio, text = batch(gen)
        optimizer.zero_grad()
        l_va, l_vt = model(video, audio, text, branch=harm.branch)  # identity forward, harmonized backward
        loss = 0.5 * (l_va.mean() + l_vt.mean())
        loss.backward(); optimizer.step(); harm.step()  # noqa: E702
    stats = harm.last_stats.to_dict(prefix="train/")
    print(f"feature level:   loss {loss.item():.3f}  conflict fraction {stats['train/conflict_fraction']:.2f}  "
          f"kept fraction {stats['train/kept_fraction']:.2f}")

    # parameter level: per-sample parameter gradients (the optimizer wrapper)
    model = ToyVATT()
    opt = gh.HarmonizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), "gradvac",
                                 granularity="sample", chunk_size=16)
    for _ in range(steps):
        video, audio, text = batch(gen)
        l_va, l_vt = model(video, audio, text)  # per-sample losses (B,)
        opt.zero_grad(); opt.backward([l_va / B, l_vt / B]); opt.step()  # noqa: E702
    loss2 = 0.5 * (l_va.mean() + l_vt.mean())
    print(f"parameter level: loss {loss2.item():.3f}  conflict fraction {opt.last_stats.conflict_fraction:.2f}")
    return {"feature_loss": loss.item(), "parameter_loss": loss2.item(), **stats}


if __name__ == "__main__":
    main()
