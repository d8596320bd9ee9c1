"""Recipes: one part per role, composed.

Like ``optax.adamw`` being a chain of small transforms, a recipe picks an AdvantageEstimator, an
ImportanceWeighter, a Clipper and an Objective, and returns a :class:`Recipe` with

- ``.advantage``: run once per rollout batch (``rewards``, ``group_ids`` → ``advantages``);
- ``.loss``: run per minibatch (``log_probs``, ``old_log_probs``, ``advantages``,
  ``response_mask`` → a new TensorDict with ``loss`` and metrics).

===============  ======================  ========================  =====================  ====================
recipe           advantage               weighter                  clipper                aggregation
===============  ======================  ========================  =====================  ====================
``grpo``         group mean/std          token                     PPO 0.2 / 0.2          seq-mean-token-mean
``gspo``         group mean/std          sequence (geometric)      PPO 3e-4 / 4e-4        seq-mean-token-mean
``gspo_token``   group mean/std or       sequence-token            PPO 3e-4 / 4e-4        seq-mean-token-mean
                 per token
``dr_grpo``      group mean only         token                     PPO 0.2 / 0.2          seq-mean-token-sum-norm
``dapo``         group mean/std          token                     PPO 0.2 / 0.28         token-mean
``cispo``        group mean/std          token                     CISPO (ε_high 0.28)    token-mean
===============  ======================  ========================  =====================  ====================

A new algorithm is a new composition, not a subclass: build a :class:`PolicyLoss` from any parts
and wrap it in a :class:`Recipe`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tensordict import NestedKey, TensorDictBase
from tensordict.nn import TensorDictModuleBase

from ._checks import DeferredChecks
from .advantages import (
    GroupMeanAdvantage,
    GroupNormalizedAdvantage,
    PerTokenAdvantage,
)
from .aggregation import LossNormalizers, step_normalizers
from .clipping import CISPOClip, PPOClip, _ClipperModule
from .importance import SequenceLogRatio, SequenceTokenLogRatio, TokenLogRatio, _LogRatioModule
from .objective import Objective
from .rollout_correction import RolloutCorrection

__all__ = ["PolicyLoss", "Recipe", "cispo", "dapo", "dr_grpo", "grpo", "gspo", "gspo_token"]


class PolicyLoss(TensorDictModuleBase):
    """weighter → [rollout correction] → clipper → objective, as one TensorDict module.

    It works on a shallow copy of the input, so the caller's TensorDict is not modified, and
    returns the Objective's output: a new TensorDict of batch size ``[]`` with ``loss`` and the
    metrics. ``forward(td, normalizers=...)`` passes the step's normalisers to the Objective.

    **One pass.** When every part is a stock part (not a subclass overriding ``forward``) and
    each intermediate key (``log_ratio``, ``is_weights``, ``token_loss``, ``clipped``) is read only
    by the part after the one that writes it, the chain runs as one pass: the inputs are validated
    and their padding cleaned once, a sequence-level ratio stays one number per row ([N]) through
    the clipper and the aggregation, the metrics reuse the loss's tensors, and every value check
    is resolved with one host synchronisation (none with validation off). The result, values and
    gradients, is that of running the four modules one after the other, up to floating-point
    summation order; otherwise they are run one after the other.
    """

    def __init__(
        self,
        weighter: TensorDictModuleBase,
        clipper: TensorDictModuleBase,
        objective: Objective,
        *,
        rollout_correction: TensorDictModuleBase | None = None,
    ) -> None:
        super().__init__()
        self.weighter = weighter
        self.rollout_correction = rollout_correction
        self.clipper = clipper
        self.objective = objective
        parts = [p for p in (weighter, rollout_correction, clipper, objective) if p is not None]
        produced: set = set()
        in_keys: list = []
        for part in parts:
            for key in part.in_keys:
                if key not in produced and key not in in_keys:
                    in_keys.append(key)
            produced.update(part.out_keys)
        self.in_keys = in_keys
        self.out_keys = list(objective.out_keys)
        self._one_pass = self._can_run_in_one_pass()

    def _can_run_in_one_pass(self) -> bool:
        w, rc, c, o = self.weighter, self.rollout_correction, self.clipper, self.objective
        stock = (
            isinstance(w, _LogRatioModule)
            and type(w).forward is _LogRatioModule.forward
            and isinstance(c, _ClipperModule)
            and type(c).forward is _ClipperModule.forward
            and type(o).forward is Objective.forward
            and (
                rc is None
                or (isinstance(rc, RolloutCorrection) and type(rc).forward is RolloutCorrection.forward)
            )
        )
        if not stock:
            return False
        links = {
            w.out_key("log_ratio"): [c.key("log_ratio"), o.key("log_ratio")],
            c.out_key("token_loss"): [o.key("token_loss")],
            c.out_key("clipped"): [o.key("clipped")],
        }
        if rc is not None:
            links[rc.out_key("is_weights")] = [o.key("is_weights")]
        if any(key != produced for produced, readers in links.items() for key in readers):
            return False
        external = [w.key("log_probs"), w.key("old_log_probs"), c.key("advantages")]
        external += [o.key(n) for n in ("log_probs", "ref_log_probs", "entropy") if n in o._in_map]
        if rc is not None:
            external += [rc.key("old_log_probs"), rc.key("rollout_log_probs"), rc.key("response_mask")]
        if o._in_map.get("is_weights") is not None and rc is None:
            external.append(o.key("is_weights"))
        mask_key = w.key("response_mask")
        if any(part.key("response_mask") != mask_key for part in (c, o)):
            return False
        if rc is not None and rc.key("response_mask") != mask_key:
            return False
        produced_keys = list(links)
        return len(set(produced_keys)) == len(produced_keys) and not set(produced_keys) & set(
            [*external, mask_key]
        )

    def key(self, name: str) -> NestedKey:
        """The key the chain uses for the canonical entry ``name``: that of the first part, in
        chain order, that declares it (``KeyError`` when none does)."""
        for part in (self.weighter, self.rollout_correction, self.clipper, self.objective):
            lookup = getattr(part, "key", None)
            if lookup is None:
                continue
            try:
                return lookup(name)
            except KeyError:
                continue
        raise KeyError(name)

    def out_key(self, name: str) -> NestedKey:
        """The key of the output ``name`` (``loss`` or a metric): the Objective's."""
        return self.objective.out_key(name)

    def forward(
        self, tensordict: TensorDictBase, *, normalizers: LossNormalizers | None = None
    ) -> TensorDictBase:
        if not isinstance(tensordict, TensorDictBase):
            raise ValueError(
                f"PolicyLoss: expects a TensorDict of batch size [N], got {type(tensordict).__name__}"
            )
        if self._one_pass:
            return self._forward_one_pass(tensordict, normalizers)
        work = tensordict.copy()
        work = self.weighter(work)
        if self.rollout_correction is not None:
            work = self.rollout_correction(work)
        work = self.clipper(work)
        return self.objective(work, normalizers=normalizers)

    def _forward_one_pass(self, td: TensorDictBase, normalizers: LossNormalizers | None) -> TensorDictBase:
        checks = DeferredChecks("PolicyLoss")
        log_ratio, pad = self.weighter._chain(td, checks)
        is_weights = None
        if self.rollout_correction is not None:
            is_weights = self.rollout_correction._chain(td, pad, checks)
        else:
            is_weights = self.objective._read_optional(td, "is_weights")
            if is_weights is not None:
                is_weights = self.objective._clean_is_weights(is_weights, pad, log_ratio.dtype)
        neg, clipped, high, ratio = self.clipper._chain(td, log_ratio, pad, checks)
        return self.objective._compute(
            td, pad, neg, clipped, log_ratio, is_weights, normalizers, checks, high, ratio
        )


