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

from ...loss._checks import check_mask, check_positive_int
from .base import RewardFn

__all__ = ["OverlongPenalty", "overlong_penalty"]


def _check_lengths(where: str, max_length: object, cache_length: object) -> tuple[int, int]:
    """Integers (an integral float such as 8.0 too) with 1 <= cache_length <= max_length."""
    max_length = check_positive_int(where, "max_length", max_length)
    cache_length = check_positive_int(where, "cache_length", cache_length)
    if cache_length > max_length:
        raise ValueError(f"{where}: cache_length must be <= max_length = {max_length}, got {cache_length}")
    return max_length, cache_length


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """R(|y|) of DAPO eq. 13 for integer lengths [N]; float32."""
    max_length, cache_length = _check_lengths("overlong_penalty", max_length, cache_length)
    if (
        not isinstance(lengths, torch.Tensor)
        or lengths.dim() != 1
        or lengths.dtype.is_floating_point
        or lengths.is_complex()
        or lengths.dtype == torch.bool
    ):
        got = (
            f"{lengths.dtype} {list(lengths.shape)}"
            if isinstance(lengths, torch.Tensor)
            else type(lengths).__name__
        )
        raise ValueError(f"overlong_penalty: 'lengths' must be an integer tensor of shape [N], got {got}")
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
        self.max_length, self.cache_length = _check_lengths("OverlongPenalty", max_length, cache_length)

    def score_batch(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        mask = check_mask("OverlongPenalty", "response_mask", self._read(tensordict, "response_mask"))
        rewards = overlong_penalty(mask.sum(-1), self.max_length, self.cache_length)
        return rewards, torch.ones_like(rewards, dtype=torch.bool)
