"""OPSM: Off-Policy Sequence Masking (DeepSeek-AI, DeepSeek-V3.2, arXiv 2512.02556, eq. 9).

A response with a negative advantage whose sampling policy has drifted far from the current one
is dropped from the loss: with the k1 estimate of KL(π_sampler ‖ π_θ) averaged over the response,

    KL̄_i   = (1 / max(L_i, 1)) Σ_t m_{i,t} (log π_sampler(y_{i,t}) − log π_θ(y_{i,t}))
    keep_i = 1[Â_i ≥ 0  ∨  KL̄_i ≤ δ]

and the loss of a dropped response is multiplied by 0 (the normalisers are unchanged). This is
TRL 1.16's ``GRPOTrainer.get_off_policy_mask`` (``GRPOConfig.off_policy_mask_threshold = δ``),
including its ``nan_to_num``: a NaN log-prob at a valid token (one vLLM could not score) counts as
KL 0 there. Per-token advantages [N, T] are accepted and decide per token (keep_{i,t} =
1[Â_{i,t} ≥ 0 ∨ KL̄_i ≤ δ]), which is the rule above when Â is constant over the response.

Which log-probs are the sampler's: TRL uses the inference engine's (vLLM) log-probs when it has
them and π_old's otherwise; the paper's π_old is the behaviour policy. This filter reads
``old_log_probs`` by default; pass ``in_keys={"old_log_probs": "rollout_log_probs"}`` to measure
the drift from the engine's log-probs instead. Neither the paper nor TRL gives a default δ (TRL's
is None, i.e. off), so ``delta`` is required.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..filters import TokenFilter
from ..numerics import Padding, check_token_input, compute_dtype

__all__ = ["OPSMFilter"]


class OPSMFilter(TokenFilter):
    """Drop the responses with Â < 0 whose mean k1 KL(π_sampler ‖ π_θ) exceeds ``delta``.

    Reads ``log_probs``, ``old_log_probs`` (the sampler's; renamable) [N, T] and ``advantages``
    [N] or [N, T]. Returns one weight per response ([N]) for [N] advantages. Metric:
    ``filtered_opsm``.
    """

    inputs = ("log_probs", "old_log_probs", "advantages")
    name = "opsm"

    def __init__(self, delta: float, **keys: Any) -> None:
        super().__init__(**keys)
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not math.isfinite(delta):
            raise ValueError(
                f"OPSMFilter: 'delta' (δ, the mean-KL threshold) must be a finite real number, got {delta!r}"
            )
        self.delta = float(delta)

    def keep(  # type: ignore[override]
        self,
        padding: Padding,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
    ) -> torch.Tensor:
        where, mask = "OPSMFilter", padding.mask
        log_probs = check_token_input(where, "log_probs", log_probs, mask)
        old_log_probs = check_token_input(where, "old_log_probs", old_log_probs, mask)
        advantages = check_token_input(where, "advantages", advantages, mask, per_row=True)
        dtype = compute_dtype(log_probs, old_log_probs)
        kl = padding.zero(
            torch.nan_to_num(old_log_probs.detach().to(dtype) - log_probs.detach().to(dtype), nan=0.0)
        )
        low_kl = padding.row_mean(kl) <= self.delta
        adv = advantages.detach()
        if adv.dim() == 1:
            return (adv >= 0) | low_kl
        return ((padding.zero(adv) >= 0) | low_kl.unsqueeze(-1)) & mask