@dataclass(frozen=True)
class Recipe:
    """An algorithm: ``advantage`` (once per rollout batch) and ``loss`` (per minibatch)."""

    name: str
    advantage: TensorDictModuleBase
    loss: PolicyLoss

    def step_normalizers(
        self, micro_batches: torch.Tensor | Iterable[object], **kwargs: object
    ) -> LossNormalizers:
        """:func:`~gspo_components.loss.aggregation.step_normalizers` with this recipe's objective
        settings (``max_length``, ``sync_ranks``, ``process_group``) as defaults."""
        objective = self.loss.objective
        kwargs.setdefault("max_length", objective.max_length)
        kwargs.setdefault("sync_ranks", objective.sync_ranks)
        kwargs.setdefault("process_group", objective.process_group)
        return step_normalizers(micro_batches, **kwargs)  # type: ignore[arg-type]


def _objective(
    aggregation: str,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    max_length: int | None,
) -> Objective:
    return Objective(
        aggregation,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        max_length=max_length,
    )


def grpo(
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq-mean-token-mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    dual_clip: float | None = None,
    advantage_eps: float = 1e-6,
    entropy_coef: float = 0.0,
    max_length: int | None = None,
    advantage: TensorDictModuleBase | None = None,
    rollout_correction: TensorDictModuleBase | None = None,
) -> Recipe:
    """GRPO (DeepSeekMath, arXiv 2402.03300): token ratios, PPO clip, optional k3 KL.

    J = (1/G) Σ_i (1/L_i) Σ_t [min(w_{i,t} Â_i, clip(w_{i,t}) Â_i) − β k3_{i,t}].
    """
    return Recipe(
        "grpo",
        advantage or GroupNormalizedAdvantage(advantage_eps),
        PolicyLoss(
            TokenLogRatio(),
            PPOClip(eps_low, eps_high, dual_clip=dual_clip),
            _objective(aggregation, kl_coef, kl_estimator, entropy_coef, max_length),
            rollout_correction=rollout_correction,
        ),
    )


