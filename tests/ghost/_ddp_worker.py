"""One process of the DDP test: VATT tiny, per-sample ghost harmonization, gathered negatives.

``python _ddp_worker.py single|ddp OUT SEED``; with ``ddp`` the torch.distributed environment
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are set by the test. Rank 0 (or the
single process) saves the parameter gradients to OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import gradharmony as gh  # noqa: E402
from gradharmony.vatt.losses import gather_features, mil_nce_per_sample, nce_per_sample  # noqa: E402
from test_ghost_oracle import vatt_case  # noqa: E402

GLOBAL_B = 4


def main(mode: str, out: str, seed: int) -> None:
    torch.set_num_threads(1)
    rank, world = 0, 1
    if mode == "ddp":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    model, batch, _ = vatt_case(GLOBAL_B, seed, 0.0)
    per = GLOBAL_B // world
    batch = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    ph = gh.ParameterHarmonizer(model, "pcgrad", curriculum=gh.ConflictCurriculum("fraction", start=0.5))
    with ph.capture(batch_size=per):
        o = model(batch)
    tau = 0.07
    v_va, off = gather_features(o["z_v_va"])
    a_va, _ = gather_features(o["z_a_va"])
    v_vt, _ = gather_features(o["z_v_vt"])
    t_vt, _ = gather_features(o["z_t_vt"])
    m_all, _ = gather_features(batch["text_mask"])
    l_va = nce_per_sample(o["z_v_va"], o["z_a_va"], v_va, a_va, off, tau)
    l_vt = mil_nce_per_sample(o["z_v_vt"], o["z_t_vt"], batch["text_mask"], v_vt, t_vt, m_all, off, tau)
    ph.backward([0.5 * l_va.mean(), 0.5 * l_vt.mean()])
    kept = ph.last_stats.sample_weights
    if mode == "ddp":
        kept = torch.cat([t for t in _gather(kept)])
    if rank == 0:
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                    "sample_weights": kept}, out)
    if mode == "ddp":
        dist.destroy_process_group()


def _gather(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
