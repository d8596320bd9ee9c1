"""Top-entropy tokens: train only on the highest-entropy ("forking") tokens (Wang et al., "Beyond the
80/20 Rule", arXiv 2506.01939).

With H_{i,t} the per-token entropy of the current policy and ρ the fraction of tokens kept,

    τ      = quantile_{1−ρ}({H_{i,t} : m_{i,t} = 1})     (linear interpolation, over the call's valid tokens)
    keep_t = m_{i,t} · 1[H_{i,t} ≥ τ]                     (ties at τ are kept)

and the policy loss of the other tokens is multiplied by 0 (the normalisers are unchanged, so the
kept tokens' gradients keep their scale). The paper keeps the top 20% (ρ = 0.2).

This is TRL 1.16's rule (``GRPOConfig.top_entropy_quantile = ρ``, ``GRPOTrainer.get_high_entropy_mask``):
the threshold is ``torch.quantile`` of the valid entropies at q = 1 − ρ, over the whole micro-batch
(not per sequence), and a token is kept iff H ≥ τ. Here the threshold is computed without a host
synchronisation (a sort of the call's entropies with the padding sent to +inf, and the same
rank q·(n − 1) and ``lerp`` as ``torch.quantile``, which also lifts its 16M-element limit); with
float32 entropies the mask is TRL's bit for bit (tests/test_filters.py). TRL computes τ in float32;
float64 entropies keep float64 here. TRL gathers the entropies of all processes; this filter sees
one call's batch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..filters import TokenFilter
from ..numerics import Padding, compute_dtype

__all__ = ["TopEntropyFilter"]


class TopEntropyFilter(TokenFilter):
    """Keep the tokens whose entropy is in the top ``quantile`` fraction of the batch's valid tokens.

    ``quantile`` = ρ ∈ [0, 1] (default 0.2, the paper's); ρ = 1 keeps every token, ρ = 0 only the
    maximum-entropy token(s). Reads ``entropy`` [N, T] (float; renamable through ``in_keys``).
    Metric: ``filtered_top_entropy``.
    """

    uses_batch_statistics = (
        True  # the entropy quantile is over the batch's tokens: micro-batches give a different loss
    )

    inputs = ("entropy",)

    def __init__(self, quantile: float = 0.2, **keys: Any) -> None:
        super().__init__(**keys)
        if isinstance(quantile, bool) or not isinstance(quantile, int | float) or not 0.0 <= quantile <= 1.0:
            raise ValueError(
                f"TopEntropyFilter: 'quantile' (ρ, the fraction of tokens kept) must be a number in [0, 1], "
                f"got {quantile!r}"
            )
        self.quantile = float(quantile)

    def keep(self, padding: Padding, entropy: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mask = padding.mask
        if (
            not isinstance(entropy, torch.Tensor)
            or not entropy.is_floating_point()
            or entropy.shape != mask.shape
        ):
            got = (
                f"{entropy.dtype} {list(entropy.shape)}"
                if isinstance(entropy, torch.Tensor)
                else type(entropy).__name__
            )
            raise ValueError(
                f"TopEntropyFilter: 'entropy' must be a float tensor [N, T] = {list(mask.shape)}, got {got} "
                "(the shape follows 'response_mask')"
            )
        dtype = compute_dtype(entropy)
        h = entropy.detach().to(dtype)
        # Padding → +inf sorts after every valid entropy: the first n sorted values are the valid ones.
        ordered = torch.where(mask, h, torch.inf).flatten().sort().values
        if ordered.numel() == 0:
            return mask.clone()
        n = padding.lengths.sum()
        rank = torch.tensor(1.0 - self.quantile, dtype=dtype, device=h.device) * (n - 1)
        below = rank.to(torch.int64).clamp(min=0)
        above = rank.ceil().to(torch.int64).clamp(min=0)
        threshold = torch.lerp(ordered[below], ordered[above], rank - rank.trunc())
        return (h >= threshold) & mask
