"""CE-GPPO: Coordinating Entropy via Gradient-Preserving Clipping Policy Optimization
(Su et al., Kuaishou Klear, arXiv 2509.20712; official code github.com/Kwai-Klear/CE-GPPO,
``compute_gppo_loss_general_beta``).

PPO's clip removes the gradient of the tokens outside the band; CE-GPPO keeps a bounded gradient
there through a stop-gradient ratio. With r = exp(ℓ − ℓ_old), r̄ = sg(r) and the two regions PPO
clips,

    low  = (r < 1 − ε_low) ∧ (Â < 0),        high = (r > 1 + ε_high) ∧ (Â > 0),

the per-token loss is

    L_t = −β₁ (1 − ε_low)  (r / r̄) Â      on low    (value −β₁(1−ε_low)Â, gradient −β₁(1−ε_low)Â ∇ℓ)
          −β₂ (1 + ε_high) (r / r̄) Â      on high   (value −β₂(1+ε_high)Â, gradient −β₂(1+ε_high)Â ∇ℓ)
          −r Â                             elsewhere

then, as in verl's dual clip, L_t = min(L_t, −c Â) for Â < 0 (c = ``dual_clip`` = 3; no gradient
where the cap binds). Defaults β₁ = 0.75, β₂ = 1 (the official function), ε_low = 0.2,
ε_high = 0.28 (their DAPO scripts), token-mean aggregation (verl's default). β₁ = β₂ = 1 is GPPO
(Klear-Reasoner, arXiv 2508.07629): the value of PPO's clip with the gradient kept. The ratio r is
clamped to e^±20 (``max_log_ratio``; the official code has no clamp: pass ``None``); r / r̄ is
formed as exp(ρ − sg ρ) (value exactly 1) so that it never divides by an underflowed ratio.
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

__all__ = ["CEGPPOClip", "ce_gppo"]


def _number(
    where: str, name: str, value: object, low: float, high: float = math.inf, *, open_low: bool
) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value < high  # type: ignore[operator]
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + (f" and < {high}" if high < math.inf else "")
        raise ValueError(f"{where}: {name!r} must be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


class CEGPPOClip(Clipper):
    """CE-GPPO's gradient-preserving clip (module doc): −J per token, [N, T].

    ``clipped`` marks the tokens outside PPO's band on the side the clip acts on (low ∪ high; their
    gradient is scaled by β instead of removed) and the tokens the dual clip caps.
    """

    def __init__(
        self,
        eps_low: float = 0.2,
        eps_high: float = 0.28,
        *,
        beta1: float = 0.75,
        beta2: float = 1.0,
        dual_clip: float | None = 3.0,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        **keys: Any,
    ) -> None:
        super().__init__(max_log_ratio=max_log_ratio, **keys)
        where = type(self).__name__
        self.eps_low = _number(where, "eps_low", eps_low, 0.0, 1.0, open_low=True)
        self.eps_high = _number(where, "eps_high", eps_high, 0.0, open_low=True)
        self.beta1 = _number(where, "beta1", beta1, 0.0, open_low=False)
        self.beta2 = _number(where, "beta2", beta2, 0.0, open_low=False)
        self.dual_clip = (
            None if dual_clip is None else _number(where, "dual_clip", dual_clip, 1.0, open_low=True)
        )
        self.params.update(eps_low=self.eps_low, eps_high=self.eps_high, beta1=self.beta1, beta2=self.beta2,
                           dual_clip=self.dual_clip)  # fmt: skip

    def surrogate(
        self, log_ratio: torch.Tensor, advantages: torch.Tensor, padding: Padding, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        r = clamped_ratio(log_ratio, self.max_log_ratio)
        unit = torch.exp(log_ratio - log_ratio.detach())  # r / sg(r): value 1, gradient ∇ℓ
        r_value = r.detach()
        low = (r_value < 1 - self.eps_low) & (adv < 0)
        high = (r_value > 1 + self.eps_high) & (adv > 0)
        loss = torch.where(
            low,
            -self.beta1 * (1 - self.eps_low) * unit * adv,
            torch.where(high, -self.beta2 * (1 + self.eps_high) * unit * adv, -r * adv),
        )
        clipped = low | high
        if self.dual_clip is not None:
            cap = -self.dual_clip * adv
            capped = (adv < 0) & (loss.detach() > cap)
            loss = torch.where(capped, cap, loss)
            clipped = clipped | capped
        return loss, clipped & padding.mask


def ce_gppo(
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    beta1: float = 0.75,
    beta2: float = 1.0,
    dual_clip: float | None = 3.0,
    advantage_eps: float = 1e-6,
    aggregation: str = "token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "ce_gppo",
    **shared: Any,
) -> Recipe:
    """CE-GPPO (arXiv 2509.20712): token ratios, the gradient-preserving clip of
    :class:`CEGPPOClip` (β₁ = 0.75, β₂ = 1, ε = (0.2, 0.28), dual clip 3), group-normalised
    advantages, token-mean. ``beta1 = beta2 = 1`` is GPPO (arXiv 2508.07629). Takes the shared
    recipe keywords (``kl_coef``, ``entropy_coef``, ``rollout_correction``, ``filters``, ...).
    """
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        CEGPPOClip(eps_low, eps_high, beta1=beta1, beta2=beta2, dual_clip=dual_clip),
        aggregation=aggregation,
        **shared,
    )
