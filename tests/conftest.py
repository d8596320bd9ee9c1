"""Shared test configuration.

Hypothesis runs under a deterministic profile in CI (``HYPOTHESIS_PROFILE=ci``, set by
``make test``): ``derandomize=True`` so that every run draws the same examples, enough examples
to mean something, and the failing example printed with its reproduction blob.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, Verbosity, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=200,
    deadline=None,
    print_blob=True,
    verbosity=Verbosity.normal,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
