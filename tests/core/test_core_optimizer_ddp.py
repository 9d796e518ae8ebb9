"""``HarmonizedOptimizer`` under DDP: 2 Gloo processes equal one process on the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import _background
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch, torch.distributed as dist
    from torch import nn
    import gradharmony as gh

    torch.set_num_threads(1)
    F64 = torch.float64

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.a, self.b = nn.Linear(4, 6, dtype=F64), nn.Linear(6, 1, dtype=F64), nn.Linear(6, 1, dtype=F64)

        def forward(self, x, y):
            h = torch.tanh(self.trunk(x))
            return [(self.a(h).squeeze(1) - y[:, 0]) ** 2, (self.b(h).squeeze(1) * y[:, 1]).abs()]

    def model():
        torch.manual_seed(0)
        return Net()

    def train(rank, world, gran, ddp):
        g = torch.Generator().manual_seed(1)
        m = model()
        net = torch.nn.parallel.DistributedDataParallel(m) if ddp else m
        opt = gh.HarmonizedOptimizer(torch.optim.SGD(net.parameters(), lr=0.5), "pcgrad", granularity=gran)
        for _ in range(3):
            x, y = torch.randn(8, 4, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
            y[:, 1] -= 3 * x[:, 0]  # conflicting losses
            n = 8 // world
            x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
            ls = net(x, y)
            opt.zero_grad()
            opt.backward([l.mean() for l in ls] if gran == "batch" else ls)
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    if __name__ == "__main__":
        out = sys.argv[1]
        if len(sys.argv) > 2:  # one process on the global batch
            torch.save({gr: train(0, 1, gr, False) for gr in ("batch", "sample")}, out)
        else:
            dist.init_process_group("gloo")
            r = dist.get_rank()
            torch.save({gr: train(r, 2, gr, True) for gr in ("batch", "sample")}, f"{out}.{r}")
            dist.destroy_process_group()
    """
)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@_background.job("core_ddp", priority=5)
def _two_ranks(d):
    (d / "ddp_opt.py").write_text(SCRIPT)
    return _background.Spec([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(d / "ddp_opt.py"), str(d / "params")], timeout=180, env=_env())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.background("core_ddp")
def test_two_gloo_ranks_match_one_process(tmp_path):
    script = tmp_path / "ddp_opt.py"
    script.write_text(SCRIPT)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "params.single"), "single"], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    two, d = _background.result("core_ddp")  # the two ranks (torchrun)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    single = torch.load(tmp_path / "params.single")
    r0, r1 = torch.load(d / "params.0"), torch.load(d / "params.1")
    for gr in ("batch", "sample"):
        assert torch.equal(r0[gr], r1[gr]), f"{gr}: replicas diverged by {(r0[gr] - r1[gr]).abs().max()}"
        torch.testing.assert_close(r0[gr], single[gr], rtol=1e-10, atol=1e-10, msg=f"{gr}: 2 ranks vs one process")
