"""Fixtures of the ghost-Gram tests: a fresh seed per run, printed (``GH_TEST_SEED`` reruns it)."""

from __future__ import annotations

import os
import random

import pytest
import torch


@pytest.fixture
def seed(request) -> int:
    env = os.environ.get("GH_TEST_SEED")
    s = int(env) if env else random.SystemRandom().randrange(2**31)
    print(f"\n[gradharmony] {request.node.nodeid}: seed={s} (rerun with GH_TEST_SEED={s})")
    torch.manual_seed(s)
    return s


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
