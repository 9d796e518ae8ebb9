"""Engine contracts callers rely on: autograd, threads, why a forced backend refuses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gradharmony as gh
from gradharmony.engine import backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIVE = [n for n, s in gh.available_backends().items() if s == "available" and n in ("torch", "cpp")]


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("method", ["sum", "pcgrad", "gradvac", "mgda"])
def test_harmonize_outputs_are_detached(backend, method, gen):
    G = torch.randn(4, 2, 6, generator=gen, requires_grad=True)
    r = gh.harmonize(G, method, backend=backend)
    for t in (r.grad, r.cos, r.weights, r.gram):
        assert not t.requires_grad and t.grad_fn is None
    torch.testing.assert_close(r.grad, gh.harmonize(G.detach(), gh.get_rule(method), backend=backend).grad)


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("method", ["sum", "pcgrad"])
def test_branch_create_graph_first_order_and_clear_second_order_error(backend, method, gen):
    h = torch.randn(5, 4, generator=gen, requires_grad=True)
    v = torch.randn(5, 4, generator=gen)

    def grad_of_h(create_graph):
        a, b = gh.Harmonizer(method, backend=backend).branch(h, 2)
        loss = (a ** 3).sum() + (b ** 2 * v).sum()
        return torch.autograd.grad(loss, h, create_graph=create_graph)[0]

    g1 = grad_of_h(False)
    g2 = grad_of_h(True)  # runs; the first-order result is the same
    torch.testing.assert_close(g2.detach(), g1)
    if method == "sum":
        ref = torch.autograd.grad((h ** 3).sum() + (h ** 2 * v).sum(), h)[0]
        torch.testing.assert_close(g1, ref)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g2.pow(2).sum().backward()


THREADS = textwrap.dedent(
    """
    import threading, warnings, torch
    import gradharmony as gh
    warnings.simplefilter("error")  # a fallback warning fails the run
    G = torch.randn(8, 2, 64)
    barrier, out = threading.Barrier(2), {}
    def work(i):
        barrier.wait()
        out[i] = gh.harmonize(G, "pcgrad").backend
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in ts]; [t.join() for t in ts]
    assert out == {0: "cpp", 1: "cpp"}, out
    assert gh.harmonize(G, "pcgrad", backend="cpp").backend == "cpp"
    print("ok")
    """
)


@pytest.mark.skipif("cpp" not in LIVE, reason="the cpp backend is not built here")
def test_first_call_from_two_threads_keeps_compiled_backend():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GRADHARMONY_BACKEND", None)
    for _ in range(3):  # a fresh process each time: the race is on the first load
        p = subprocess.run([sys.executable, "-c", THREADS], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


class _SmallK:
    name = "smallk"

    def supports(self, G):
        return G.dtype == torch.float32 and G.shape[1] <= backends.FUSED_MAX_K


def test_forced_backend_names_why(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "smallk", backends._Entry(loader=_SmallK))
    with pytest.raises(ValueError, match=r"K=9 losses, more than its limit of 8"):
        backends.select_backend("smallk", torch.zeros(2, 9, 3))
    with pytest.raises(ValueError, match=r"does not run on torch.float64"):
        backends.select_backend("smallk", torch.zeros(2, 3, 3, dtype=torch.float64))
