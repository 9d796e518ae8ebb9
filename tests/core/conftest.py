"""Shared fixtures of the core test suite (CPU, reference engine ``backend="torch"``).

Every test that draws random numbers takes the ``seed`` fixture: a fresh seed per run
(``random.SystemRandom``), printed so that pytest shows it with a failure, and
reproducible with ``GH_TEST_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules _asserts, _oracles

settings.register_profile(
    "gh_core",
    max_examples=int(os.environ.get("GH_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("gh_core")

torch.set_num_threads(min(2, torch.get_num_threads()))


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
