"""Shared test configuration.

Hypothesis runs under a deterministic profile in CI (``HYPOTHESIS_PROFILE=ci``, set by
``make test``): ``derandomize=True`` so that every run draws the same examples, enough examples
to mean something, and the failing example printed with its reproduction blob.
"""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run under its interpreter. It must be set before any kernel module
# is imported, which the fused tests do lazily.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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

# Test tensors are small: one thread is fastest, and it avoids OpenMP threads spinning against the
# vLLM engine's processes and the spawned distributed workers on a 2-core machine.
torch.set_num_threads(1)
