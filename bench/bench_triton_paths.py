"""Kernel-level benchmark of the Triton launchers: every method, reduction and path
(one-launch "small" vs two-pass "large") at the DESIGN.md sizes, next to the reference
and the device copy of G (= two reads). For tuning block sizes; the user-level
comparison is bench_harmonize.py.

    python bench/bench_triton_paths.py [--full]     # needs a CUDA GPU
"""

import os
import sys

import torch
import triton

from gradharmony.engine import reference
from gradharmony.kernels.triton_harmonize import fused_forward

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_commit, percentiles, time_fn  # noqa: E402


def _bench_ms(fn, reps: int = 30, inner: int = 10) -> tuple[float, float, float]:
    """(median, p20, p80) ms per call of ``fn``: ``inner`` back-to-back calls per sample."""
    return percentiles(time_fn(fn, torch.device("cuda"), reps, inner=inner, budget_s=60.0))


def _benchmark(full: bool = False) -> None:
    """Median / p20 / p80 per call at the DESIGN.md sizes, next to the reference and the
    copy-bandwidth floor (one read of G = half a device copy of G)."""
    commit = git_commit()
    dev = torch.cuda.get_device_name()
    print(f"# {dev} torch {torch.__version__} triton {triton.__version__} commit {commit}")
    print("size, dtype, method, reduction, path, median_ms, p20_ms, p80_ms, ref_ms, x_2reads, max_rel_err")
    sizes = [(256, 2, 1024), (256, 3, 1024), (1024, 2, 4096), (64, 2, 1 << 20), (256, 2, 1 << 20), (256, 3, 1 << 20)]
    dtypes = (torch.float32, torch.bfloat16) if full else (torch.float32,)
    methods = (0, 1, 2) if full else (1,)
    for B, K, D in sizes:
        for dtype in dtypes:
            G = torch.randn(B, K, D, device="cuda", dtype=dtype)
            order = torch.stack([torch.randperm(K) for _ in range(B * K)]).view(B, K, K).cuda()
            target = torch.full((K, K), 0.2, device="cuda")
            copy_ms = _bench_ms(lambda: G.clone(), reps=10)[0]  # read + write = 2 reads
            for method in methods:
                tgt = target if method == 2 else None
                for reduction in ("none", "sum"):
                    ref_ms = _bench_ms(lambda: reference.fused(G, method, order, tgt, reduction), reps=5, inner=2)[0]
                    ref = reference.fused(G, method, order, tgt, reduction)
                    paths = ["auto"] + (["small", "large"] if full and K * D * G.element_size() <= 1 << 16 else [])
                    for path in paths:
                        # checked against the reference before timing: out (relative) and cosines
                        o = fused_forward(G, method, order, tgt, reduction, path)
                        err = max(float((o[0].float() - ref[0].float()).abs().max()
                                        / ref[0].float().abs().max().clamp_min(1e-30)),
                                  float((o[2].float() - ref[2].float()).abs().max()))
                        med, p20, p80 = _bench_ms(lambda: fused_forward(G, method, order, tgt, reduction, path))
                        print(
                            f"{B}x{K}x{D}, {str(dtype)[6:]}, {method}, {reduction}, {path}, "
                            f"{med:.4f}, {p20:.4f}, {p80:.4f}, {ref_ms:.4f}, {med / copy_ms:.2f}, {err:.1e}",
                            flush=True,
                        )
            del G


if __name__ == "__main__":
    _benchmark(full="--full" in sys.argv)