def gspo(
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    aggregation: str = "seq-mean-token-mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    advantage_eps: float = 1e-6,
    entropy_coef: float = 0.0,
    max_length: int | None = None,
    advantage: TensorDictModuleBase | None = None,
    rollout_correction: TensorDictModuleBase | None = None,
) -> Recipe:
    """GSPO (Zheng et al., arXiv 2507.18071, eqs. 5–7): sequence ratio, sequence clip.

    s_i = exp((1/L_i) Σ_t (ℓ_{i,t} − ℓ^old_{i,t})), J = (1/G) Σ_i min(s_i Â_i, clip(s_i) Â_i),
    with the paper's ε = 3e-4 / 4e-4 and no KL term by default.
    """
    return Recipe(
        "gspo",
        advantage or GroupNormalizedAdvantage(advantage_eps),
        PolicyLoss(
            SequenceLogRatio(),
            PPOClip(eps_low, eps_high),
            _objective(aggregation, kl_coef, kl_estimator, entropy_coef, max_length),
            rollout_correction=rollout_correction,
        ),
    )


def gspo_token(
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    aggregation: str = "seq-mean-token-mean",
    per_token_advantages: bool = False,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    advantage_eps: float = 1e-6,
    entropy_coef: float = 0.0,
    max_length: int | None = None,
    advantage: TensorDictModuleBase | None = None,
    rollout_correction: TensorDictModuleBase | None = None,
) -> Recipe:
    """GSPO-token (arXiv 2507.18071, eqs. 13–14): s_{i,t} = sg[s_i] · exp(ℓ_{i,t} − sg[ℓ_{i,t}]).

    J = (1/G) Σ_i (1/L_i) Σ_t min(s_{i,t} Â_{i,t}, clip(s_{i,t}) Â_{i,t}). Its ``.loss`` accepts
    advantages [N] or [N, T]; with Â_{i,t} = Â_i it equals GSPO in value and gradient. With
    ``per_token_advantages=True``, ``.advantage`` passes ``token_advantages`` [N, T] through.
    """
    if advantage is None:
        advantage = PerTokenAdvantage() if per_token_advantages else GroupNormalizedAdvantage(advantage_eps)
    return Recipe(
        "gspo_token",
        advantage,
        PolicyLoss(
            SequenceTokenLogRatio(),
            PPOClip(eps_low, eps_high),
            _objective(aggregation, kl_coef, kl_estimator, entropy_coef, max_length),
            rollout_correction=rollout_correction,
        ),
    )


def dr_grpo(
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq-mean-token-sum-norm",
    max_length: int | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    advantage: TensorDictModuleBase | None = None,
    rollout_correction: TensorDictModuleBase | None = None,
) -> Recipe:
    """Dr.GRPO (Liu et al., arXiv 2503.20783): no std division, no length normalisation.

    Â_i = r_i − mean_g r; loss Σ_i Σ_t / (G · L_max) with L_max = ``max_length`` (the generation
    budget; default: the padded width).
    """
    return Recipe(
        "dr_grpo",
        advantage or GroupMeanAdvantage(),
        PolicyLoss(
            TokenLogRatio(),
            PPOClip(eps_low, eps_high),
            _objective(aggregation, kl_coef, kl_estimator, entropy_coef, max_length),
            rollout_correction=rollout_correction,
        ),
    )


def dapo(
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    aggregation: str = "token-mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    advantage_eps: float = 1e-6,
    entropy_coef: float = 0.0,
    max_length: int | None = None,
    advantage: TensorDictModuleBase | None = None,
    rollout_correction: TensorDictModuleBase | None = None,
) -> Recipe:
    """DAPO's loss (Yu et al., arXiv 2503.14476): clip-higher 0.2 / 0.28, token-level mean.

    J = Σ_i Σ_t min(w Â, clip(w) Â) / Σ_i L_i. DAPO's dynamic sampling and overlong shaping are
    data- and reward-side and live outside the loss.
    """
    return Recipe(
        "dapo",
        advantage or GroupNormalizedAdvantage(advantage_eps),
        PolicyLoss(
            TokenLogRatio(),
            PPOClip(eps_low, eps_high),
            _objective(aggregation, kl_coef, kl_estimator, entropy_coef, max_length),
            rollout_correction=rollout_correction,
        ),
    )


def cispo(
    *,
    eps_high: float = 0.28,
    eps_low: float | None = None,
    aggregation: str = "token-mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    advantage_eps: float = 1e-6,
    entropy_coef: float = 0.0,
    max_length: int | None = None,
    advantage: TensorDictModuleBase | None = None,
    rollout_correction: TensorDictModuleBase | None = None,
) -> Recipe:
    """CISPO (MiniMax-M1, arXiv 2506.13585): loss −sg(min(w, 1+ε_high)) Â ℓ, token-mean.

    Every token keeps a gradient; only the IS weight is truncated (no lower bound by default).
    """
    return Recipe(
        "cispo",
        advantage or GroupNormalizedAdvantage(advantage_eps),
        PolicyLoss(
            TokenLogRatio(),
            CISPOClip(eps_high, eps_low=eps_low),
            _objective(aggregation, kl_coef, kl_estimator, entropy_coef, max_length),
            rollout_correction=rollout_correction,
        ),
    )
