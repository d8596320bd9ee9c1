"""Clip-Cov and KL-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models", arXiv 2505.22617), as verl 0.9.1 implements them (``clip_cov``, ``kl_cov``).

Both act on the tokens whose centred covariance between log-probability and advantage is large,
the tokens that drive the policy's entropy down. Over the N_v valid tokens of the batch (the
micro-batch the loss sees),

    Cov_{i,t} = (Â_{i,t} − mean Â) · (ℓ_{i,t} − mean ℓ)      (means over the valid tokens, detached)

with Â_{i,t} = Â_i for advantages given per response.

**Clip-Cov** (paper §4.2, verl ``compute_policy_loss_clip_cov``): PPO's clipped surrogate, except
that ⌊r·N_v⌋ (at least 1) tokens drawn uniformly at random among those with ω_low < Cov < ω_high
(strict) that PPO's clip did not already cut are detached: their loss is 0 and they pass no
gradient (they still count in the aggregation's denominators). Defaults are verl's and the
paper's: r = 2e-4, ω_low = 1, ω_high = 5, ε = 0.2 / 0.2. The draw uses torch's global CPU
generator exactly as verl does (``torch.randperm(n_candidates)`` on the candidates in row-major
order, called only when there is one), so a seeded run selects the same tokens as verl; pass
``generator=`` for a private stream.

**KL-Cov** (paper §4.2, verl ``compute_policy_loss_kl_cov``): the unclipped surrogate −w Â (verl
applies no PPO clip here) plus β·|ℓ − ℓ^old| on the top ⌊k·N_v⌋ (at least 1) tokens by Cov
(``torch.topk``, deterministic). Defaults are verl's (``PolicyLossConfig``): k = 2e-4, β = 0.1;
the paper's Qwen2.5-7B run uses k = 2e-3, β = 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tensordict.nn import TensorDictModuleBase

from ..advantages import GroupNormalizedAdvantage
from ..clipping import Clipper
from ..importance import TokenLogRatio
from ..numerics import DEFAULT_MAX_LOG_RATIO, Padding, clamped_ratio
from ..recipes import Recipe, compose

__all__ = ["ClipCovClip", "KLCovPenalty", "clip_cov", "kl_cov", "token_covariance"]


def _number(where: str, arg: str, value: object, low: float, high: float | None, *, closed: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if closed else value > low) and (high is None or value <= high)
    if not ok:
        bound = f"{'[' if closed else '('}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"{where}: {arg!r} must be a finite number in {bound}, got {value!r}")
    return float(value)


def _token_advantages(advantages: torch.Tensor, padding: Padding) -> torch.Tensor:
    return padding.broadcast(advantages) if advantages.dim() == 1 else advantages


def token_covariance(log_probs: torch.Tensor, advantages: torch.Tensor, padding: Padding) -> torch.Tensor:
    """Cov_{i,t} = (Â_{i,t} − mean Â)(ℓ_{i,t} − mean ℓ), means over the valid tokens, detached;
    [N, T], 0 at padding. ``log_probs`` may hold anything at padding; ``advantages`` [N] or [N, T]
    (clean)."""
    lp = padding.zero(log_probs.detach().to(advantages.dtype))
    adv = _token_advantages(advantages.detach(), padding)
    n = padding.lengths.sum().clamp(min=1).to(adv.dtype)
    return padding.zero((adv - adv.sum() / n) * (lp - lp.sum() / n))


def _ppo(log_ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float, max_log_ratio):
    """(−J, C): PPO's clipped surrogate as where(C, clip(w) Â, w Â), C strict, for [N, T] Â."""
    w = clamped_ratio(log_ratio, max_log_ratio)
    high = torch.full((), 1.0 + eps_high, dtype=adv.dtype, device=adv.device)
    bound = torch.where(adv > 0, high, torch.full_like(high, 1.0 - eps_low))
    cut = (w.detach() - bound) * torch.sign(adv) > 0
    return -(torch.where(cut, bound, w) * adv), cut


