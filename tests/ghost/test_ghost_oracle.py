"""ParameterHarmonizer (ghost Gram, path decomposition) vs an explicit float64 oracle.

The oracle (``_oracle.py``) materializes every per-sample, per-loss gradient with per-sample
parameter copies and runs the reference engine; the harmonizer never forms a (B, P) tensor.
Relative error <= 1e-5 in float64 over all parameter gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import gradharmony as gh
from gradharmony.ghost import ParameterHarmonizer
from gradharmony.ghost.conv import PatchConvRule
from gradharmony.ghost.linear import LinearRule
from gradharmony.vatt import model as vatt_model
from gradharmony.vatt.config import build_config
from gradharmony.vatt.data import load_batch
from gradharmony.vatt.losses import mil_nce_per_sample, nce_per_sample
from gradharmony.vatt.synthetic import DigitsAVT

sys.path.insert(0, str(Path(__file__).parent))
from _oracle import expected_grads  # noqa: E402

RTOL = 1e-5
RULES = ["sum", "pcgrad", "gradvac", "cagrad", "mgda"]


def make_rule(name: str, seed: int) -> gh.Rule:
    if name in ("pcgrad", "gradvac"):
        return gh.get_rule(name, seed=seed)
    return gh.get_rule(name)


def make_curriculum(kind) -> "gh.ConflictCurriculum | None":
    if kind is None:
        return None
    if kind == "fraction":
        return gh.ConflictCurriculum("fraction", start=0.6, ramp_steps=10)
    return gh.ConflictCurriculum("threshold", start=0.0, mode="soft", temperature=0.3)


def assert_grads(model: nn.Module, want: dict, seed: int) -> None:
    names = [n for n, p in model.named_parameters() if n in want]
    got = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names])
    ref = torch.cat([want[n].reshape(-1) for n in names])
    err = float((got - ref).detach().norm() / ref.norm().clamp_min(1e-300))
    worst = sorted(((float((dict(model.named_parameters())[n].grad - want[n]).norm()
                           / want[n].norm().clamp_min(1e-300)), n) for n in names), reverse=True)[:3]
    assert err <= RTOL, f"seed {seed}: relative error {err:.3g}; worst parameters {worst}"
    assert set(want) == {n for n, p in model.named_parameters() if p.grad is not None}, \
        f"parameters with a gradient differ: {sorted(set(want) ^ {n for n, p in model.named_parameters() if p.grad is not None})}"


# ---------------------------------------------------------------------------- VATT tiny

class FixedDrop:
    """DropToken with a fixed keep table per token count, so that the per-sample forward
    of the oracle drops the same tokens as the batched forward (``sample`` picks the row)."""

    def __init__(self, B: int, seed: int) -> None:
        self.B, self.g, self.tables, self.sample = B, torch.Generator().manual_seed(seed), {}, None

    def __call__(self, x, rate, generator=None):
        if rate <= 0:
            return x
        b, n, d = x.shape
        keep = max(1, int(round(n * (1.0 - rate))))
        if n not in self.tables:
            self.tables[n] = torch.rand(self.B, n, generator=self.g).argsort(1)[:, :keep].sort(1).values
        idx = self.tables[n] if self.sample is None else self.tables[n][self.sample:self.sample + 1]
        return x.gather(1, idx[..., None].expand(b, keep, d))


VATT_TINY = {
    "data.frames": 4, "data.size": 16, "data.audio_samples": 256, "data.num_narrations": 2,
    "data.max_text_len": 6, "model.video_patch": (2, 8, 8), "model.audio_patch": 32, "model.d_model": 8,
    "model.depth": 1, "model.heads": 2, "model.va_dim": 8, "model.vt_dim": 4, "model.dropout": 0.0,
}


def vatt_case(B: int, seed: int, drop_token: float, backbone: str = "shared"):
    cfg = build_config("tiny", overrides={**VATT_TINY, "model.drop_token": drop_token,
                                          "model.backbone": backbone, "data.train_size": 16,
                                          "train.batch_size": 8})
    ds = DigitsAVT(cfg.data, "train", seed=seed % 1000, size=16)
    batch = load_batch(ds, range(B))
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    # padding in text: shorten every narration of sample 0 and drop its last candidate
    batch["text"][0, :, 3:] = 0
    if B > 1:
        batch["text_mask"][0, -1] = False
    torch.manual_seed(seed)
    model = vatt_model.VATT(cfg, len(ds.tokenizer)).double().train()
    tau = cfg.model.temperature

    def losses(out):
        l_va = nce_per_sample(out["z_v_va"], out["z_a_va"], temperature=tau)
        l_vt = mil_nce_per_sample(out["z_v_vt"], out["z_t_vt"], batch["text_mask"], temperature=tau)
        return [0.5 * l_va.mean(), 0.5 * l_vt.mean()]

    return model, batch, losses


def oracle_fns(batch, losses, drop):
    def sample_forward(m, params, i):
        drop.sample = i
        try:
            return functional_call(m, params, ({k: v[i:i + 1] for k, v in batch.items()},))
        finally:
            drop.sample = None

    def losses_fn(outs):
        return losses({k: torch.cat([o[k] for o in outs]) for k in outs[0]})

    return sample_forward, losses_fn


def run_vatt(B, seed, rule_name, cur_kind, drop_token=0.5, monkeypatch=None, backbone="shared"):
    model, batch, losses = vatt_case(B, seed, drop_token, backbone)
    drop = FixedDrop(B, seed)
    monkeypatch.setattr(vatt_model, "drop_tokens", drop)
    ph = ParameterHarmonizer(model, make_rule(rule_name, seed), curriculum=make_curriculum(cur_kind))
    with ph.capture(batch_size=B):
        out = model(batch)
    ph.backward(losses(out))
    want = expected_grads(model, *oracle_fns(batch, losses, drop), B, make_rule(rule_name, seed),
                          make_curriculum(cur_kind))
    assert_grads(model, want, seed)
    return ph


@pytest.mark.parametrize("rule", RULES)
def test_vatt_every_rule_with_curriculum_odd_batch(rule, seed, monkeypatch) -> None:
    run_vatt(5, seed, rule, "fraction", monkeypatch=monkeypatch)


@pytest.mark.parametrize("rule,cur", [("pcgrad", None), ("gradvac", "soft")])
def test_vatt_batch_of_one(rule, cur, seed, monkeypatch) -> None:
    run_vatt(1, seed, rule, cur, monkeypatch=monkeypatch)


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_vatt_shared_backbone_each_gram_mode(mode, seed, monkeypatch) -> None:
    """The shared backbone's layers run three times per step (video, audio, text): the ghost
    Gram needs the cross-call terms."""
    monkeypatch.setattr(LinearRule, "mode", mode)
    monkeypatch.setattr(PatchConvRule, "mode", mode)
    run_vatt(4, seed, "pcgrad", "soft", monkeypatch=monkeypatch)


def test_vatt_specific_backbones_no_droptoken(seed, monkeypatch) -> None:
    run_vatt(4, seed, "pcgrad", None, drop_token=0.0, monkeypatch=monkeypatch, backbone="specific")


def test_vatt_gradvac_state_over_two_steps(seed, monkeypatch) -> None:
    """Step 2 runs on the GradVac EMA target that step 1 updated from the ghost cosines."""
    model, batch, losses = vatt_case(3, seed, 0.5)
    drop = FixedDrop(3, seed)
    monkeypatch.setattr(vatt_model, "drop_tokens", drop)
    ours, ref = gh.GradVac(beta=0.5, seed=seed), gh.GradVac(beta=0.5, seed=seed)
    cur_a, cur_b = make_curriculum("fraction"), make_curriculum("fraction")
    ph = ParameterHarmonizer(model, ours, curriculum=cur_a)
    for _ in range(2):
        model.zero_grad()
        with ph.capture(batch_size=3):
            out = model(batch)
        ph.backward(losses(out))
        want = expected_grads(model, *oracle_fns(batch, losses, drop), 3, ref, cur_b)
        assert_grads(model, want, seed)
        ph.step()
        cur_b.step()
    torch.testing.assert_close(ours.phi_hat, ref.phi_hat, rtol=1e-9, atol=1e-12)
    assert cur_a.step_count == 2


# ---------------------------------------------------------------------------- every layer type

class Affine(nn.Module):
    """An unregistered layer (runs the torch.func fallback)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.scale + self.shift)


