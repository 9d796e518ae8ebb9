"""``ConflictCurriculum``: schedules, monotonicity, normalization, state, stats."""

from __future__ import annotations

import math

import pytest
import torch

import gradharmony as gh
from gradharmony.api.stats import HIST_EDGES, QUANTILES


def _scores(n, gen, ties=False):
    s = torch.rand(n, generator=gen) * 2 - 1
    if ties:
        s = (s * 4).round() / 4  # many ties
    return s


def test_fraction_schedule_values():
    cur = gh.ConflictCurriculum(start=0.2, end=0.8, warmup_steps=3, ramp_steps=6)
    expect = [0.2, 0.2, 0.2, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8]
    for t, v in enumerate(expect):
        assert cur.value() == pytest.approx(v), f"step {t}"
        assert cur.value(t) == pytest.approx(v)
        cur.step()
    assert gh.ConflictCurriculum(start=0.3, end=0.9, ramp_steps=0).value() == pytest.approx(0.9)


@pytest.mark.parametrize("B", [1, 7, 20, 33])
def test_kept_fraction_follows_schedule(B, gen):
    cur = gh.ConflictCurriculum(start=0.25, end=1.0, warmup_steps=2, ramp_steps=5, normalize=False)
    s = _scores(B, gen)
    for t in range(10):
        w = cur.raw_weights(s)
        q = cur.value()
        n_keep = min(B, max(1, math.ceil(q * B - 1e-9)))
        assert int(w.sum()) == n_keep, f"step {t}: kept {int(w.sum())}, schedule says {q} of {B}"
        # the kept ones are the top scores
        if n_keep < B:
            assert s[w > 0].min() > s[w == 0].max()
        cur.step()
    assert int(cur.raw_weights(s).sum()) == B


