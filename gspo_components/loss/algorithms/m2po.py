"""M2PO: Second-Moment Trust Policy Optimization (Zheng, Zhao, Chen, "Prosperity before Collapse",
arXiv 2510.01161).

Off-policy training with stale rollouts, kept stable by bounding the second moment of the
log importance ratios instead of clipping each ratio. With r_t = π_θ(y_t|·) / π_behav(y_t|·)
(π_behav = the policy that sampled the batch, ``old_log_probs``) and M̂_{2,t} = (log r_t)², the
paper's Algorithm 1 ("M2PO Masking") runs, over the batch's tokens,

    M ← 1;  S ← all tokens
    while mean_{t ∈ S} M̂_{2,t} > τ_M2:  j ← argmax_{t ∈ S} M̂_{2,t};  M_j ← 0;  S ← S ∖ {j}

and the objective is the unclipped importance-weighted policy gradient on the kept tokens,

    J = (1 / Σ_i |o_i|) Σ_i Σ_t M_{i,t} · r_{i,t} · Â_{i,t}            (token-mean over ALL tokens)

with τ_M2 = 0.04 in all the paper's experiments. The mask is computed over the whole batch of
valid tokens the call receives (the paper's and AReaL's ``actor.m2_threshold``), not per response.

Vectorised: the greedy loop removes the largest values one by one, so it keeps the m* smallest,
where m* is the largest m with (1/m) Σ (the m smallest) ≤ τ (that mean grows with m, so the m that
pass form a prefix). One sort and one cumulative sum (from the smallest values up, in float64)
give it, with the loop's tie rule (argmax takes the first of equal maxima, so among equal values
the later token is kept). Ties aside, it equals the loop (tests/test_filters.py).

``tokens="trust_region"`` restricts S to the tokens a PPO trust region acts on, (Â > 0 ∧ r > 1) ∨
(Â < 0 ∧ r < 1), as the official code (github.com/Infini-AI-Lab/M2PO) selects them; the other
tokens are never masked and do not enter the mean. That code then differs further (it turns the
budget into a PPO clip range instead of masking); :func:`m2po` follows the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict.nn import TensorDictModuleBase

from ..advantages import GroupNormalizedAdvantage
from ..clipping import NoClip
from ..filters import TokenFilter
from ..importance import TokenLogRatio
from ..numerics import Padding, check_token_input
from ..recipes import Recipe, compose

__all__ = ["M2POFilter", "m2po"]

TOKEN_SETS = ("all", "trust_region")


class M2POFilter(TokenFilter):
    """M2PO's second-moment mask (arXiv 2510.01161, Algorithm 1): mask the fewest largest (log r)²
    so that the mean of the rest is ≤ ``tau`` (default 0.04).

    Reads ``log_probs``, ``old_log_probs`` [N, T] and ``advantages`` [N] or [N, T] (used only
    with ``tokens="trust_region"``). Metric: ``filtered_m2po``.
    """

    uses_batch_statistics = (
        True  # the second-moment budget is over the batch's tokens: micro-batches give a different loss
    )

    inputs = ("log_probs", "old_log_probs", "advantages")
    name = "m2po"

    def __init__(self, tau: float = 0.04, *, tokens: str = "all", **keys: Any) -> None:
        super().__init__(**keys)
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0 <= tau < float("inf"):
            raise ValueError(
                f"M2POFilter: 'tau' (τ_M2, a bound on mean (log r)²) must be a finite number >= 0, got {tau!r}"
            )
        if tokens not in TOKEN_SETS:
            raise ValueError(f"M2POFilter: 'tokens' must be one of {list(TOKEN_SETS)}, got {tokens!r}")
        self.tau, self.tokens = float(tau), tokens

    def keep(  # type: ignore[override]
        self,
        padding: Padding,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
    ) -> torch.Tensor:
        where, mask = "M2POFilter", padding.mask
        log_probs = check_token_input(where, "log_probs", log_probs, mask)
        old_log_probs = check_token_input(where, "old_log_probs", old_log_probs, mask)
        advantages = check_token_input(where, "advantages", advantages, mask, per_row=True)
        f64 = torch.float64
        log_ratio = padding.zero(log_probs.detach().to(f64) - old_log_probs.detach().to(f64))
        m2 = log_ratio.square()
        candidate = mask
        if self.tokens == "trust_region":
            adv = padding.zero(advantages.detach().to(f64).reshape(mask.shape[0], -1))
            candidate = mask & (((adv > 0) & (log_ratio > 0)) | ((adv < 0) & (log_ratio < 0)))
        flat_cand = candidate.flatten()
        # Descending, stable: equal values in token order (the loop's argmax order); non-candidates
        # (key −1 < any (log r)²) last. Flipped: ascending, the later of equal values first.
        order = torch.where(flat_cand, m2.flatten(), -1.0).sort(descending=True, stable=True).indices.flip(0)
        cand_sorted = flat_cand[order]
        values = torch.where(cand_sorted, m2.flatten()[order], 0.0)
        n = flat_cand.sum()
        size = flat_cand.numel()
        m = torch.arange(1, size + 1, device=mask.device) - (size - n)  # 1..n over the candidates
        passes = cand_sorted & (values.cumsum(0) <= self.tau * m.to(f64))
        m_star = passes.sum()
        keep_sorted = ~cand_sorted | (m <= m_star)
        keep = torch.empty_like(flat_cand).scatter_(0, order, keep_sorted)
        return keep.view(mask.shape) & mask


def m2po(
    *,
    tau: float = 0.04,
    tokens: str = "all",
    advantage_eps: float = 1e-6,
    aggregation: str = "token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "m2po",
    **shared: Any,
) -> Recipe:
    """M2PO (arXiv 2510.01161): the unclipped −r·Â on the tokens :class:`M2POFilter` keeps,
    ``token-mean`` over all tokens (masked ones still count), group-normalised advantages.

    ``tau`` = τ_M2 (default 0.04, the paper's), ``tokens`` as in :class:`M2POFilter`. r is
    exp(clamp(log r, ±20)) (:class:`~gspo_components.NoClip`); a token with |log r| > 20 has
    (log r)² > 400 and is masked first. Extra ``filters`` run after M2PO's.
    """
    filters = [M2POFilter(tau, tokens=tokens), *shared.pop("filters", ())]
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        NoClip(),
        aggregation=aggregation,
        filters=filters,
        **shared,
    )