class Tokens(nn.Module):
    """Patch tokenizers + embedding + an owned position parameter."""

    def __init__(self, d: int, vocab: int, n_tokens: int) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, d, kernel_size=3, stride=3)  # length 10: one sample cropped
        self.c2 = nn.Conv2d(1, d, kernel_size=(2, 3), stride=(2, 3), bias=False)
        self.c3 = nn.Conv3d(1, d, kernel_size=2, stride=2)
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, d) * 0.1)

    def forward(self, x1, x2, x3, ids):
        t = torch.cat([self.c1(x1).transpose(1, 2), self.c2(x2).flatten(2).transpose(1, 2),
                       self.c3(x3).flatten(2).transpose(1, 2), self.emb(ids)], dim=1)
        return t + self.pos


class Mixer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.lin = nn.Linear(d, 2 * d)
        self.lin2 = nn.Linear(2 * d, d)

    def forward(self, x, cls):
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], 1)
        return x + self.lin2(F.gelu(self.lin(self.ln(x))))


class AllLayers(nn.Module):
    def __init__(self, d: int = 6, vocab: int = 9) -> None:
        super().__init__()
        self.tok = Tokens(d, vocab, 3 + 2 + 2 + 5)
        self.agg = nn.ParameterDict({"cls": nn.Parameter(torch.randn(1, 1, d))})
        self.mix = Mixer(d)
        self.aff = Affine(d)
        self.head_a = nn.Linear(d, 3)
        self.head_b = nn.Linear(d, 3)
        self.head_c = nn.Linear(d, 2)

    def forward(self, b):
        x = self.mix(self.tok(b["x1"], b["x2"], b["x3"], b["ids"]), self.agg["cls"])
        h = self.aff(x).mean(1)
        return {"a": self.head_a(h), "b": self.head_b(h), "c": self.head_c(h), "h": h}


