"""Retrieval ties and chance levels, the held-out split, instance attributes of the embedded data, plots."""
from __future__ import annotations

import itertools
import json
import os
import warnings

import numpy as np
import pytest

from gradharmony.vatt.config import DataConfig
from gradharmony.vatt.data import DataError, WordTokenizer
from gradharmony.vatt.evaluate import holdout_split, retrieval_metrics
from gradharmony.vatt.synthetic import COLOURS, SIZES, SPEEDS, DigitsAVT

from .conftest import read_metrics, tiny_config


def _seed() -> int:
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed={seed}")
    return seed


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- ties

def test_identical_gallery_items_share_rank_one_in_expectation() -> None:
    # the input where "rank = 1 + ties / 2" gave R@1 = 0: every positive has one identical twin
    q = np.eye(4)
    g = _unit(np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=float))
    m = retrieval_metrics(q, g, np.array([0, 0, 1, 1]))
    assert m["R@1"] == pytest.approx(0.5) and m["R@5"] == 1.0 and m["median_rank"] == pytest.approx(1.5)
    assert m["class_R@1"] == 1.0


def _oracle(sim: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    """Expected R@k over every tie-breaking order: all N! gallery orders, stable sort by similarity."""
    n = sim.shape[0]
    hits = {k: 0.0 for k in ks}
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        for i in range(n):
            order = sorted(perm, key=lambda j: -sim[i, j])  # stable: ties in the permutation's order
            rank = order.index(i) + 1
            for k in ks:
                hits[k] += rank <= k
    return {k: v / (len(perms) * n) for k, v in hits.items()}


@pytest.mark.parametrize("trial", range(3))
def test_tied_ranks_match_the_random_tie_breaking_oracle(trial: int) -> None:
    rng = np.random.default_rng(_seed())
    n = 6
    # few distinct gallery rows (heavy ties), float32-encoded in two "batches" (rounding noise < 1e-6)
    proto = _unit(rng.normal(size=(3, 8)))
    g = proto[rng.integers(3, size=n)]
    g32 = g.astype(np.float32) + rng.normal(0, 1e-8, size=g.shape).astype(np.float32)
    q = _unit(g + rng.normal(0, 0.5, size=g.shape))
    m = retrieval_metrics(q, g32, ks=(1, 2, 3))
    want = _oracle(q @ g.T, (1, 2, 3))
    for k in (1, 2, 3):
        assert m[f"R@{k}"] == pytest.approx(want[k], abs=1e-12), (k, m, want)


def test_chance_levels_and_a_class_perfect_ranking_hits_within_class_chance() -> None:
    rng = np.random.default_rng(_seed())
    labels = rng.integers(4, size=40)
    labels[:4] = [0, 1, 2, 3]
    counts = np.bincount(labels)
    onehot = np.eye(4)[labels]
    # gallery items of one class are identical: perfect at class level, random within the class
    m = retrieval_metrics(onehot, onehot, labels, prefix="eval/v2a_", ks=(1, 5, 10))
    n = len(labels)
    for k in (1, 5, 10):
        want = float(np.mean(np.minimum(1.0, k / counts[labels])))
        assert m[f"eval/chance_within_class/v2a_R@{k}"] == pytest.approx(want)
        assert m[f"eval/v2a_R@{k}"] == pytest.approx(want)
        assert m[f"eval/chance/v2a_R@{k}"] == pytest.approx(k / n)
    assert m["eval/v2a_class_R@1"] == 1.0
    assert m["eval/chance/v2a_class_R@1"] == pytest.approx(float(np.sum(counts ** 2)) / n ** 2)
    assert m["eval/chance/v2a_median_rank"] == (n + 1) / 2
    # one gallery item repeated: every ranking equally likely -> R@k is exactly its chance level
    same = retrieval_metrics(onehot, np.ones((n, 4)) / 2.0, labels, ks=(1, 5))
    assert same["R@1"] == pytest.approx(1 / n) and same["R@5"] == pytest.approx(5 / n)
    assert same["class_R@1"] == pytest.approx(same["chance/class_R@1"])


# ---------------------------------------------------------------- held-out split

class _Clips:
    def __init__(self, n: int):
        self.n, self.tokenizer = n, WordTokenizer.build(["a"])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "source": i}


