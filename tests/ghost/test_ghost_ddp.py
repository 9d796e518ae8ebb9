"""Two Gloo processes equal one process on the global batch (per-sample Grams per local sample,
curriculum on the global batch, combined gradients averaged over ranks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_gloo_ranks_match_one_process(tmp_path, seed) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = str(HERE / "_ddp_worker.py")
    single = tmp_path / "single.pt"
    subprocess.run([sys.executable, worker, "single", str(single), str(seed)], env=env, check=True, timeout=120)
    ddp = tmp_path / "ddp.pt"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, worker, "ddp", str(ddp), str(seed)],
                              env=dict(env, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1].decode()[-2000:] for o in outs)
    a, b = torch.load(single), torch.load(ddp)
    torch.testing.assert_close(b["sample_weights"], a["sample_weights"])
    assert set(a["grads"]) == set(b["grads"])
    num = sum(float((b["grads"][n] - a["grads"][n]).detach().norm() ** 2) for n in a["grads"]) ** 0.5
    den = sum(float(a["grads"][n].norm() ** 2) for n in a["grads"]) ** 0.5
    assert num <= 1e-9 * den, f"seed {seed}: relative difference {num / den:.3g}"
