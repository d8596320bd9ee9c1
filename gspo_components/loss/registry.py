"""RECIPES: every stock recipe, by name, in one place.

The adapters (torchrl, TRL, verl), the tests' parametrisations and the docs' recipe table read
this mapping; nothing else lists recipes. A new stock recipe is one line here. Each value is a
factory ``(**options) -> Recipe`` whose ``name`` defaults to its key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from .algorithms.gmpo import gmpo
from .recipes import Recipe, cispo, dapo, dr_grpo, grpo, gspo, gspo_token, sapo

__all__ = ["RECIPES"]

RECIPES: Mapping[str, Callable[..., Recipe]] = MappingProxyType(
    {
        "grpo": grpo,
        "gspo": gspo,
        "gspo_token": gspo_token,
        "dr_grpo": dr_grpo,
        "dapo": dapo,
        "cispo": cispo,
        "sapo": sapo,
        "gmpo": gmpo,
    }
)
