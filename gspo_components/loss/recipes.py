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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import NestedKey, TensorDictBase
from tensordict.nn import TensorDictModuleBase

from ._checks import DeferredChecks, check_mask
from .advantages import (
    GroupMeanAdvantage,
    GroupNormalizedAdvantage,
    PerTokenAdvantage,
)
from .aggregation import LossNormalizers, step_normalizers
from .clipping import CISPOClip, Clipper, PPOClip, SAPOGate, _KernelClipper
from .filters import TokenFilter, filter_weights
from .importance import ImportanceWeighter, SequenceLogRatio, SequenceTokenLogRatio, TokenLogRatio
from .numerics import Padding
from .objective import Objective
from .rollout_correction import RolloutCorrection

__all__ = [
    "PolicyLoss",
    "Recipe",
    "cispo",
    "compose",
    "dapo",
    "dr_grpo",
    "grpo",
    "gspo",
    "gspo_token",
    "sapo",
]


class PolicyLoss(TensorDictModuleBase):
    """weighter → [rollout correction] → [filters] → clipper → objective, as one TensorDict module.

    It works on a shallow copy of the input, so the caller's TensorDict is not modified, and
    returns the Objective's output: a new TensorDict of batch size ``[]`` with ``loss``, the
    metrics and each filter's ``filtered_<name>``. ``forward(td, normalizers=..., is_weights=...)``
    passes the step's normalisers to the Objective and takes rollout-correction weights computed
    outside the chain.

    **One pass.** When every part builds on a role base without overriding ``forward`` (user
    parts included) and each intermediate key (``log_ratio``, ``is_weights``, ``token_loss``,
    ``clipped``) is read only by the part after the one that writes it, the chain runs as one pass: the inputs are validated
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
        filters: Sequence[TokenFilter] = (),
    ) -> None:
        super().__init__()
        for role, part, base in (
            ("weighter", weighter, "ImportanceWeighter"),
            ("clipper", clipper, "Clipper"),
            ("objective", objective, "Objective"),
            ("rollout_correction", rollout_correction, "RolloutCorrection"),
        ):
            if not isinstance(part, TensorDictModuleBase) and not (
                role == "rollout_correction" and part is None
            ):
                raise ValueError(
                    f"PolicyLoss: {role!r} must be a TensorDict module (a {base}), got {type(part).__name__}"
                )
        self.weighter = weighter
        self.rollout_correction = rollout_correction
        self.clipper = clipper
        self.objective = objective
        filters = list(filters)
        for f in filters:
            if not isinstance(f, TokenFilter):
                raise ValueError(
                    f"PolicyLoss: every filter must be a TokenFilter, got {type(f).__name__}; "
                    "subclass gspo_components.TokenFilter and implement keep()"
                )
        names = [f.metric_name for f in filters]
        if len(set(names)) != len(names):
            raise ValueError(f"PolicyLoss: two filters report under the same metric name: {names}")
        self.filters = torch.nn.ModuleList(filters)
        parts = [p for p in (weighter, rollout_correction, *filters, clipper, objective) if p is not None]
        produced: set = set()
        in_keys: list = []
        for part in parts:
            for key in part.in_keys:
                if key not in produced and key not in in_keys:
                    in_keys.append(key)
            produced.update(part.out_keys)
        intermediates = {objective.key("is_weights"), objective.key("loss_weights")}
        self.in_keys = [k for k in in_keys if k not in intermediates]
        self.out_keys = list(objective.out_keys) + names
        self._one_pass = self._can_run_in_one_pass()

    def _can_run_in_one_pass(self) -> bool:
        w, rc, c, o = self.weighter, self.rollout_correction, self.clipper, self.objective
        stock = (
            isinstance(w, ImportanceWeighter)
            and type(w).forward is ImportanceWeighter.forward
            and isinstance(c, Clipper)
            and type(c).forward in (Clipper.forward, _KernelClipper.forward)
            and type(o).forward is Objective.forward
            and all(type(f).forward is TokenFilter.forward for f in self.filters)
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
        external += [c.key(n) for n in c.inputs]
        external += [f.key(n) for f in self.filters for n in f.inputs]
        external += [o.key(n) for n in ("log_probs", "ref_log_probs", "entropy") if n in o._in_map]
        if rc is not None:
            external += [rc.key("old_log_probs"), rc.key("rollout_log_probs"), rc.key("response_mask")]
        if o._in_map.get("is_weights") is not None and rc is None:
            external.append(o.key("is_weights"))
        mask_key = w.key("response_mask")
        if any(part.key("response_mask") != mask_key for part in (c, o, *self.filters)):
            return False
        if rc is not None and rc.key("response_mask") != mask_key:
            return False
        produced_keys = list(links)
        return len(set(produced_keys)) == len(produced_keys) and not set(produced_keys) & set(
            [*external, mask_key]
        )

    @property
    def per_response_advantages(self) -> bool:
        """Whether a part of the chain needs one advantage per response ([N], not [N, T])."""
        parts = (*self.filters, self.clipper)
        return any(getattr(p, "per_response_advantages", False) for p in parts)

    @property
    def micro_batch_exact(self) -> bool:
        """Whether micro-batches with the step's normalisers reproduce the whole batch's loss and
        gradient exactly: False when a part computes statistics over the call's batch
        (``uses_batch_statistics``), e.g. a top-entropy quantile or M2PO's second-moment budget."""
        parts = (self.weighter, self.rollout_correction, *self.filters, self.clipper)
        return not any(getattr(p, "uses_batch_statistics", False) for p in parts if p is not None)

    @property
    def required_keys(self) -> list[NestedKey]:
        """The batch keys the chain cannot run without (its parts' required inputs, less what an
        earlier part writes): e.g. ``entropy`` when a filter or clipper reads it."""
        keys: list[NestedKey] = []
        produced: set = set()
        parts = (self.weighter, self.rollout_correction, *self.filters, self.clipper, self.objective)
        for part in (p for p in parts if p is not None):
            for name in getattr(part, "_required_in", ()):
                key = part.key(name)
                if key not in produced and key not in keys:
                    keys.append(key)
            produced.update(part.out_keys)
        return keys

    def key(self, name: str) -> NestedKey:
        """The key the chain uses for the canonical entry ``name``: that of the first part, in
        chain order, that declares it (``KeyError`` when none does)."""
        for part in (self.weighter, self.rollout_correction, *self.filters, self.clipper, self.objective):
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
        self,
        tensordict: TensorDictBase,
        *,
        normalizers: LossNormalizers | None = None,
        is_weights: torch.Tensor | None = None,
    ) -> TensorDictBase:
        """The loss and metrics of one (micro-)batch.

        ``is_weights`` ([N, T] or [N], detached) are rollout-correction weights computed outside
        the chain, e.g. by a trainer's own correction; they are refused with a ``rollout_correction``
        part. The batch itself must not carry ``is_weights`` or ``loss_weights``: those are the
        chain's intermediates, and a stale entry (from another recipe or step) would silently
        rescale the loss, so it is a ``ValueError``.
        """
        if not isinstance(tensordict, TensorDictBase):
            raise ValueError(
                f"PolicyLoss: expects a TensorDict of batch size [N], got {type(tensordict).__name__}"
            )
        self._check_external_weights(tensordict, is_weights)
        if self._one_pass:
            return self._forward_one_pass(tensordict, normalizers, is_weights)
        work = tensordict.copy()
        work = self.weighter(work)
        if self.rollout_correction is not None:
            work = self.rollout_correction(work)
        elif is_weights is not None:
            work.set(self.objective.key("is_weights"), is_weights)
        metrics: dict[str, torch.Tensor] = {}
        if len(self.filters):
            mask = check_mask("PolicyLoss", "response_mask", work.get(self.objective.key("response_mask")))
            pad = Padding(mask)
            weights, metrics = filter_weights(list(self.filters), work, pad, torch.float32)
            if weights is not None and weights.dim() == 1:
                weights = pad.broadcast(weights)
            work.set(self.objective.key("loss_weights"), weights)
        work = self.clipper(work)
        out = self.objective(work, normalizers=normalizers)
        for name, value in metrics.items():
            out.set(name, value)
        return out

    def _check_external_weights(self, td: TensorDictBase, is_weights: torch.Tensor | None) -> None:
        for name in ("is_weights", "loss_weights"):
            key = self.objective.key(name)
            if key in td.keys(include_nested=True):
                raise ValueError(
                    f"PolicyLoss: the batch holds {key!r}, an intermediate of the chain (written by its "
                    "rollout correction and filters); a stale entry would rescale the loss. Drop it, and "
                    "pass weights computed outside the chain as loss(td, is_weights=...)"
                )
        if is_weights is not None and self.rollout_correction is not None:
            raise ValueError(
                "PolicyLoss: is_weights= was passed, but this chain has its own rollout_correction; "
                "use one of the two"
            )

    def _forward_one_pass(
        self, td: TensorDictBase, normalizers: LossNormalizers | None, external: torch.Tensor | None = None
    ) -> TensorDictBase:
        checks = DeferredChecks("PolicyLoss")
        log_ratio, pad = self.weighter._chain(td, checks)
        is_weights = None
        if self.rollout_correction is not None:
            is_weights = self.rollout_correction._chain(td, pad, checks)
        else:
            is_weights = external
            if is_weights is not None:
                is_weights = self.objective._clean_weights("is_weights", is_weights, pad, log_ratio.dtype)
        loss_weights = None
        metrics: dict[str, torch.Tensor] = {}
        if len(self.filters):
            loss_weights, metrics = filter_weights(list(self.filters), td, pad, log_ratio.dtype)
        neg, clipped, high, ratio = self.clipper._chain(td, log_ratio, pad, checks)
        out = self.objective._compute(
            td,
            pad,
            neg,
            clipped,
            log_ratio,
            is_weights,
            normalizers,
            checks,
            high,
            ratio,
            loss_weights=loss_weights,
            neg_masked=isinstance(self.clipper, _KernelClipper),  # a stock kernel's −J is 0 at padding
        )
        for name, value in metrics.items():
            out.set(name, value)
        return out