@pytest.mark.parametrize("schedule", ["fraction", "threshold"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("ties", [False, True])
def test_weights_monotone_in_score(schedule, mode, ties, gen):
    cur = gh.ConflictCurriculum(schedule=schedule, mode=mode, ramp_steps=4, temperature=0.2)
    s = _scores(40, gen, ties)
    for _ in range(6):
        raw = cur.raw_weights(s)
        w = cur.weights(s)
        assert ((raw >= 0) & (raw <= 1)).all()
        order = s.argsort()
        for x in (raw, w):
            xs = x[order]
            assert (xs[1:] >= xs[:-1] - 1e-6).all(), "a higher score got a lower weight"
        # equal scores get equal weights (ties at the threshold are all kept)
        for v in s.unique():
            for x in (raw, w):
                xv = x[s == v]
                assert float(xv.max() - xv.min()) <= 1e-6 * max(1.0, float(xv.max())), "tied scores, different weights"
        cur.step()


def test_threshold_schedule(gen):
    cur = gh.ConflictCurriculum(schedule="threshold", start=0.5, end=-0.5, warmup_steps=1, ramp_steps=4,
                                normalize=False)
    s = _scores(50, gen)
    for t, tau in enumerate([0.5, 0.5, 0.25, 0.0, -0.25, -0.5, -0.5]):
        assert cur.value() == pytest.approx(tau)
        w = cur.raw_weights(s)
        assert torch.equal(w, (s >= tau).float()), f"step {t}"
        assert cur.threshold == pytest.approx(tau)
        cur.step()
    d = gh.ConflictCurriculum(schedule="threshold")
    assert (d.start, d.end) == (0.0, -1.0)


def test_soft_mode(gen):
    cur = gh.ConflictCurriculum(schedule="threshold", start=0.1, mode="soft", temperature=0.3, normalize=False)
    s = _scores(30, gen)
    w = cur.raw_weights(s)
    assert ((w >= 0) & (w <= 1)).all()
    torch.testing.assert_close(w, torch.sigmoid((s - 0.1) / 0.3))


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("schedule", ["fraction", "threshold"])
def test_normalization_mean_one(mode, schedule, gen):
    cur = gh.ConflictCurriculum(schedule=schedule, mode=mode, start=0.3 if schedule == "fraction" else -0.2)
    s = _scores(17, gen)
    w = cur.weights(s)
    raw = cur.raw_weights(s)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(w, raw * 17 / raw.sum())
    # nothing kept (threshold above every score): no NaN, all zero
    none = gh.ConflictCurriculum(schedule="threshold", start=1.0, normalize=True)
    w0 = none.weights(torch.full((5,), 0.5))
    assert torch.equal(w0, torch.zeros(5))
    assert gh.ConflictCurriculum().weights(torch.zeros(0)).shape == (0,)


def test_state_round_trip_and_mismatch():
    cur = gh.ConflictCurriculum(start=0.4, warmup_steps=2, ramp_steps=7, mode="soft")
    for _ in range(5):
        cur.step()
    st = cur.state_dict()
    other = gh.ConflictCurriculum(start=0.4, warmup_steps=2, ramp_steps=7, mode="soft")
    other.load_state_dict(st)
    assert other.step_count == 5 and other.value() == cur.value()
    for bad in (dict(start=0.5), dict(mode="hard"), dict(ramp_steps=8), dict(schedule="threshold", start=0.4)):
        kw = dict(start=0.4, warmup_steps=2, ramp_steps=7, mode="soft")
        kw.update(bad)
        with pytest.raises(ValueError, match="config"):
            gh.ConflictCurriculum(**kw).load_state_dict(st)


@pytest.mark.parametrize("kw", [dict(schedule="linear"), dict(mode="medium"), dict(reduce="max"), dict(start=0.0),
                                dict(start=1.5), dict(end=-0.1), dict(schedule="threshold", start=2.0),
                                dict(temperature=0.0), dict(warmup_steps=-1), dict(start=float("nan"))])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        gh.ConflictCurriculum(**kw)


def test_conflict_score_k3():
    cos = torch.eye(3).repeat(2, 1, 1)
    cos[0, 0, 1] = cos[0, 1, 0] = -0.5
    cos[0, 1, 2] = cos[0, 2, 1] = 0.7
    assert gh.conflict_score(cos, "min").tolist() == pytest.approx([-0.5, 0.0])
    assert gh.conflict_score(cos, "mean").tolist() == pytest.approx([(-0.5 + 0.7) / 3, 0.0])


def test_harmonize_with_curriculum_and_stats(gen):
    B, K = 24, 2
    G = torch.randn(B, K, 13, generator=gen, dtype=torch.float64)
    G[:, 1] -= 0.5 * G[:, 0]
    cur = gh.ConflictCurriculum(start=0.25, end=1.0, ramp_steps=3)
    base = gh.harmonize(G, "pcgrad", backend="torch")
    res = gh.harmonize(G, "pcgrad", backend="torch", curriculum=cur)
    score = base.cos[:, 0, 1]
    kept = res.curriculum_weights > 0
    assert int(kept.sum()) == 6
    assert score[kept].min() >= score[~kept].max()
    torch.testing.assert_close(res.sample_weights, res.curriculum_weights * B / 6)
    torch.testing.assert_close(res.weights, base.weights * res.sample_weights[:, None])
    torch.testing.assert_close(res.grad, base.grad * res.sample_weights[:, None])
    st = res.stats
    assert st.kept_fraction == pytest.approx(0.25)
    assert st.threshold == pytest.approx(float(score[kept].min()), abs=1e-6)
    assert st.conflict_fraction == pytest.approx(float((score < 0).double().mean()))
    assert int(st.histogram().sum()) == B
    d = st.to_dict(prefix="train/")
    assert sum(d[f"train/cos_hist_{i:02d}"] for i in range(len(HIST_EDGES) - 1)) == B
    qs = torch.quantile(score.float(), torch.tensor(QUANTILES))
    for q, v in zip(QUANTILES, qs.tolist()):
        assert d[f"train/cos_q{int(q * 100):02d}"] == pytest.approx(v, abs=1e-6)
    assert d["train/kept_fraction"] == pytest.approx(0.25) and d["train/threshold"] == pytest.approx(st.threshold)
    # the schedule advances only with step()
    res2 = gh.harmonize(G, "pcgrad", backend="torch", curriculum=cur)
    assert int((res2.curriculum_weights > 0).sum()) == 6
    cur.step()
    res3 = gh.harmonize(G, "pcgrad", backend="torch", curriculum=cur)
    assert int((res3.curriculum_weights > 0).sum()) == 12


def test_stats_histogram_edges():
    """Scores exactly at -1 and 1 are counted (and B = 0 gives empty stats)."""
    cos = torch.zeros(4, 2, 2)
    cos[:, 0, 1] = cos[:, 1, 0] = torch.tensor([-1.0, 1.0, 0.0, -0.05])
    st = gh.conflict_stats(cos)
    h = st.histogram()
    assert int(h.sum()) == 4 and h[0] == 1 and h[-1] == 1 and h[9] == 1 and h[10] == 1
    assert st.conflict_fraction == 0.5 and st.kept_fraction == 1.0
    empty = gh.conflict_stats(torch.zeros(0, 2, 2))
    assert empty.conflict_fraction == 0.0 and "cos_mean" not in empty.to_dict()


def test_empty_batch_reports_no_stale_threshold(gen):
    cur = gh.ConflictCurriculum(start=0.5)
    gh.harmonize(torch.randn(6, 2, 5, generator=gen), "pcgrad", curriculum=cur, backend="torch")
    assert cur.threshold is not None
    res = gh.harmonize(torch.zeros(0, 2, 5), "pcgrad", curriculum=cur, backend="torch")
    assert res.threshold is None and "threshold" not in res.stats.to_dict()
    assert res.grad.shape == (0, 5) and res.stats.kept_fraction == 0.0


def test_gradvac_ema_uses_kept_samples_only(gen):
    """With a curriculum, GradVac's EMA moves by the mean phi of the samples that took part."""
    G = torch.randn(8, 2, 11, generator=gen, dtype=torch.float64)
    G[:, 1] -= 0.5 * G[:, 0]
    rule = gh.GradVac(beta=0.5)
    res = gh.harmonize(G, rule, backend="torch", curriculum=gh.ConflictCurriculum(start=0.5))
    kept = res.sample_weights > 0
    expect = 0.5 * res.cos[kept, 0, 1].mean()  # first call: phi = the plain cosine, EMA from 0
    assert rule.phi_hat[0, 1].item() == pytest.approx(float(expect), abs=1e-12)
    assert rule.phi_hat[1, 0].item() == pytest.approx(float(expect), abs=1e-12)


def test_curriculum_under_single_process_group(gen, tmp_path):
    """sync=True with torch.distributed initialized (world size 1, gloo): same weights and threshold."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    s = _scores(13, gen)
    ref = gh.ConflictCurriculum(start=0.4)
    w_ref = ref.weights(s)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        cur = gh.ConflictCurriculum(start=0.4)
        w = cur.weights(s)
        assert torch.equal(w, w_ref) and cur.threshold == ref.threshold
    finally:
        dist.destroy_process_group()
