"""GMPO: Geometric-Mean Policy Optimization (Zhao et al., arXiv 2507.20673).

GMPO optimises the geometric mean of the token ratios of a response, clipped token by token in
log space, instead of their arithmetic mean. With δ_{i,t} = ℓ_{i,t} − ℓ^old_{i,t} and the sign
σ_i = sgn(Â_i), each token's log-ratio is clipped on the pessimistic side of Â:

    c_{i,t} = σ_i · min(σ_i δ_{i,t}, σ_i · clamp(δ_{i,t}, −ε_low, ε_high))
    g_i     = exp((1/L_i) Σ_t c_{i,t})
    loss    = (1/G) Σ_i −Â_i g_i

with ε_low = ε_high = 0.4 (the paper's clip range (e^−0.4, e^0.4)). A clipped token passes no
gradient; the loss is one number per response, so the Clipper below uses the per-response slot.
This file is the worked example of docs/extending.md: it imports only public names.
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

__all__ = ["GMPOClip", "gmpo"]


class GMPOClip(Clipper):
    """GMPO's token-wise log-space clip and geometric mean: −J_i = −Â_i g_i, one per response.

    Reads token log-ratios (pair it with :class:`~gspo_components.TokenLogRatio`) and advantages
    [N] (one per response: the geometric mean has no per-token advantage). ``clipped`` marks the
    tokens whose log-ratio the clamp cut on the pessimistic side. exp(mean c) is formed through
    :func:`~gspo_components.loss.numerics.clamped_ratio` (±``max_log_ratio``); c ≤ ε_high for
    Â > 0 and c ≥ −ε_low for Â < 0, so the clamp only bounds the unclipped side.
    """

    per_response_advantages = True

    def __init__(
        self,
        eps_low: float = 0.4,
        eps_high: float = 0.4,
        *,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        **keys: Any,
    ) -> None:
        super().__init__(max_log_ratio=max_log_ratio, **keys)
        for arg, value in (("eps_low", eps_low), ("eps_high", eps_high)):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not value > 0:
                raise ValueError(
                    f"GMPOClip: {arg!r} must be a number > 0 and finite (a log-space bound), got {value!r}"
                )
        self.eps_low, self.eps_high = float(eps_low), float(eps_high)
        self.params.update(eps_low=self.eps_low, eps_high=self.eps_high)

    def surrogate(
        self, log_ratio: torch.Tensor, advantages: torch.Tensor, padding: Padding, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if advantages.dim() != 1:
            raise ValueError(
                f"GMPOClip: 'advantages' must be one per response, shape [N] = [{advantages.shape[0]}], got "
                f"{list(advantages.shape)}; GMPO's geometric mean has no per-token advantage"
            )
        sign = torch.sign(advantages).unsqueeze(-1)
        bounded = log_ratio.clamp(-self.eps_low, self.eps_high)
        c = sign * torch.minimum(sign * log_ratio, sign * bounded)
        g = clamped_ratio(padding.row_mean(c), self.max_log_ratio)
        clipped = (sign * bounded < sign * log_ratio) & padding.mask
        return -(advantages * g), clipped


def gmpo(
    *,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
    advantage_eps: float = 1e-6,
    aggregation: str = "seq-mean-token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "gmpo",
    **shared: Any,
) -> Recipe:
    """GMPO (arXiv 2507.20673): loss = mean_i(−Â_i g_i), g_i the geometric mean of the token
    ratios clipped in log space to (−ε_low, ε_high) on the pessimistic side of Â_i.

    Defaults: ε_low = ε_high = 0.4, group-normalised advantages, ``seq-mean-token-mean`` (which
    on a per-response loss is the mean over responses). Takes the shared recipe keywords
    (``kl_coef``, ``entropy_coef``, ``rollout_correction``, ``filters``, ...).
    """
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        GMPOClip(eps_low, eps_high),
        aggregation=aggregation,
        **shared,
    )
