"""Process-group setup and small collectives for the trainer (DDP via ``torchrun``).

``torchrun --nproc_per_node=N -m gradharmony.vatt ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`init_distributed` then joins the group (NCCL on CUDA, Gloo on CPU). Conventions:

* ``train.batch_size`` is the *global* batch, split evenly over ranks;
* contrastive negatives are all-gathered with gradients (:func:`gather_features`);
* every rank draws its DropToken noise from ``seed + rank``; the model is initialised from ``seed``
  on every rank (and DDP broadcasts rank 0's weights anyway);
* the curriculum decides on the *global* batch: ``gh.ConflictCurriculum`` (``sync=True``)
  all-gathers the per-sample scores for the ``fraction`` quantile and all-reduces the weight sum
  for the normalisation, so a DDP step keeps the same clips as one process would;
* logged statistics (losses, conflict fraction, kept fraction) are averaged over ranks, the
  per-sample conflict scores are all-gathered with their clip indices for the AUROC;
* ``harmony.level="parameter"``: with the path decomposition (default) the model is not wrapped
  in DDP; ``gh.ParameterHarmonizer`` averages the combined gradients over ranks itself (the
  per-sample Grams are of local samples, with every rank's negatives). The term decomposition
  (``harmony.param_decomposition="term"``) is single-process only;
* ``init_process_group`` gets a timeout (``train.dist_timeout_s``, default 600 s): a rank that
  stops without dying makes the others fail after it instead of hanging;
* only rank 0 logs, evaluates, plots and writes checkpoints; ``--resume`` loads that checkpoint
  on every rank (rank 0's harmonizer state, e.g. the GradVac EMA, and RNG; other ranks re-seed),
  so a DDP resume continues the run but is not bit-for-bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 600.0

__all__ = ["DistContext", "init_distributed", "all_reduce_mean", "all_gather_tensor", "barrier", "cleanup"]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` -> ``cuda:local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


def init_distributed(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else single process.

    ``timeout_s`` (``train.dist_timeout_s``, default 600 s) bounds how long a collective waits
    for a rank that stopped (e.g. SIGSTOP, a hung data read): the others then fail with an error
    instead of hanging for ever. On NCCL the timeout is enforced with
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` (on by default in recent torch).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistContext(device=dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev)


def all_reduce_mean(x: Tensor, ctx: DistContext) -> Tensor:
    """Mean of ``x`` over ranks (identity in a single process)."""
    if not ctx.distributed:
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / ctx.world_size


def all_gather_tensor(x: Tensor, ctx: DistContext) -> Tensor:
    """Concatenate equal-shaped ``x`` (B, ...) of every rank along dim 0 (no gradient)."""
    if not ctx.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Wait for every rank, then leave the process group."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
