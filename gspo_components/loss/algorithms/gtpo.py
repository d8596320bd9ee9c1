"""GTPO: Group-relative Trajectory-based Policy Optimization (Simoni et al., arXiv 2508.03772;
official code github.com/winstonsmith1897/GTPO, gtpo/gtpo_training.py). Not ByteDance's
"GTPO and GRPO-S" (arXiv 2508.04349), which shares the acronym.

Two parts, as in the official code:

1. Conflict tokens (:class:`GTPOConflictFilter`). Within a group, a token (i, t) is in conflict
   when the same token id sits at the same position t in at least one positive-advantage and one
   negative-advantage completion; only each completion's initial run of such tokens counts
   (forward, from the first token), and separately the run aligned from the end (backward: same
   rule on the positions counted from each completion's last token). With w = 2:

       δ^dir_{i,t} = 1 if (i, t) is not a conflict token of that direction,
                     w if it is and Â_i > 0,   0 if it is and Â_i < 0,
       δ_{i,t} = δ^fwd_{i,t} · δ^bwd_{i,t},     n_i = max(1, #{t : conflict forward or backward}),

   so the positive completions' shared prefix/suffix is reinforced and the negative ones' is not
   pushed down. The filter's weight is δ_{i,t} / n_i (completions with Â_i = 0 keep 1).
2. Entropy control (:class:`GTPOEntropyShaping`). H̄_i, the mean per-token entropy of completion i
   under the current policy (detached), shapes its advantage:
   Â'_i = Â_i − 0.1 H̄_i if H̄_i ≤ 0.7, else 0 (the completion is filtered out).

Loss: L_i = −(1/L_i) Σ_t Â'_i (δ_{i,t}/n_i) exp(ℓ_{i,t} − sg ℓ_{i,t}) (on-policy: the ratio's value is
1, its gradient ∇ℓ; here exp(ρ − sg ρ), ρ = ℓ − ℓ_old, which is the same), no clipping, no KL.
The official code sums L_i over the completions; the recipe takes their mean
(``seq-mean-token-mean``), a constant factor N on the learning rate. The conflict flags use the
advantages before the entropy shaping (as the official code does). The paper has several arXiv
versions with different formulas; the constants (w = 2, 0.7, 0.1) are the official code's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tensordict.nn import TensorDictModuleBase

from ..advantages import GroupNormalizedAdvantage
from ..clipping import Clipper
from ..filters import TokenFilter
from ..importance import TokenLogRatio
from ..numerics import Padding
from ..recipes import Recipe, compose

__all__ = ["GTPOConflictFilter", "GTPOEntropyShaping", "conflict_runs", "gtpo"]


def _initial_conflict_run(
    ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> torch.Tensor:
    """[G, T] bool: the initial run of positions whose token also sits at that position in a
    positive and in a negative completion of the group (valid positions only)."""
    same = (ids.unsqueeze(1) == ids.unsqueeze(0)) & mask.unsqueeze(1) & mask.unsqueeze(0)  # [G, G, T]
    in_pos = (same & pos.view(1, -1, 1)).any(1)
    in_neg = (same & neg.view(1, -1, 1)).any(1)
    raw = in_pos & in_neg & mask
    return torch.cumprod(raw.to(torch.uint8), dim=-1).bool()


def conflict_runs(
    ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, backward) conflict runs [G, T] of one group (right-padded ``mask``)."""
    lengths = mask.sum(-1)
    width = ids.shape[-1]
    t = torch.arange(width, device=ids.device)
    # Right-aligned and reversed: position j holds the token j places before the last one.
    src = (lengths.unsqueeze(-1) - 1 - t).clamp(min=0)
    rev_ids = ids.gather(-1, src)
    rev_mask = t.unsqueeze(0) < lengths.unsqueeze(-1)
    forward = _initial_conflict_run(ids, mask, pos, neg)
    backward_rev = _initial_conflict_run(rev_ids, rev_mask, pos, neg)
    backward = backward_rev.gather(-1, src) & mask  # position t is j = L − 1 − t
    return forward, backward