@dataclass(frozen=True)
class Recipe:
    """An algorithm: ``advantage`` (once per rollout batch) and ``loss`` (per minibatch).

    ``name`` is what loops and adapters log it as; every stock recipe takes ``name=`` so that a
    variant (say ``gspo(advantage=LeaveOneOutAdvantage(), name="gspo-rloo")``) logs as itself.
    Construction refuses parts that cannot work together: per-token advantages with a weighter
    whose ratio is one number per response (``level = "sequence"``).
    """

    name: str
    advantage: TensorDictModuleBase
    loss: PolicyLoss

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Recipe: 'name' must be a non-empty str, got {self.name!r}")
        for role, part in (("advantage", self.advantage), ("loss", self.loss)):
            if not isinstance(part, torch.nn.Module):
                raise ValueError(
                    f"Recipe {self.name!r}: {role!r} must be a module (an AdvantageEstimator, a PolicyLoss), "
                    f"got {type(part).__name__}"
                )
        if getattr(self.advantage, "per_token", False) and getattr(
            self.loss, "per_response_advantages", False
        ):
            parts = [*self.loss.filters, self.loss.clipper]
            needs = [type(p).__name__ for p in parts if getattr(p, "per_response_advantages", False)]
            raise ValueError(
                f"Recipe {self.name!r}: {', '.join(needs)} needs one advantage per response ([N]), but "
                f"the advantage part {type(self.advantage).__name__} gives advantages per token ([N, T])"
            )
        level = getattr(getattr(self.loss, "weighter", None), "level", None)
        if level == "sequence" and getattr(self.advantage, "per_token", False):
            raise ValueError(
                f"Recipe {self.name!r}: {type(self.loss.weighter).__name__} gives one ratio per response "
                f"(level 'sequence'), which has no per-token advantage, but the advantage part "
                f"{type(self.advantage).__name__} gives advantages per token; use gspo_token "
                "(SequenceTokenLogRatio), whose ratio has a token-wise gradient"
            )

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