class ClipCovClip(Clipper):
    """Clip-Cov: PPO clip, plus the gradient of a random fraction ``clip_ratio`` of the tokens
    with ``lb`` < Cov < ``ub`` removed (their loss set to 0). Reads ``log_probs``.

    ``clipped`` marks both PPO's cut tokens and the Cov-selected ones (verl's ``pg_clipfrac``
    counts only the latter).
    """

    uses_batch_statistics = (
        True  # the covariance is centred on batch means: micro-batches give a different loss
    )

    inputs = ("log_probs",)

    def __init__(
        self,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        *,
        clip_ratio: float = 2e-4,
        lb: float = 1.0,
        ub: float = 5.0,
        generator: torch.Generator | None = None,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        **keys: Any,
    ) -> None:
        super().__init__(max_log_ratio=max_log_ratio, **keys)
        where = type(self).__name__
        self.eps_low = _number(where, "eps_low", eps_low, 0.0, 1.0, closed=True)
        self.eps_high = _number(where, "eps_high", eps_high, 0.0, None, closed=True)
        self.clip_ratio = _number(where, "clip_ratio", clip_ratio, 0.0, 1.0, closed=False)
        self.lb = _number(where, "lb", lb, -math.inf, None, closed=False)
        self.ub = _number(where, "ub", ub, -math.inf, None, closed=False)
        if not self.lb < self.ub:
            raise ValueError(f"{where}: 'lb' must be < 'ub', got lb={lb!r}, ub={ub!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"{where}: 'generator' must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.generator = generator
        self.params.update(
            eps_low=self.eps_low, eps_high=self.eps_high, clip_ratio=self.clip_ratio, lb=self.lb, ub=self.ub
        )

    def surrogate(
        self, log_ratio: torch.Tensor, advantages: torch.Tensor, padding: Padding, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        adv = _token_advantages(advantages, padding)
        neg, cut = _ppo(log_ratio, adv, self.eps_low, self.eps_high, self.max_log_ratio)
        cut = cut & padding.mask
        cov = token_covariance(inputs["log_probs"], adv, padding)
        candidates = torch.nonzero(padding.mask & ~cut & (cov > self.lb) & (cov < self.ub))
        selected = torch.zeros_like(cut)
        if len(candidates) > 0:
            num = max(int(self.clip_ratio * int(padding.lengths.sum())), 1)
            perm = torch.randperm(len(candidates), generator=self.generator)
            chosen = candidates[perm[: min(num, len(candidates))].to(candidates.device)]
            selected[chosen[:, 0], chosen[:, 1]] = True
        neg = torch.where(selected, torch.zeros((), dtype=neg.dtype, device=neg.device), neg)
        return neg, cut | selected


class KLCovPenalty(Clipper):
    """KL-Cov: the unclipped surrogate −w Â, plus ``kl_coef``·|ℓ − ℓ^old| on the top ``kl_ratio``
    fraction of the valid tokens by Cov. Reads ``log_probs``. Nothing is clipped (``clipped`` is
    all False)."""

    never_clips = True

    uses_batch_statistics = (
        True  # the covariance is centred on batch means: micro-batches give a different loss
    )

    inputs = ("log_probs",)

    def __init__(
        self,
        kl_ratio: float = 2e-4,
        kl_coef: float = 0.1,
        *,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        **keys: Any,
    ) -> None:
        super().__init__(max_log_ratio=max_log_ratio, **keys)
        where = type(self).__name__
        self.kl_ratio = _number(where, "kl_ratio", kl_ratio, 0.0, 1.0, closed=False)
        self.kl_coef = _number(where, "kl_coef", kl_coef, 0.0, None, closed=True)
        self.params.update(kl_ratio=self.kl_ratio, kl_coef=self.kl_coef)

    def surrogate(
        self, log_ratio: torch.Tensor, advantages: torch.Tensor, padding: Padding, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        adv = _token_advantages(advantages, padding)
        neg = -(clamped_ratio(log_ratio, self.max_log_ratio) * adv)
        flat_valid = torch.nonzero(padding.mask.reshape(-1), as_tuple=True)[0]
        never = torch.zeros(padding.mask.shape, dtype=torch.bool, device=neg.device)
        if len(flat_valid) == 0:
            return neg, never
        # as verl: the valid tokens flattened row-major, plain means (ties in topk break alike)
        adv_v = adv[padding.mask]
        lp_v = inputs["log_probs"].detach().to(adv.dtype)[padding.mask]
        cov = (adv_v - adv_v.mean()) * (lp_v - lp_v.mean())
        k = max(1, int(len(flat_valid) * self.kl_ratio))
        top = flat_valid[torch.topk(cov, k, largest=True).indices]
        penalised = torch.zeros(padding.mask.numel(), dtype=torch.bool, device=neg.device)
        penalised[top] = True
        penalty = self.kl_coef * log_ratio.abs()
        neg = torch.where(penalised.reshape(padding.mask.shape), neg + penalty, neg)
        return neg, never


def clip_cov(
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio: float = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    generator: torch.Generator | None = None,
    advantage_eps: float = 1e-6,
    aggregation: str = "token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "clip_cov",
    **shared: Any,
) -> Recipe:
    """Clip-Cov (arXiv 2505.22617): PPO clip 0.2/0.2 on token ratios, and a random ``clip_ratio``
    (2e-4) of the tokens with 1 < Cov(ℓ, Â) < 5 detached; token-mean, as verl's ``clip_cov``."""
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        ClipCovClip(eps_low, eps_high, clip_ratio=clip_ratio, lb=lb, ub=ub, generator=generator),
        aggregation=aggregation,
        **shared,
    )


def kl_cov(
    *,
    kl_ratio: float = 2e-4,
    kl_coef: float = 0.1,
    advantage_eps: float = 1e-6,
    aggregation: str = "token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "kl_cov",
    **shared: Any,
) -> Recipe:
    """KL-Cov (arXiv 2505.22617): −w Â on token ratios, plus β|ℓ − ℓ^old| (β = ``kl_coef``, 0.1)
    on the top ``kl_ratio`` (2e-4) of the tokens by Cov(ℓ, Â); token-mean, as verl's ``kl_cov``."""
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        KLCovPenalty(kl_ratio, kl_coef),
        aggregation=aggregation,
        **shared,
    )
