"""Fixtures shared by every test module.

- ``backend``: each engine backend, ``torch`` (the reference), ``cpp``, ``cuda`` and ``triton``
  (on a CUDA GPU, else on CPU tensors under the Triton interpreter, ``TRITON_INTERPRET=1``, set
  here before triton is imported); a backend that cannot run here skips with the reason.
  ``backend.skip_unless(G)`` skips a case the backend does not take (dtype, K).
- ``seed`` / ``gen``: a fresh seed per test (printed; replay with ``GH_TEST_SEED=<seed>``) and a
  generator seeded with it. Seed, input and tolerance helpers: ``tests/_helpers.py``.
- ``@pytest.mark.background(name)``: the test's tool run (nvcc, Triton's compiler, a JIT build)
  starts when collection ends and runs on a second core meanwhile (``tests/_background.py``).
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/_helpers.py


import _background  # noqa: E402
from _helpers import BACKENDS, BackendCase, backend_case  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "background(name): the test waits for the tool run `name` of "
                                       "tests/_background.py, started when collection ends")


def pytest_collection_finish(session):
    _background.start(m.args[0] for item in session.items for m in item.iter_markers("background"))


def pytest_sessionfinish(session, exitstatus):
    _background.close()


@pytest.fixture(params=BACKENDS)
def backend(request) -> BackendCase:
    return backend_case(request.param)


@pytest.fixture
def seed(request) -> int:
    env = os.environ.get("GH_TEST_SEED")
    s = int(env) if env else random.SystemRandom().randrange(2**31)
    print(f"\n[gradharmony] {request.node.nodeid}: seed={s} (rerun with GH_TEST_SEED={s})")
    torch.manual_seed(s)
    return s


@pytest.fixture
def gen(seed) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g