def compose(
    name: str,
    advantage: TensorDictModuleBase,
    weighter: TensorDictModuleBase,
    clipper: TensorDictModuleBase,
    *,
    aggregation: str = "seq-mean-token-mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    max_length: int | None = None,
    rollout_correction: TensorDictModuleBase | None = None,
    filters: Sequence[TokenFilter] = (),
) -> Recipe:
    """A :class:`Recipe` from one part per role and the Objective's settings: what every stock
    recipe is, and the shortest way to write a new one."""
    objective = Objective(
        aggregation,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        max_length=max_length,
    )
    loss = PolicyLoss(weighter, clipper, objective, rollout_correction=rollout_correction, filters=filters)
    return Recipe(name, advantage, loss)


_SHARED_ARGS = """
    Shared keyword arguments: ``aggregation``, ``kl_coef`` (β), ``kl_estimator``,
    ``entropy_coef``, ``max_length`` (the Objective's), ``advantage`` (replaces the default
    AdvantageEstimator), ``rollout_correction``, ``filters`` (TokenFilters) and ``name`` (what the
    recipe logs as)."""


def grpo(
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    advantage_eps: float = 1e-6,
    aggregation: str = "seq-mean-token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "grpo",
    **shared: Any,
) -> Recipe:
    """GRPO (DeepSeekMath, arXiv 2402.03300): token ratios, PPO clip, optional k3 KL.

    J = (1/G) Σ_i (1/L_i) Σ_t [min(w_{i,t} Â_i, clip(w_{i,t}) Â_i) − β k3_{i,t}]. ``dual_clip = c``
    bounds the loss of Â < 0 at c Â (INTELLECT-2's two-sided clip δ is the same thing).
    """
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        PPOClip(eps_low, eps_high, dual_clip=dual_clip),
        aggregation=aggregation,
        **shared,
    )


