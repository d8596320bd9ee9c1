"""Hypothesis strategies for the property tests (docs/algorithms.md, "Properties").

Batches follow the drawing rules there: masks with L_i ≥ 1, lengths 1..64, log-ratios from 0 to
±20, advantages of both signs, and padding filled with garbage (NaN, ±inf, huge values). The
structure (sizes, lengths, scales, garbage kind) is drawn by hypothesis; the bulk values come
from a torch generator seeded by a drawn integer, so examples are deterministic and shrinkable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 0.0, 123.0)


@dataclass
class PolicyBatch:
    """An [N, T] policy batch; ``log_ratio`` is the clean token log-ratio ℓ − ℓ^old (0 at pad)."""

    mask: torch.Tensor  # bool [N, T]
    lengths: torch.Tensor  # long [N]
    log_probs: torch.Tensor  # [N, T], garbage at padding
    old_log_probs: torch.Tensor  # [N, T], garbage at padding
    advantages: torch.Tensor  # [N]
    token_advantages: torch.Tensor  # [N, T], garbage at padding
    garbage: float

    @property
    def n(self) -> int:
        return self.mask.shape[0]


def _fill_padding(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask, x, torch.full_like(x, value))


@st.composite
def policy_batches(
    draw: st.DrawFn,
    *,
    dtype: torch.dtype = torch.float64,
    max_n: int = 8,
    max_len: int = 64,
    max_log_ratio: float = 20.0,
    per_sequence_shift: bool = False,
    all_length_one: bool = False,
) -> PolicyBatch:
    """Draw a batch. ``per_sequence_shift`` makes ℓ^old = ℓ − δ_i (a constant ratio per row);
    ``all_length_one`` makes every L_i = 1."""
    n = draw(st.integers(1, max_n))
    if all_length_one:
        lengths = [1] * n
    else:
        lengths = draw(st.lists(st.integers(1, max_len), min_size=n, max_size=n))
    width = max(lengths) + draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.0, 1e-4, 1e-2, 0.3, 1.0, 5.0, max_log_ratio]))
    garbage = draw(st.sampled_from(GARBAGE))
    gen = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(width).unsqueeze(0) < lengths_t.unsqueeze(1)
    log_probs = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 5.0
    if per_sequence_shift:
        delta = (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 - 1) * scale
        log_ratio = delta.expand(n, width)
    else:
        log_ratio = (torch.rand(n, width, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    log_ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio)
    old = log_probs - log_ratio
    adv_kind = draw(st.sampled_from(["normal", "positive", "negative", "with-zeros"]))
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    if adv_kind == "positive":
        adv = adv.abs() + 0.1
    elif adv_kind == "negative":
        adv = -adv.abs() - 0.1
    elif adv_kind == "with-zeros":
        adv = torch.where(torch.rand(n, generator=gen) < 0.4, torch.zeros_like(adv), adv)
    token_adv = torch.randn(n, width, generator=gen, dtype=torch.float64)
    return PolicyBatch(
        mask=mask,
        lengths=lengths_t,
        log_probs=_fill_padding(log_probs, mask, garbage).to(dtype),
        old_log_probs=_fill_padding(old, mask, garbage).to(dtype),
        advantages=adv.to(dtype),
        token_advantages=_fill_padding(token_adv, mask, garbage).to(dtype),
        garbage=garbage,
    )


@st.composite
def grouped_rewards(
    draw: st.DrawFn, *, max_groups: int = 6, max_group_size: int = 8, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [N], group_ids [N]): arbitrary integer ids in shuffled order, uneven group sizes,
    some zero-variance groups and some binary-reward groups."""
    num_groups = draw(st.integers(1, max_groups))
    ids = draw(st.lists(st.integers(-1000, 1000), min_size=num_groups, max_size=num_groups, unique=True))
    sizes = draw(st.lists(st.integers(1, max_group_size), min_size=num_groups, max_size=num_groups))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    rewards, group_ids = [], []
    for gid, size in zip(ids, sizes, strict=True):
        kind = draw(st.sampled_from(["normal", "binary", "constant"]))
        if kind == "normal":
            r = torch.randn(size, generator=gen, dtype=torch.float64) * 3 + 1
        elif kind == "binary":
            r = (torch.rand(size, generator=gen) < 0.5).to(torch.float64)
        else:
            r = torch.full((size,), draw(st.sampled_from([0.0, 1.0, 0.1, -2.5])), dtype=torch.float64)
        rewards.append(r)
        group_ids.append(torch.full((size,), gid, dtype=torch.long))
    rewards_t = torch.cat(rewards)
    ids_t = torch.cat(group_ids)
    perm = torch.randperm(rewards_t.shape[0], generator=gen)
    return rewards_t[perm].to(dtype), ids_t[perm]
