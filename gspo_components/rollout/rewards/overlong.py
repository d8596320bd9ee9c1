"""OverlongPenalty: DAPO's soft overlong punishment (Yu et al., arXiv 2503.14476, eq. 13).

With L_max the generation budget and L_cache the soft band,

    R(y) = 0                                   if |y| ≤ L_max − L_cache
           ((L_max − L_cache) − |y|) / L_cache  if L_max − L_cache < |y| ≤ L_max
           −1                                   if |y| > L_max

|y| is the number of valid response tokens (``response_mask``). Vectorised; it cannot fail.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from ...loss._checks import check_mask, check_range
from .base import RewardFn

__all__ = ["OverlongPenalty", "overlong_penalty"]


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """R(|y|) of DAPO eq. 13 for integer lengths [N]; float32."""
    lengths = lengths.to(torch.float32)
    soft_start = float(max_length - cache_length)
    ramp = (soft_start - lengths) / float(cache_length)
    return torch.where(
        lengths <= soft_start,
        torch.zeros_like(lengths),
        torch.where(lengths <= max_length, ramp, torch.full_like(lengths, -1.0)),
    )


class OverlongPenalty(RewardFn):
    fields = ("response_mask",)

    def __init__(self, max_length: int, cache_length: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.max_length = int(check_range("OverlongPenalty", "max_length", max_length, 1, None))
        self.cache_length = int(
            check_range("OverlongPenalty", "cache_length", cache_length, 1, max_length, high_inclusive=True)
        )

    def score_batch(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        mask = check_mask("OverlongPenalty", "response_mask", self._read(tensordict, "response_mask"))
        rewards = overlong_penalty(mask.sum(-1), self.max_length, self.cache_length)
        return rewards, torch.ones_like(rewards, dtype=torch.bool)
