"""ASPO: Asymmetric Importance Sampling Policy Optimization (Wang et al., Kuaishou, arXiv 2510.06062;
official code github.com/wizard-III/Archer2.0, verl/trainer/ppo/core_algos.py
``compute_policy_loss_archer`` and dp_actor.py).

ASPO flips the importance ratio of positive-advantage tokens (weight 1/r instead of r, so that
already-likely tokens stop dominating the update) and keeps PPO's one-sided clip for negative
ones, with a soft dual clip that keeps the gradient. With r = exp(clamp(ℓ − ℓ_old, ±20)), a clip
width per token ε_t = ε (0.2) for low-entropy tokens and ε_H (0.4) for the top (1 − q) = 20 %
highest-entropy tokens of the response (e_t = H_t ≤ quantile_q{H_{t'} : t' valid in the same
response}, q = 0.8, torch's linear interpolation), and c = ``dual_clip`` = 3:

    Â < 0:  c⁻ = max(r, 1 − ε_t);   L_t = −Â c⁻,            but −Â · c · ℓ_t  when c⁻ > c
    Â ≥ 0:  c⁺ = min(r, 1 + ε_t);   L_t = −Â (c⁺ / sg(c⁺)) / sg(c⁺),  but −Â · c · ℓ_t  when 1/c⁺ > c

The positive branch has value −Â / c⁺ and gradient −(Â / r) ∇ℓ inside the band, 0 once r ≥ 1 + ε_t.
The dual-clip branches (value −c Â ℓ_t, gradient −c Â ∇ℓ, like CISPO's) keep the gradient of the
tokens whose weight would exceed c. Aggregation: token-mean (the official code's default). The
entropies H_t are the current policy's per-token entropies (``entropy``, detached); the loss also
reads ``log_probs`` (ℓ_t) for the dual-clip branches.
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

__all__ = ["ASPOClip", "aspo", "low_entropy_mask"]


def low_entropy_mask(entropy: torch.Tensor, padding: Padding, quantile: float = 0.8) -> torch.Tensor:
    """e [N, T] bool: H_t ≤ the ``quantile`` of the valid entropies of the same response (linear
    interpolation, ``torch.nanquantile`` per row); False at padding. Entropies must be finite at
    valid positions (ValueError)."""
    h = padding.zero(entropy.detach())
    if h.numel() == 0:  # N = 0 or T = 0: nothing to rank (the Objective refuses the empty batch)
        return padding.mask.clone()
    if not bool(torch.isfinite(h).all()):
        raise ValueError("ASPOClip: 'entropy' must be finite at the valid positions of 'response_mask'")
    rows = torch.where(padding.mask, h, math.nan)
    threshold = torch.nanquantile(rows, quantile, dim=-1, keepdim=True)  # NaN for an empty row
    return (h <= threshold) & padding.mask


class ASPOClip(Clipper):
    """ASPO's asymmetric clip (module doc): −J per token, [N, T]; reads ``log_probs`` and
    ``entropy`` besides the log-ratio and the advantages. ``clipped`` marks the tokens whose ratio
    the band cut (no gradient) and those of the dual-clip branches."""

    uses_batch_statistics = (
        True  # the entropy quantile over the batch's responses: micro-batches give a different loss
    )

    inputs = ("log_probs", "entropy")

    def __init__(
        self,
        eps: float = 0.2,
        eps_high_entropy: float = 0.4,
        *,
        dual_clip: float = 3.0,
        entropy_quantile: float = 0.8,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        **keys: Any,
    ) -> None:
        super().__init__(max_log_ratio=max_log_ratio, **keys)
        where = type(self).__name__
        for arg, value, low, high in (
            ("eps", eps, 0.0, 1.0),
            ("eps_high_entropy", eps_high_entropy, 0.0, 1.0),
            ("dual_clip", dual_clip, 1.0, math.inf),
            ("entropy_quantile", entropy_quantile, 0.0, 1.0),
        ):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            inclusive = arg == "entropy_quantile"
            if not (ok and (low <= value <= high if inclusive else low < value < high)):
                band = f"[{low}, {high}]" if inclusive else f"({low}, {high})"
                raise ValueError(f"{where}: {arg!r} must be a finite number in {band}, got {value!r}")
        self.eps, self.eps_high_entropy = float(eps), float(eps_high_entropy)
        self.dual_clip, self.entropy_quantile = float(dual_clip), float(entropy_quantile)
        self.params.update(eps=self.eps, eps_high_entropy=self.eps_high_entropy, dual_clip=self.dual_clip,
                           entropy_quantile=self.entropy_quantile)  # fmt: skip

    def surrogate(  # type: ignore[override]
        self,
        log_ratio: torch.Tensor,
        advantages: torch.Tensor,
        padding: Padding,
        log_probs: torch.Tensor,
        entropy: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for key, x in (("log_probs", log_probs), ("entropy", entropy)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape != padding.mask.shape:
                got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"{type(self).__name__}: {key!r} must be a float tensor of shape [N, T] = "
                    f"{list(padding.mask.shape)} like 'response_mask', got {got}"
                )
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        dtype = log_ratio.dtype
        eps = torch.where(
            low_entropy_mask(entropy, padding, self.entropy_quantile),
            torch.tensor(self.eps, dtype=dtype, device=log_ratio.device),
            torch.tensor(self.eps_high_entropy, dtype=dtype, device=log_ratio.device),
        )
        r = clamped_ratio(log_ratio, self.max_log_ratio)
        ell = padding.zero(log_probs.to(log_ratio.dtype))
        c = self.dual_clip
        # Â < 0: one-sided PPO clip from below, dual clip above c.
        c_neg = torch.maximum(r, 1 - eps)
        neg_dual = c_neg.detach() > c
        neg = torch.where(neg_dual, -adv * c * ell, -adv * c_neg)
        # Â ≥ 0: flipped ratio 1/c⁺, c⁺ = min(r, 1 + ε); soft dual clip where 1/c⁺ > c.
        c_pos = torch.minimum(r, 1 + eps)
        pos_dual = 1 / c_pos.detach() > c
        sg = torch.where(pos_dual, 1.0, c_pos.detach())  # no 0/0 in the branch not taken (r may underflow)
        pos = torch.where(pos_dual, -adv * c * ell, -adv * (c_pos / sg) / sg)
        negative = adv < 0
        loss = torch.where(negative, neg, pos)
        r_value = r.detach()
        band = torch.where(negative, r_value <= 1 - eps, r_value >= 1 + eps)
        clipped = (band | torch.where(negative, neg_dual, pos_dual)) & padding.mask
        return loss, clipped


def aspo(
    *,
    eps: float = 0.2,
    eps_high_entropy: float = 0.4,
    dual_clip: float = 3.0,
    entropy_quantile: float = 0.8,
    advantage_eps: float = 1e-6,
    aggregation: str = "token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "aspo",
    **shared: Any,
) -> Recipe:
    """ASPO (arXiv 2510.06062): token ratios, :class:`ASPOClip` (flipped ratio for Â ≥ 0, PPO's
    lower clip for Â < 0, soft dual clip c = 3, ε = 0.2 / 0.4 for low / top-20 % entropy tokens),
    group-normalised advantages, token-mean. Needs ``entropy`` (per-token, current policy) and
    ``log_probs`` in the batch. Takes the shared recipe keywords.
    """
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        ASPOClip(eps, eps_high_entropy, dual_clip=dual_clip, entropy_quantile=entropy_quantile),
        aggregation=aggregation,
        **shared,
    )