def gspo(
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    advantage_eps: float = 1e-6,
    aggregation: str = "seq-mean-token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "gspo",
    **shared: Any,
) -> Recipe:
    """GSPO (Zheng et al., arXiv 2507.18071, eqs. 5–7): sequence ratio, sequence clip.

    s_i = exp((1/L_i) Σ_t (ℓ_{i,t} − ℓ^old_{i,t})), J = (1/G) Σ_i min(s_i Â_i, clip(s_i) Â_i),
    with the paper's ε = 3e-4 / 4e-4 and no KL term by default. Per-token advantages are refused
    (the ratio is one number per response); use :func:`gspo_token` for them.
    """
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        SequenceLogRatio(),
        PPOClip(eps_low, eps_high),
        aggregation=aggregation,
        **shared,
    )


def gspo_token(
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    per_token_advantages: bool = False,
    advantage_eps: float = 1e-6,
    aggregation: str = "seq-mean-token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "gspo_token",
    **shared: Any,
) -> Recipe:
    """GSPO-token (arXiv 2507.18071, eqs. 13–14): s_{i,t} = sg[s_i] · exp(ℓ_{i,t} − sg[ℓ_{i,t}]).

    J = (1/G) Σ_i (1/L_i) Σ_t min(s_{i,t} Â_{i,t}, clip(s_{i,t}) Â_{i,t}). Its ``.loss`` accepts
    advantages [N] or [N, T]; with Â_{i,t} = Â_i it equals GSPO in value and gradient. With
    ``per_token_advantages=True``, ``.advantage`` passes ``token_advantages`` [N, T] through.
    """
    if advantage is None:
        advantage = PerTokenAdvantage() if per_token_advantages else GroupNormalizedAdvantage(advantage_eps)
    return compose(
        name,
        advantage,
        SequenceTokenLogRatio(),
        PPOClip(eps_low, eps_high),
        aggregation=aggregation,
        **shared,
    )


def dr_grpo(
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq-mean-token-sum-norm",
    advantage: TensorDictModuleBase | None = None,
    name: str = "dr_grpo",
    **shared: Any,
) -> Recipe:
    """Dr.GRPO (Liu et al., arXiv 2503.20783): no std division, no length normalisation.

    Â_i = r_i − mean_g r; loss Σ_i Σ_t / (G · L_max) with L_max = ``max_length`` (the generation
    budget; default: the padded width).
    """
    return compose(
        name,
        advantage or GroupMeanAdvantage(),
        TokenLogRatio(),
        PPOClip(eps_low, eps_high),
        aggregation=aggregation,
        **shared,
    )


def dapo(
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    advantage_eps: float = 1e-6,
    aggregation: str = "token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "dapo",
    **shared: Any,
) -> Recipe:
    """DAPO's loss (Yu et al., arXiv 2503.14476): clip-higher 0.2 / 0.28, token-level mean.

    J = Σ_i Σ_t min(w Â, clip(w) Â) / Σ_i L_i. DAPO's dynamic sampling is data-side (the loop's
    ``group_filter``) and its overlong shaping reward-side (``OverlongPenalty``).
    """
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        PPOClip(eps_low, eps_high),
        aggregation=aggregation,
        **shared,
    )


def cispo(
    *,
    eps_high: float = 0.28,
    eps_low: float | None = None,
    advantage_eps: float = 1e-6,
    aggregation: str = "token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "cispo",
    **shared: Any,
) -> Recipe:
    """CISPO (MiniMax-M1, arXiv 2506.13585): loss −sg(min(w, 1+ε_high)) Â ℓ, token-mean.

    Every token keeps a gradient; only the IS weight is truncated (no lower bound by default).
    """
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        CISPOClip(eps_high, eps_low=eps_low),
        aggregation=aggregation,
        **shared,
    )


def sapo(
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    advantage_eps: float = 1e-6,
    aggregation: str = "seq-mean-token-mean",
    advantage: TensorDictModuleBase | None = None,
    name: str = "sapo",
    **shared: Any,
) -> Recipe:
    """SAPO (Gao et al., "Soft Adaptive Policy Optimization", arXiv 2511.20347): a soft gate in
    place of the hard clip, on token ratios.

    J = (1/G) Σ_i (1/L_i) Σ_t f_{τ_i}(w_{i,t}) Â_i, f_τ(w) = (4/τ) σ(τ (w − 1)), τ = τ_pos for
    Â > 0 and τ_neg for Â < 0, with the paper's τ_pos = 1.0 and τ_neg = 1.05 (τ_neg > τ_pos damps
    negative updates faster).
    """
    return compose(
        name,
        advantage or GroupNormalizedAdvantage(advantage_eps),
        TokenLogRatio(),
        SAPOGate(tau_pos, tau_neg),
        aggregation=aggregation,
        **shared,
    )


for _recipe in (grpo, gspo, gspo_token, dr_grpo, dapo, cispo, sapo):
    _recipe.__doc__ = (_recipe.__doc__ or "") + _SHARED_ARGS
