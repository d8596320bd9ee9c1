"""Configuration of the verl suite, run inside .venv-verl (see tests/test_verl_env.py).

The hypothesis profiles (``ci``, the default and deterministic, and ``dev``) come from the
repository's root ``conftest.py``, shared with the main suite.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
