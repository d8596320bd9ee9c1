"""Configuration of the main suite. The hypothesis profiles are in the repository's root
``conftest.py``, shared with verl's suite."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run under its interpreter. It must be set before any kernel module
# is imported, which the fused tests do lazily.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test tensors are small: one thread is fastest, and it avoids OpenMP threads spinning against the
# vLLM engine's processes and the spawned distributed workers on a 2-core machine.
torch.set_num_threads(1)
