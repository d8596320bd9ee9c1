"""Routing metrics: how much of the expert routing a policy update changed.

For tokens s in the routing mask M and MoE layers l = 1..L, with E_{s,l} the recorded top-k expert
set and Ê_{s,l} the set the router picks in the current (π_θ) forward:

    routing_volatility = Σ_{s∈M} Σ_l 1[Ê_{s,l} ≠ E_{s,l}] / (|M| · L)
    tokens_rerouted    = Σ_{s∈M} 1[∃ l: Ê_{s,l} ≠ E_{s,l}] / |M|

Sets, not sequences: the order of the K experts does not count. Both come from the router's own
top-k in the π_θ forward (:class:`~gspo_components.moe.RoutingReplay` reports it as ``rerouted``
whether or not it replays), so they cost no extra forward. GSPO (arXiv 2507.18071, §4.3) reports
about 10 % of activated experts changing after one update in a 48-layer MoE.
"""

from __future__ import annotations

import torch

__all__ = ["rerouted_pairs", "routing_metrics"]


def rerouted_pairs(recorded: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """[..., L] bool: the top-k expert set of ``current`` [..., L, K] differs from ``recorded``'s."""
    if recorded.shape != current.shape:
        raise ValueError(
            f"rerouted_pairs: 'recorded' {list(recorded.shape)} and 'current' {list(current.shape)} must "
            "have the same shape [..., L, K]"
        )
    return (recorded.long().sort(-1).values != current.long().sort(-1).values).any(-1)


def routing_metrics(rerouted: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"routing_volatility", "tokens_rerouted"}`` (float32 scalars) from ``rerouted`` [N, S, L]
    bool over the tokens where ``mask`` [N, S] is true; NaN when the mask is empty."""
    if rerouted.dim() != 3 or mask.shape != rerouted.shape[:2]:
        raise ValueError(
            f"routing_metrics: 'rerouted' must be [N, S, L] and 'mask' [N, S] like it, got "
            f"{list(rerouted.shape)} and {list(mask.shape)}"
        )
    mask = mask.bool()
    tokens = mask.sum().float()
    layers = rerouted.shape[-1]
    pairs = (rerouted & mask.unsqueeze(-1)).sum().float()
    tokens_changed = (rerouted.any(-1) & mask).sum().float()
    return {
        "routing_volatility": pairs / (tokens * layers),
        "tokens_rerouted": tokens_changed / tokens,
    }