@pytest.mark.parametrize("n,eval_size,batch,held", [(100, 512, 8, 20), (100, 10, 8, 10), (9, 16, 4, 4), (10, 16, 8, 2)])
def test_holdout_split_is_disjoint_and_keeps_a_batch(n: int, eval_size: int, batch: int, held: int) -> None:
    train, ev = holdout_split(_Clips(n), eval_size, batch)
    tr_src = {train[i]["source"] for i in range(len(train))}
    ev_src = {ev[i]["source"] for i in range(len(ev))}
    assert len(ev) == held and len(train) == n - held and not tr_src & ev_src and len(train) >= batch


def test_holdout_split_too_few_clips_names_the_way_out() -> None:
    with pytest.raises(DataError, match="--eval-data"):
        holdout_split(_Clips(9), 16, 8)


def test_manifest_without_eval_data_is_evaluated_on_held_out_clips(tmp_path) -> None:
    from gradharmony.vatt.trainer import build_datasets

    from .test_data import make_clips, write_jsonl

    manifest = write_jsonl(str(tmp_path / "data"), make_clips(str(tmp_path / "data"), n=12))
    cfg = tiny_config(tmp_path / "run", data__manifest=manifest, train__batch_size=4)
    assert cfg.data.eval_split == "holdout" and cfg.to_dict()["data"]["eval_split"] == "holdout"
    train, ev, probe = build_datasets(cfg)
    assert len(train) == 8 and len(ev) + len(probe) == 4
    seen = {json.dumps(train[i]["text"].tolist()) + str(train[i]["audio"][:4]) for i in range(len(train))}
    for part in (ev, probe):
        for i in range(len(part)):
            assert json.dumps(part[i]["text"].tolist()) + str(part[i]["audio"][:4]) not in seen
    cfg = tiny_config(tmp_path / "run", data__manifest=manifest, train__batch_size=4, data__eval_split="train")
    train, ev, probe = build_datasets(cfg)
    assert len(train) == 12  # the old behaviour on request: evaluated on training clips


# ---------------------------------------------------------------- instance attributes

ACFG = DataConfig(frames=4, size=32, audio_samples=512, num_narrations=2, max_text_len=12, train_size=96,
                  eval_size=16, misaligned_fraction=0.5)


def _heard(audio: np.ndarray, cfg: DataConfig) -> tuple[int, int]:
    """(colour, size) from the spectrum: the strongest odd harmonic 13 + 2 j of sr / 64 (colour j), and
    harmonic 1 (big) against 29 (small)."""
    spec = np.abs(np.fft.rfft(audio))
    per = cfg.audio_samples // 64  # FFT bins per harmonic of sr / 64
    colour = int(np.argmax([spec[(13 + 2 * j) * per] for j in range(len(COLOURS))]))
    return colour, int(spec[1 * per] > spec[29 * per])


def _words(ds: DigitsAVT, clip: dict) -> set[str]:
    return {ds.tokenizer.vocab[t] for t in clip["text"][0] if t}


def test_instance_attributes_are_shared_by_the_modalities_unless_misaligned() -> None:
    ds = DigitsAVT(ACFG, "train", seed=_seed() % 1000)
    audio_mismatch = text_mismatch = n_audio = n_text = 0
    for i in range(len(ds)):
        clip = ds[i]
        colour, size, speed = clip["attributes"]
        heard = _heard(clip["audio"], ACFG)
        said = _words(ds, clip)
        named = (COLOURS[colour] in said, SIZES[size] in said, SPEEDS[speed] in said)
        if clip["noise_kind"] == 1:  # audio from another clip: its colour tone is another draw
            n_audio += 1
            audio_mismatch += heard != (colour, size)
        else:
            assert heard == (colour, size), (i, heard, colour, size)
        if clip["noise_kind"] == 2:  # narration from another clip
            n_text += 1
            text_mismatch += not all(named)
        else:
            assert all(named), (i, said, clip["attributes"])
    assert n_audio > 10 and n_text > 10
    assert audio_mismatch / n_audio > 0.5 and text_mismatch / n_text > 0.5