def all_layers_case(B: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AllLayers().double()
    ids = torch.randint(0, 9, (B, 5), generator=g)
    ids[0, -2:] = 0  # padding
    ids[:, 1] = ids[:, 2]  # repeated tokens (index matching)
    batch = {"x1": torch.randn(B, 2, 10, generator=g, dtype=torch.float64),
             "x2": torch.randn(B, 1, 4, 3, generator=g, dtype=torch.float64),
             "x3": torch.randn(B, 1, 2, 2, 4, generator=g, dtype=torch.float64), "ids": ids}

    def losses(out):
        a, b, c, h = out["a"], out["b"], out["c"], out["h"]
        l1 = torch.logsumexp(a @ b.T, dim=1).mean()  # couples samples (like a contrastive loss)
        l2 = (b.pow(2).sum(1) - 0.3 * (h @ h.T).tanh().mean(1)).mean()
        l3 = (c[:, 0] - h.sum(1)).pow(2).mean()
        return [l1, l2, l3]

    return model, batch, losses


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("rule,cur,B", [("sum", None, 3), ("pcgrad", "fraction", 7), ("gradvac", "soft", 5),
                                         ("cagrad", "fraction", 3), ("mgda", None, 1)])
def test_every_layer_type(rule, cur, B, mode, seed, monkeypatch) -> None:
    monkeypatch.setattr(LinearRule, "mode", mode)
    monkeypatch.setattr(PatchConvRule, "mode", mode)
    model, batch, losses = all_layers_case(B, seed)
    with pytest.warns(RuntimeWarning, match="module aff .Affine."):
        ph = ParameterHarmonizer(model, make_rule(rule, seed), curriculum=make_curriculum(cur))
    with ph.capture(batch_size=B):
        out = model(batch)
    ph.backward(losses(out))

    def sample_forward(m, params, i):
        return functional_call(m, params, ({k: v[i:i + 1] for k, v in batch.items()},))

    def losses_fn(outs):
        return losses({k: torch.cat([o[k] for o in outs]) for k in outs[0]})

    want = expected_grads(model, sample_forward, losses_fn, B, make_rule(rule, seed), make_curriculum(cur))
    assert_grads(model, want, seed)


def test_not_shared_only(seed) -> None:
    model, batch, losses = all_layers_case(4, seed)
    with pytest.warns(RuntimeWarning):
        ph = ParameterHarmonizer(model, gh.PCGrad(seed=seed), shared_only=False)
    with ph.capture(batch_size=4):
        out = model(batch)
    ph.backward(losses(out))
    want = expected_grads(
        model, lambda m, p, i: functional_call(m, p, ({k: v[i:i + 1] for k, v in batch.items()},)),
        lambda outs: losses({k: torch.cat([o[k] for o in outs]) for k in outs[0]}), 4,
        gh.PCGrad(seed=seed), None, shared_only=False)
    assert_grads(model, want, seed)
