"""Settings of the core test suite (CPU; the reference engine unless a test takes the
``backend`` fixture of tests/conftest.py).

Every test that draws random numbers takes the ``seed`` fixture (tests/conftest.py): a fresh
seed per run (``random.SystemRandom``), printed so that pytest shows it with a failure, and
reproducible with ``GH_TEST_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import os
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

# the ``seed`` and ``gen`` fixtures live in tests/conftest.py (shared with the kernel suites)
