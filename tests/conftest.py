"""Shared pytest configuration.

Hypothesis profiles: the default profile is Hypothesis' own (100 examples per test, which
the property-based tests scale down to keep CI fast); ``thorough`` runs ten times as many
examples with no deadline, for long runs::

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_theory.py
    python -m pytest tests/test_theory.py --hypothesis-profile=thorough   # same
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is fastest (and robust on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