def test_video_shows_the_colour_and_the_size() -> None:
    from gradharmony.vatt.synthetic import PALETTE

    ds = DigitsAVT(ACFG, "eval", seed=1)
    for i in range(24):
        clip = ds._render(i)
        colour, size, _ = clip["attributes"]
        frame = clip["video"][:, 0].astype(float) / 255.0  # (C, S, S)
        bright = frame.sum(0)
        top = frame[:, bright >= np.quantile(bright, 0.985)].mean(1)  # the digit's brightest pixels
        assert int(np.argmin(((PALETTE - top) ** 2).sum(1))) == colour, (i, top, colour)
        digit = (np.abs(frame - np.median(frame, axis=(1, 2), keepdims=True)).max(0) > 0.35).sum()
        assert (digit > 60) == bool(size), (i, digit, size)  # S/2 = 16 px side vs S/4 = 8 px


# ---------------------------------------------------------------- plots

def _check_figures(monkeypatch) -> list[str]:
    """Record, per saved figure, what is wrong with its axes (unlabelled, retrieval without chance line)."""
    from matplotlib.figure import Figure

    problems: list[str] = []
    orig = Figure.savefig

    def savefig(self, fname, *a, **kw):
        name = os.path.basename(str(fname))
        for ax in self.axes:
            if ax.get_label() == "<colorbar>":
                if not ax.get_ylabel():
                    problems.append(f"{name}: colour bar without a label")
                continue
            if not ax.get_xlabel() or not ax.get_ylabel():
                problems.append(f"{name}: axes {ax.get_title()!r} without axis labels")
            if name == "retrieval.png" and ax.has_data():
                if not any(ln.get_label().startswith("chance") for ln in ax.get_lines()):
                    problems.append(f"{name}: {ax.get_title()!r} without a chance line")
        if name == "conflict_hist.png" and not any(ax.get_label() == "<colorbar>" for ax in self.axes):
            problems.append(f"{name}: no colour bar")
        return orig(self, fname, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return problems


def test_one_step_run_plots_without_warnings_and_every_axis_labelled(tmp_path, monkeypatch) -> None:
    from gradharmony.vatt.trainer import Trainer

    problems = _check_figures(monkeypatch)
    cfg = tiny_config(tmp_path, train__steps=1, train__eval_every=1, train__plots=True,
                      harmony__curriculum="threshold")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = Trainer(cfg).fit()
    names = sorted(os.path.basename(p) for p in summary["plots"])
    assert names == ["conflict_hist.png", "cosine_by_alignment.png", "kept_fraction.png", "losses.png",
                     "retrieval.png"]
    assert not problems, problems
    recs = read_metrics(str(tmp_path))
    assert [r["step"] for r in recs if "eval/v2t_R@1" in r] == [0, 1]
    assert any("train/conflict/threshold" in r for r in recs)


def test_single_record_files_plot_without_warnings(tmp_path, monkeypatch) -> None:
    from gradharmony.vatt.plots import make_plots

    problems = _check_figures(monkeypatch)
    for i, rec in enumerate(({"step": 1, "train/loss": 1.0, "train/score_hist": [1] * 20},
                             {"step": 0, "eval/v2t_R@1": 0.1, "eval/chance/v2t_R@1": 0.01},
                             {"step": 3, "train/loss": 2.0})):
        path = tmp_path / f"m{i}.jsonl"
        path.write_text(json.dumps(rec) + "\n")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert make_plots(str(path), str(tmp_path / f"p{i}"))
    assert not problems, problems


def test_split_histograms_and_step_0_eval_survive_a_resume_mid_interval(tmp_path) -> None:
    from gradharmony.vatt.trainer import Trainer

    kw = dict(train__steps=4, train__log_every=3, train__eval_every=2, data__misaligned_fraction=0.5)
    Trainer(tiny_config(tmp_path / "a", **kw)).fit()
    Trainer(tiny_config(tmp_path / "b", train__stop_after=2, **kw)).fit()  # stops inside the first interval
    Trainer(tiny_config(tmp_path / "b", train__resume="latest", **kw)).fit()
    keys = ("train/score_hist_aligned", "train/score_hist_misaligned", "train/score_hist")
    runs = [[(r["step"], [r.get(k) for k in keys]) for r in read_metrics(str(tmp_path / x)) if "train/loss" in r]
            for x in ("a", "b")]
    assert runs[0] == runs[1] and [s for s, _ in runs[0]] == [3, 4]
    assert sum(runs[0][0][1][2]) == 3 * 8  # three steps of batch 8 in the first interval
    evals = [r["step"] for r in read_metrics(str(tmp_path / "b")) if "eval/v2t_R@1" in r]
    assert evals == [0, 2, 4]
