"""Hypothesis profiles for both test suites (``tests/`` and verl's ``tests_verl/``).

``ci`` (the default; ``make test`` sets ``HYPOTHESIS_PROFILE=ci``): ``derandomize=True`` so that
every run draws the same examples, 200 examples per test, and a failing example printed with its
reproduction blob. ``dev``: random draws, 50 examples, for quick local runs.
"""

from __future__ import annotations

import os

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
