"""VESPO: Variational Sequence-level Soft Policy Optimization (arXiv 2602.10693), as TRL 1.16
implements it (``GRPOConfig(loss_type="vespo")``, ``GRPOTrainer.get_gamma_weights``).

Instead of a hard clip, each response's policy gradient is scaled by a detached gamma-shaped
weight of its sequence importance ratio:

    log w_i = clamp(Σ_t clamp(ℓ_{i,t} − ℓ^old_{i,t}, −20, 20), log 1e-8, 20)
    φ(w)    = e^λ · w^k · e^{−λ w}                 (φ(1) = 1, maximal at w = k/λ)
    loss_{i,t} = −sg[φ(w_i)] · Â_i · ℓ_{i,t}

with (k, λ) = (k_pos, λ_pos) = (2, 3) for Â_i ≥ 0 and (k_neg, λ_neg) = (3, 2) for Â_i < 0 (TRL's
defaults; λ clamped to ≥ 1e-4; a non-finite φ is set to 0). **w is the PRODUCT of the token
ratios** (the exponent is a sum over the response, not a mean), as in TRL; it is not GSPO's
geometric mean. The value holds ℓ itself (−φ Â ℓ, TRL's value); the gradient is −φ Â ∇ℓ. The
default aggregation is token-mean (TRL's ``dapo`` normaliser, Σ M·L / Σ M on one window).

TRL can fold vLLM token-level IS ratios into w; here rollout correction is a separate part.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tensordict.nn import TensorDictModuleBase

from ..advantages import GroupNormalizedAdvantage
from ..clipping import Clipper
from ..importance import TokenLogRatio
from ..numerics import DEFAULT_MAX_LOG_RATIO, Padding
from ..recipes import Recipe, compose

__all__ = ["VESPOWeight", "vespo", "vespo_weights"]

LOG_W_MIN = math.log(1e-8)
"""TRL's lower clamp of log w (≈ −18.42); the upper clamp is 20."""


def vespo_weights(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    padding: Padding,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    token_bound: float | None = DEFAULT_MAX_LOG_RATIO,
) -> torch.Tensor:
    """φ(w_i), [N], detached: ``log_ratio`` [N, T] clean (0 at padding), ``advantages`` [N]."""
    lr = log_ratio.detach()
    if token_bound is not None:
        lr = lr.clamp(-token_bound, token_bound)
    log_w = lr.sum(-1).clamp(LOG_W_MIN, 20.0)  # lr is 0 at padding (the clamp keeps 0 at 0)
    adv = advantages.detach()
    nonneg = adv >= 0

    def pick(pos: float, neg: float) -> torch.Tensor:
        like = torch.full((), pos, dtype=log_w.dtype, device=log_w.device)
        return torch.where(nonneg, like, torch.full_like(like, neg))

    k = pick(k_pos, k_neg)
    lam = pick(lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _number(where: str, arg: str, value: object, *, positive: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(
            f"{where}: {arg!r} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
        )
    return float(value)


class VESPOWeight(Clipper):
    """VESPO's soft sequence weight: −J_{i,t} = −sg[φ(w_i)] Â_i ℓ_{i,t}. Reads ``log_probs`` and
    token log-ratios (pair it with :class:`~gspo_components.TokenLogRatio`); advantages one per
    response [N]. Nothing is clipped (``clipped`` is all False)."""

    never_clips = True

    per_response_advantages = True

    inputs = ("log_probs",)

    def __init__(
        self,
        k_pos: float = 2.0,
        lambda_pos: float = 3.0,
        k_neg: float = 3.0,
        lambda_neg: float = 2.0,
        *,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        **keys: Any,
    ) -> None:
        super().__init__(max_log_ratio=max_log_ratio, **keys)
        where = type(self).__name__
        self.k_pos = _number(where, "k_pos", k_pos, positive=False)
        self.lambda_pos = _number(where, "lambda_pos", lambda_pos, positive=True)
        self.k_neg = _number(where, "k_neg", k_neg, positive=False)
        self.lambda_neg = _number(where, "lambda_neg", lambda_neg, positive=True)
        self.params.update(
            k_pos=self.k_pos, lambda_pos=self.lambda_pos, k_neg=self.k_neg, lambda_neg=self.lambda_neg
        )

    def surrogate(
        self, log_ratio: torch.Tensor, advantages: torch.Tensor, padding: Padding, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if advantages.dim() != 1:
            raise ValueError(
                f"VESPOWeight: 'advantages' must be one per response, shape [N] = [{advantages.shape[0]}], got "
                f"{list(advantages.shape)}; φ(w) takes its shape from the sign of the response's advantage"
            )
        phi = vespo_weights(
            log_ratio,
            advantages,
            padding,
            self.k_pos,
            self.lambda_pos,
            self.k_neg,
            self.lambda_neg,
            self.max_log_ratio,
        )
        # the Objective cleans −J's padding (value and gradient), so log π needs no masking here
        log_probs = inputs["log_probs"].to(log_ratio.dtype)
        never = torch.zeros(padding.lengths.shape, dtype=torch.bool, device=log_ratio.device)
        return -(phi * advantages).unsqueeze(-1) * log_probs, never


def vespo(
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    advantage_eps: float = 1e-6,
    aggregation: str = "token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "vespo",
    **shared: Any,
) -> Recipe:
    """VESPO (arXiv 2602.10693; TRL ``loss_type="vespo"``): loss −sg[φ(w_i)] Â_i ℓ_{i,t},
    φ(w) = e^λ w^k e^{−λw} on the product ratio w_i = Π_t w_{i,t}, (k, λ) = (2, 3) for Â ≥ 0 and
    (3, 2) for Â < 0; group-normalised advantages, token-mean."""
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        VESPOWeight(k_pos, lambda_pos, k_neg, lambda_neg),
        aggregation=aggregation,
        **shared,
    )
