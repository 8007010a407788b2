"""Shared pytest configuration: a bounded hypothesis profile and a seeded torch generator."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests stay fast on two CPU cores; KBIT_HYPOTHESIS_PROFILE=thorough digs deeper.
settings.register_profile(
    "kbit", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("KBIT_HYPOTHESIS_PROFILE", "kbit"))


@pytest.fixture
def gen() -> torch.Generator:
    """A torch CPU generator with a fixed seed, so random test tensors are reproducible."""
    return torch.Generator().manual_seed(1234)