class GTPOConflictFilter(TokenFilter):
    """GTPO's conflict-token weights δ_{i,t} / n_i (module doc), [N, T] float ≥ 0. Reads
    ``response_ids`` [N, T] (integer), ``group_ids`` [N] (integer) and ``advantages`` [N]."""

    per_response_advantages = True

    uses_batch_statistics = (
        True  # conflict tokens are found across the responses of a group: micro-batches give a different loss
    )

    inputs = ("response_ids", "group_ids", "advantages")
    name = "gtpo_conflict"

    def __init__(self, conflict_weight: float = 2.0, **keys: Any) -> None:
        super().__init__(**keys)
        ok = isinstance(conflict_weight, int | float) and not isinstance(conflict_weight, bool)
        if not (ok and math.isfinite(conflict_weight) and conflict_weight >= 0):
            raise ValueError(
                f"GTPOConflictFilter: 'conflict_weight' must be a finite number >= 0, got {conflict_weight!r}"
            )
        self.conflict_weight = float(conflict_weight)

    def keep(  # type: ignore[override]
        self, padding: Padding, response_ids: torch.Tensor, group_ids: torch.Tensor, advantages: torch.Tensor
    ) -> torch.Tensor:
        where = type(self).__name__
        n, width = padding.mask.shape
        for key, value, shape in (("response_ids", response_ids, (n, width)), ("group_ids", group_ids, (n,))):
            if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool \
                    or value.is_complex() \
                    or tuple(value.shape) != shape:  # fmt: skip
                got = (
                    f"{value.dtype} {list(value.shape)}"
                    if isinstance(value, torch.Tensor)
                    else type(value).__name__
                )
                raise ValueError(
                    f"{where}: {key!r} must be an integer tensor of shape {list(shape)}, got {got}"
                )
        if (
            not isinstance(advantages, torch.Tensor)
            or not advantages.is_floating_point()
            or tuple(advantages.shape) != (n,)
        ):
            got = (
                f"{advantages.dtype} {list(advantages.shape)}"
                if isinstance(advantages, torch.Tensor)
                else type(advantages).__name__
            )
            raise ValueError(
                f"{where}: 'advantages' must be one per response, shape [N] = [{n}], got {got}; GTPO's conflicts "
                "compare positive and negative completions"
            )
        mask = padding.mask
        ids = torch.where(mask, response_ids, -1)  # padding never matches a token
        adv = torch.where(padding.lengths > 0, advantages.detach(), 0.0)
        weights = torch.ones(n, width, dtype=torch.float64, device=mask.device)
        w = self.conflict_weight
        for g in torch.unique(group_ids):
            rows = (group_ids == g).nonzero().squeeze(-1)
            pos, neg = adv[rows] > 0, adv[rows] < 0
            if not bool(pos.any()) or not bool(neg.any()):
                continue  # no conflict without both signs
            forward, backward = conflict_runs(ids[rows], mask[rows], pos, neg)
            sign_weight = torch.where(pos, w, 0.0).to(torch.float64).unsqueeze(-1)
            delta = torch.where(forward, sign_weight, 1.0) * torch.where(backward, sign_weight, 1.0)
            count = (forward | backward).sum(-1).clamp(min=1).to(torch.float64).unsqueeze(-1)
            active = (pos | neg).unsqueeze(-1)
            weights[rows] = torch.where(active, delta / count, 1.0)
        return weights


class GTPOEntropyShaping(Clipper):
    """GTPO's loss with entropy control (module doc): −Â'_i exp(ρ − sg ρ) per token, [N, T];
    reads ``entropy`` [N, T]. ``clipped`` [N] marks the completions filtered out (H̄_i > threshold)."""

    per_response_advantages = True

    inputs = ("entropy",)

    def __init__(self, entropy_threshold: float = 0.7, entropy_scale: float = 0.1, **keys: Any) -> None:
        super().__init__(max_log_ratio=None, **keys)
        for arg, value in (("entropy_threshold", entropy_threshold), ("entropy_scale", entropy_scale)):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not (ok and value >= 0):
                raise ValueError(f"GTPOEntropyShaping: {arg!r} must be a finite number >= 0, got {value!r}")
        self.entropy_threshold, self.entropy_scale = float(entropy_threshold), float(entropy_scale)
        self.params.update(entropy_threshold=self.entropy_threshold, entropy_scale=self.entropy_scale)

    def surrogate(  # type: ignore[override]
        self, log_ratio: torch.Tensor, advantages: torch.Tensor, padding: Padding, entropy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if advantages.dim() != 1:
            raise ValueError(
                f"GTPOEntropyShaping: 'advantages' must be one per response, shape [N] = [{advantages.shape[0]}], "
                f"got {list(advantages.shape)}"
            )
        if (
            not isinstance(entropy, torch.Tensor)
            or not entropy.is_floating_point()
            or (entropy.shape != padding.mask.shape)
        ):
            got = (
                f"{entropy.dtype} {list(entropy.shape)}"
                if isinstance(entropy, torch.Tensor)
                else type(entropy).__name__
            )
            raise ValueError(
                f"GTPOEntropyShaping: 'entropy' must be a float tensor of shape [N, T] = "
                f"{list(padding.mask.shape)} like 'response_mask', got {got}"
            )
        h = padding.zero(entropy.detach().to(log_ratio.dtype))
        if not bool(torch.isfinite(h).all()):
            raise ValueError(
                "GTPOEntropyShaping: 'entropy' must be finite at the valid positions of 'response_mask'"
            )
        mean_h = padding.row_mean(h)
        low = mean_h <= self.entropy_threshold
        shaped = torch.where(low, advantages - self.entropy_scale * mean_h, 0.0)
        unit = torch.exp(log_ratio - log_ratio.detach())  # value 1, gradient ∇ℓ
        return -(shaped.unsqueeze(-1) * unit), ~low & (padding.lengths > 0)


def gtpo(
    *,
    conflict_weight: float = 2.0,
    entropy_threshold: float = 0.7,
    entropy_scale: float = 0.1,
    advantage_eps: float = 1e-6,
    aggregation: str = "seq-mean-token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "gtpo",
    filters: tuple[TokenFilter, ...] | list[TokenFilter] = (),
    **shared: Any,
) -> Recipe:
    """GTPO (arXiv 2508.03772): group-normalised advantages, token ratios, the conflict-token
    weights of :class:`GTPOConflictFilter` (w = 2) and the entropy-shaped on-policy loss of
    :class:`GTPOEntropyShaping` (threshold 0.7, scale 0.1), mean over completions. Needs
    ``response_ids`` and ``entropy`` in the batch. Extra ``filters`` run after the conflict filter.
    """
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        GTPOEntropyShaping(entropy_threshold, entropy_scale),
        aggregation=aggregation,
        filters=[GTPOConflictFilter(conflict_weight), *filters],
        **shared,
    )
