"""RECIPES: every stock recipe, by name, in one place.

The adapters (torchrl, TRL, verl), the tests' parametrisations and the docs' recipe table read
this mapping; nothing else lists recipes. A new stock recipe is one line here. Each value is a
factory ``(**options) -> Recipe`` whose ``name`` defaults to its key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from .algorithms.aspo import aspo
from .algorithms.ce_gppo import ce_gppo
from .algorithms.cov import clip_cov, kl_cov
from .algorithms.dppo import dppo
from .algorithms.gmpo import gmpo
from .algorithms.gtpo import gtpo
from .algorithms.luspo import luspo
from .algorithms.m2po import m2po
from .algorithms.vespo import vespo
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
        "dppo": dppo,
        "m2po": m2po,
        "clip_cov": clip_cov,
        "kl_cov": kl_cov,
        "vespo": vespo,
        "luspo": luspo,
        "gtpo": gtpo,
        "aspo": aspo,
        "ce_gppo": ce_gppo,
    }
)
