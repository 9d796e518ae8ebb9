"""Smoke tests of bench/bench_harmonize.py: it runs, checks every candidate, measures memory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_harmonize.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_harmonize", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_memory_cpu_counts_reused_memory():
    bh = _load()
    G = torch.randn(64, 2, 4096)
    for _ in range(3):  # warm: malloc now reuses resident pages, which VmHWM would not see
        bh.reference.fused(G, 1)
    with bh.PeakMemory(torch.device("cpu")) as pm:
        bh.reference.fused(G, 1)
    out_mb = 64 * 4096 * 4 / 2**20
    assert pm.peak_mb is not None and pm.peak_mb >= out_mb


def test_bench_harmonize_tiny(tmp_path, monkeypatch):
    bh = _load()
    monkeypatch.setenv("GH_COMMIT", "abc1234")
    rc = bh.main(["--device", "cpu", "--sizes", "8x2x64,4x3x32", "--reps", "5", "--no-compile",
                  "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    d = json.loads((tmp_path / "harmonize_t.json").read_text())
    assert d["meta"]["commit"] == "abc1234" and d["meta"]["torch"] == torch.__version__
    rows = [r for r in d["rows"] if "error" not in r]
    impls = {r["impl"] for r in rows}
    assert {"reference", "loop", "gh[torch]"} <= impls
    for r in rows:
        assert r["correct"] is True or (r["impl"] == "torchjd" and r["K"] > 2 and r["correct"] is None)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["max_cos_err"] < 1e-4
    assert (tmp_path / "harmonize_t.md").exists()
