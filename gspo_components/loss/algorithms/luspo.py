"""LUSPO: Length-Unbiased Sequence Policy Optimization (arXiv 2602.05261), as TRL 1.16 implements
it (``GRPOConfig(loss_type="luspo", importance_sampling_level="sequence")``).

GSPO's per-response clipped loss, scaled by the response's length before the mean over responses:

    s_i    = exp((1/L_i) Σ_t (ℓ_{i,t} − ℓ^old_{i,t}))
    L_i^G  = −min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i)
    loss   = (1/G) Σ_i L_i · L_i^G                      (TRL: (per_token_loss · mask).sum(-1).mean())

so a long response is not down-weighted by GSPO's 1/G mean against a short one. This is GSPO's
sequence ratio and clip composed with the ``seq-mean-token-sum`` aggregation; no new part is
needed. ε defaults to GSPO's 3e-4 / 4e-4 (TRL takes its ``epsilon`` / ``epsilon_high``).
"""

from __future__ import annotations

from typing import Any

from tensordict.nn import TensorDictModuleBase

from ..advantages import GroupNormalizedAdvantage
from ..clipping import PPOClip
from ..importance import SequenceLogRatio
from ..recipes import Recipe, compose

__all__ = ["luspo"]


def luspo(
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    advantage_eps: float = 1e-6,
    aggregation: str = "seq-mean-token-sum",
    advantage: TensorDictModuleBase | None = None,
    name: str = "luspo",
    **shared: Any,
) -> Recipe:
    """LUSPO (arXiv 2602.05261; TRL ``loss_type="luspo"``): GSPO's clipped sequence-ratio loss
    times the response length, mean over responses (``seq-mean-token-sum``)."""
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        SequenceLogRatio(),
        PPOClip(eps_low, eps_high),
        aggregation=aggregation,
        **shared,
    )
