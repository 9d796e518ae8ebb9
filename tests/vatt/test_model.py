"""Tokenizer, DropToken, backbone and head shapes of the VATT model."""
from __future__ import annotations

import pytest
import torch

from gradharmony.vatt.model import VATT, AudioTokenizer, TextTokenizer, VideoTokenizer, drop_tokens

from .conftest import tiny_config


def test_tokenizer_shapes() -> None:
    v = VideoTokenizer(3, 16, (2, 8, 8), (2, 2, 2))
    assert v(torch.randn(5, 3, 4, 16, 16)).shape == (5, 8, 16)
    a = AudioTokenizer(16, 32, 8)
    assert a(torch.randn(5, 256)).shape == (5, 8, 16)
    t = TextTokenizer(11, 16, 8)
    assert t(torch.randint(0, 11, (6, 7))).shape == (6, 7, 16)


@pytest.mark.parametrize("rate,keep", [(0.0, 10), (0.5, 5), (0.3, 7), (0.95, 1)])
def test_drop_tokens_keeps_a_subset_in_order(rate: float, keep: int) -> None:
    x = torch.arange(10.0)[None, :, None].expand(3, 10, 4)
    y = drop_tokens(x, rate)
    assert y.shape == (3, keep, 4)
    idx = y[:, :, 0]
    assert torch.all(idx[:, 1:] > idx[:, :-1])  # original order, no duplicates


@pytest.mark.parametrize("backbone", ["shared", "specific"])
def test_forward_shapes_and_normalised_embeddings(tmp_path, backbone: str) -> None:
    cfg = tiny_config(tmp_path, model__backbone=backbone)
    model = VATT(cfg, vocab_size=20)
    assert len(model.backbones) == (1 if backbone == "shared" else 3)
    b, p = 4, cfg.data.num_narrations
    batch = {"video": torch.randn(b, 3, 4, 16, 16), "audio": torch.randn(b, 256),
             "text": torch.randint(1, 20, (b, p, 8)), "text_mask": torch.ones(b, p, dtype=torch.bool)}
    batch["text"][:, :, 5:] = 0  # padding
    out = model(batch)
    assert out["h_v"].shape == (b, 16)
    assert out["z_v_va"].shape == out["z_a_va"].shape == (b, 16)
    assert out["z_v_vt"].shape == (b, 8) and out["z_t_vt"].shape == (b, p, 8)
    for k in ("z_v_va", "z_a_va", "z_v_vt", "z_t_vt"):
        torch.testing.assert_close(out[k].norm(dim=-1), torch.ones(out[k].shape[:-1]))


def test_branch_receives_video_features(tmp_path) -> None:
    cfg = tiny_config(tmp_path)
    model = VATT(cfg, vocab_size=20).eval()
    calls = []

    def branch(h: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        calls.append((h.shape, k))
        return tuple(h for _ in range(k))

    batch = {"video": torch.randn(2, 3, 4, 16, 16), "audio": torch.randn(2, 256),
             "text": torch.randint(1, 20, (2, 2, 8)), "text_mask": torch.ones(2, 2, dtype=torch.bool)}
    model(batch, branch=branch)
    assert calls == [(torch.Size([2, 16]), 2)]


def test_padding_does_not_change_text_features(tmp_path) -> None:
    model = VATT(tiny_config(tmp_path), vocab_size=20).eval()
    ids = torch.tensor([[[3, 4, 5, 0, 0, 0, 0, 0]]])
    short = model.encode_text(ids)
    longer = model.encode_text(torch.cat([ids, torch.zeros(1, 1, 0, dtype=torch.long)], -1))
    torch.testing.assert_close(short, longer)
    # changing a padded position's id (but keeping it 0 = pad) is irrelevant; a real token is not
    other = ids.clone()
    other[0, 0, 2] = 6
    assert not torch.allclose(model.encode_text(other), short)
