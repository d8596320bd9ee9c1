"""DPPO: Divergence Proximal Policy Optimization (Qi et al., "Rethinking the Trust Region in LLM
Reinforcement Learning", arXiv 2602.04879).

PPO's ratio clip is replaced by a mask on a direct estimate of the policy divergence at the sampled
token. With p = π_θ(y_t|·) = e^ℓ and p' = π_old(y_t|·) = e^{ℓ_old}, the *binary* approximations
(the distribution collapsed to {y_t, not y_t}) are

    binary TV:  D_TV = p − p'                                   (signed)
    binary KL:  D_KL = p' (ℓ_old − ℓ) + (1 − p') log((1 − p' + 1e-8) / (1 − p + 1e-8))

and a token is masked when its probability has moved out of the band on the side its advantage
pushes it (a move the other way is always allowed):

    binary_tv:  keep = (p − p' ≤ δ_high)               if Â > 0,   (p − p' ≥ −δ_low)             otherwise
    binary_kl:  keep = (D_KL ≤ δ_high) ∨ (p ≤ p')      if Â > 0,   (D_KL ≤ δ_low) ∨ (p ≥ p')     otherwise

(Â = 0 takes the "otherwise" side). This is verl 0.9.1's ``dppo_tv`` / ``dppo_kl`` mask
(verl/trainer/ppo/core_algos.py), including the 1e-8 terms. The whole verl loss is

    L_t = −Â_t · sg(min(r_t, C)) · ℓ_t · keep_t,     r_t = exp(clamp(ℓ − ℓ_old, ±20)),

a truncated-IS policy gradient (C = ``clip_ratio_c``) on the kept tokens, aggregated with the
usual ``loss_agg_mode`` (masked tokens still count in the denominators). :func:`dppo` composes it
from :class:`DPPOFilter` and :class:`~gspo_components.CISPOClip` (cap 1 + ε_high = C, no lower bound):
the gradient is verl's; the value is −Â·min(r, C) (= −Â on-policy) instead of verl's −Â·min(r, C)·ℓ,
as for CISPO (tests_verl/test_verl_filters.py).

Defaults: δ_low = δ_high = 0.2 are verl's (its ``clip_ratio_low/high``, read as divergence
thresholds); C = 20 is verl's fallback, the large cap the paper recommends (its section 5.4; verl's
``ActorConfig.clip_ratio_c`` is 3.0 unless set).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict.nn import TensorDictModuleBase

from ..advantages import GroupNormalizedAdvantage
from ..clipping import CISPOClip
from ..filters import TokenFilter
from ..importance import TokenLogRatio
from ..numerics import Padding, check_token_input, compute_dtype
from ..recipes import Recipe, compose

__all__ = ["DPPOFilter", "dppo"]

MODES = ("binary_tv", "binary_kl")


def _check_threshold(where: str, name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value >= 0
        or value == float("inf")
    ):
        raise ValueError(
            f"{where}: {name!r} must be a finite number >= 0 (a divergence bound), got {value!r}"
        )
    return float(value)


class DPPOFilter(TokenFilter):
    """DPPO's binary-TV / binary-KL trust-region mask (arXiv 2602.04879; verl ``dppo_tv``/``dppo_kl``).

    ``mode``: ``"binary_tv"`` or ``"binary_kl"``; ``delta_low`` / ``delta_high``: the bounds for
    Â ≤ 0 / Â > 0. Reads ``log_probs``, ``old_log_probs`` [N, T] and ``advantages`` [N] or [N, T].
    Metric: ``filtered_dppo`` (verl's ``pg_clipfrac``).
    """

    inputs = ("log_probs", "old_log_probs", "advantages")
    name = "dppo"

    def __init__(
        self, mode: str = "binary_tv", delta_low: float = 0.2, delta_high: float = 0.2, **keys: Any
    ) -> None:
        super().__init__(**keys)
        if mode not in MODES:
            raise ValueError(f"DPPOFilter: 'mode' must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.delta_low = _check_threshold("DPPOFilter", "delta_low", delta_low)
        self.delta_high = _check_threshold("DPPOFilter", "delta_high", delta_high)

    def keep(  # type: ignore[override]
        self,
        padding: Padding,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
    ) -> torch.Tensor:
        where, mask = "DPPOFilter", padding.mask
        log_probs = check_token_input(where, "log_probs", log_probs, mask)
        old_log_probs = check_token_input(where, "old_log_probs", old_log_probs, mask)
        advantages = check_token_input(where, "advantages", advantages, mask, per_row=True)
        dtype = compute_dtype(log_probs, old_log_probs)
        logp = padding.zero(log_probs.detach().to(dtype))
        old = padding.zero(old_log_probs.detach().to(dtype))
        adv = advantages.detach().to(dtype)
        positive = padding.zero(adv.unsqueeze(-1) if adv.dim() == 1 else adv) > 0
        p, p_old = torch.exp(logp), torch.exp(old)
        if self.mode == "binary_tv":
            ok_pos = (p - p_old) <= self.delta_high
            ok_neg = (p - p_old) >= -self.delta_low
        else:
            kl = p_old * (old - logp) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            ok_pos = (kl <= self.delta_high) | (p <= p_old)
            ok_neg = (kl <= self.delta_low) | (p >= p_old)
        return torch.where(positive, ok_pos, ok_neg) & mask


def dppo(
    *,
    mode: str = "binary_tv",
    delta_low: float = 0.2,
    delta_high: float = 0.2,
    tis_cap: float = 20.0,
    advantage_eps: float = 1e-6,
    aggregation: str = "token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "dppo",
    **shared: Any,
) -> Recipe:
    """DPPO (arXiv 2602.04879), as verl 0.9.1's ``dppo_tv`` / ``dppo_kl``: the truncated-IS policy
    gradient −Â·sg(min(r, C))·∇ℓ on the tokens :class:`DPPOFilter` keeps, ``token-mean``.

    ``tis_cap`` = C ≥ 1 (default 20); ``mode``, ``delta_low``, ``delta_high`` go to the filter. The
    value is −Â·min(r, C) (verl's is that times ℓ; the gradients agree). Extra ``filters`` run
    after DPPO's. Takes the shared recipe keywords (``kl_coef``, ``rollout_correction``, ...).
    """
    if isinstance(tis_cap, bool) or not isinstance(tis_cap, int | float) or not 1.0 <= tis_cap < float("inf"):
        raise ValueError(
            f"dppo: 'tis_cap' (C, the truncated-IS cap) must be a finite number >= 1, got {tis_cap!r}"
        )
    filters = [DPPOFilter(mode, delta_low, delta_high), *shared.pop("filters", ())]
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        CISPOClip(eps_high=float(tis_cap) - 1.0),
        aggregation=aggregation,
        filters=filters,
        **shared,
    )
