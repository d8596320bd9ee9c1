"""verl adapter: any recipe's loss as a verl policy loss (``actor.policy_loss.loss_mode``).

verl (tested with 0.9.1) looks policy losses up by name in ``verl.trainer.ppo.core_algos``'s
registry and calls them with keywords::

    pg_loss, pg_metrics = fn(old_log_prob=..., log_prob=..., advantages=..., response_mask=...,
                             loss_agg_mode=config.loss_agg_mode, config=actor_config,
                             rollout_is_weights=... or None)

:func:`register_verl_losses` registers one such function per recipe through verl's own
``register_policy_loss``, under ``prefix + name``: every stock recipe of
:data:`~gspo_components.RECIPES` by default (``"gspo_components/gspo_token"``, ...), or the
recipes you pass, user-written :class:`~gspo_components.Recipe` objects included. Each function
runs the recipe's :class:`~gspo_components.PolicyLoss` (weighter, filters, clipper, objective) on
the tensors verl hands it:

- **aggregation**: verl's ``loss_agg_mode`` (``token-mean``, ``seq-mean-token-mean``,
  ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``); verl's ``token-sum`` has no counterpart
  and raises ``ValueError``. When the mode is not the recipe's own
  (``recipe.loss.objective.aggregation``; verl's ``ActorConfig`` defaults to ``token-mean``,
  GSPO's paper aggregation is ``seq-mean-token-mean``), a ``UserWarning`` says so once per
  process, and the recipe runs with verl's mode.
- **normalisers**: from ``config.global_batch_info`` (``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``, ``dp_size``), which verl fills so that
  micro-batch losses add up to the mini-batch loss across gradient accumulation and ranks. They
  become a :class:`~gspo_components.loss.aggregation.LossNormalizers`; a missing entry falls back to
  this micro-batch's own count, as in verl's ``agg_loss``.
- **clip range**: for a stock recipe (given by name) whose clipper has ``eps_low`` / ``eps_high``
  (PPOClip, CISPOClip, GMPO's log-space clip), ``config.clip_ratio_low`` / ``config.clip_ratio_high``
  (each falling back to ``config.clip_ratio``) rebuild it through its factory,
  ``RECIPES[name](eps_low=..., eps_high=..., aggregation=...)``; the recipe's defaults apply when
  ``config`` is None. A bound the recipe does not have stays off: CISPO (MiniMax-M1) has no lower
  bound, so ``clip_ratio_low`` is not read. A stock recipe without those parameters (SAPO's gate)
  and every :class:`~gspo_components.Recipe` object run as they are; for a Recipe object whose
  clipper has ``eps_low`` / ``eps_high`` different from verl's config, a ``UserWarning`` says so
  once per process (build the recipe with the band you want).
- **advantages**: verl's are [N, T]. A recipe whose clipper takes one advantage per response
  (GMPO's geometric mean; found by running the recipe once on a 1 × 2 batch at construction)
  gets each response's masked mean instead, which is what verl's own ``geo_mean`` does, and is
  exact for verl's outcome-reward estimators (one advantage repeated over the response).
- **rollout correction**: ``rollout_is_weights`` multiplies the per-token loss, detached
  (``recipe.loss(td, is_weights=...)``).
- **what stays in verl**: advantages (``algorithm.adv_estimator``), the KL loss
  (``use_kl_loss``) and the entropy bonus (``entropy_coeff``) are added by verl around the policy
  loss. verl hands a policy loss only log-probs, advantages, the mask and IS weights, so a recipe
  that reads anything else (a KL or entropy term of its own, its own ``rollout_correction``, a
  filter or clipper reading ``entropy``) is refused with a ``ValueError`` naming the entry.

The metrics are verl's three (``actor/pg_clipfrac``, ``actor/ppo_kl``,
``actor/pg_clipfrac_lower``, the last always 0 as no recipe uses a dual clip) plus this
library's under ``actor/gspo_components/`` (the ratio and clip metrics, and ``filtered_<name>``
for each of the recipe's filters), as Python floats.

verl is imported only inside :func:`register_verl_losses`; importing this module needs only
torch and tensordict. verl runs the actor in Ray worker processes, so the registration must
happen in each of them: installing this package declares a ``verl.plugins`` entry point
(:mod:`gspo_components.integrations.verl_plugin`) that verl loads in every process at
``import verl``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from tensordict import TensorDict

from ..loss._checks import check_mask, compute_dtype
from ..loss.aggregation import AGGREGATIONS, LossNormalizers, local_normalizers
from ..loss.objective import Objective
from ..loss.recipes import PolicyLoss, Recipe
from ..loss.registry import RECIPES
from ._recipes import check_inputs, stock_or_recipe

__all__ = ["DEFAULT_PREFIX", "RECIPE_NAMES", "UNSUPPORTED", "register_verl_losses", "verl_policy_loss"]

DEFAULT_PREFIX = "gspo_components/"
RECIPE_NAMES = tuple(RECIPES)
"""The stock recipes' names, ``tuple(gspo_components.RECIPES)`` (kept for existing callers)."""

# What verl passes a policy loss, as the recipe's canonical entries.
VERL_INPUTS = ("log_probs", "old_log_probs", "advantages", "response_mask")
_EXTRA_METRICS = (
    "clip_fraction_low",
    "clip_fraction_high",
    "seq_clip_fraction",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
)
_WARNED: set[tuple[Any, ...]] = set()
UNSUPPORTED: dict[str, str] = {}
"""Stock recipes that ``register_verl_losses()`` left out, with the reason (filled when it runs)."""

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config.name`` for verl's ActorConfig (a dataclass with ``.get``), a DictConfig or a dict."""
    if config is None:
        return default
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(name, default)
    return getattr(config, name, default)


def _clip_params(recipe: Recipe) -> tuple[float | None, float] | None:
    """The clipper's (eps_low, eps_high) when it has both parameters, else None."""
    params = getattr(recipe.loss.clipper, "params", None)
    if not isinstance(params, Mapping) or "eps_low" not in params or "eps_high" not in params:
        return None
    return params["eps_low"], params["eps_high"]


def _config_clip(
    where: str, own: tuple[float | None, float], config: Any, *, required: bool
) -> tuple[float | None, float] | None:
    """verl's (clip_ratio_low, clip_ratio_high), each falling back to clip_ratio; the lower bound
    stays None when the recipe has none (CISPO). None when the config sets neither and not
    ``required``."""
    clip = _config_value(config, "clip_ratio")
    high = _config_value(config, "clip_ratio_high")
    high = clip if high is None else high
    low = _config_value(config, "clip_ratio_low")
    low = clip if low is None else low
    for name, value in (("clip_ratio_high", high), ("clip_ratio_low", low if own[0] is not None else 0)):
        if value is None:
            if required:
                raise ValueError(f"{where}: config has neither {name} nor clip_ratio")
            return None
    return (None if own[0] is None else float(low)), float(high)


def _takes_clip_range(name: str) -> bool:
    params = inspect.signature(RECIPES[name]).parameters
    return "eps_low" in params and "eps_high" in params


@functools.lru_cache(maxsize=128)
def _stock_loss(name: str, eps_low: float | None, eps_high: float | None, aggregation: str) -> PolicyLoss:
    kwargs: dict[str, Any] = {"aggregation": aggregation}
    if eps_high is not None:
        kwargs.update(eps_low=eps_low, eps_high=eps_high)
    return RECIPES[name](**kwargs).loss


def _with_aggregation(loss: PolicyLoss, aggregation: str) -> PolicyLoss:
    """``loss`` with an Objective of the same settings and keys but ``aggregation``; the other
    parts are shared."""
    o = loss.objective
    if o.aggregation == aggregation:
        return loss
    objective = Objective(
        aggregation,
        kl_coef=o.kl_coef,
        kl_estimator=o.kl_estimator,
        entropy_coef=o.entropy_coef,
        max_length=o.max_length,
        sync_ranks=o.sync_ranks,
        process_group=o.process_group,
        in_keys=dict(o._in_map),
        out_keys=dict(o._out_map),
    )
    return PolicyLoss(
        loss.weighter,
        loss.clipper,
        objective,
        rollout_correction=loss.rollout_correction,
        filters=list(loss.filters),
    )


def _takes_token_advantages(loss: PolicyLoss) -> bool:
    """Whether ``loss`` accepts advantages [N, T]: False when a part declares that it needs one
    per response (``per_response_advantages``, e.g. GMPO, VESPO)."""
    return not getattr(loss, "per_response_advantages", False)


def _row_mean(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each response's masked mean advantage, [N] (0 for an empty row), as verl's geo_mean."""
    adv = torch.where(mask, advantages, torch.zeros_like(advantages))
    return adv.sum(-1) / mask.sum(-1).clamp(min=1).to(adv.dtype)


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _normalizers(mask: torch.Tensor, aggregation: str, config: Any) -> LossNormalizers:
    """verl's ``global_batch_info`` as LossNormalizers, with verl's ``agg_loss`` fallbacks."""
    info = _config_value(config, "global_batch_info", None) or {}
    local = local_normalizers(mask)
    dp_size = int(_as_float(info.get("dp_size", 1) or 1))
    tokens = info.get("batch_num_tokens")
    sequences = info.get("global_batch_size")
    scale = info.get("loss_scale_factor")
    needed, value = (
        ("batch_num_tokens", tokens) if aggregation == "token-mean" else ("global_batch_size", sequences)
    )
    if dp_size > 1 and value is None:
        raise ValueError(
            f"verl loss: config.global_batch_info['{needed}'] is required for {aggregation!r} when "
            f"dp_size = {dp_size} > 1 (verl's ppo_loss fills it), got None"
        )
    return LossNormalizers(
        num_tokens=local.num_tokens if tokens is None else _as_float(tokens),
        num_sequences=local.num_sequences if sequences is None else _as_float(sequences),
        max_length=local.max_length if scale is None else _as_float(scale),
        num_replicas=dp_size,
    )


def _warn_once(key: tuple[Any, ...], message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


def _check_aggregation(name: str, own: str, loss_agg_mode: str) -> str:
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(
            f"verl loss {name!r}: loss_agg_mode must be one of {list(AGGREGATIONS)}, got "
            f"{loss_agg_mode!r}"
            + (" (verl's token-sum has no counterpart here)" if loss_agg_mode == "token-sum" else "")
        )
    if loss_agg_mode != own:
        _warn_once(
            (name, "aggregation", own, loss_agg_mode),
            f"gspo_components verl loss {name!r} runs with loss_agg_mode={loss_agg_mode!r} (verl's "
            f"actor.loss_agg_mode); the recipe's own aggregation is {own!r}",
        )
    return loss_agg_mode


def _metric_names(loss: PolicyLoss, weighted: bool) -> list[str]:
    return [
        *_EXTRA_METRICS,
        *(f.metric_name for f in loss.filters),
        *(("is_weight_mean",) if weighted else ()),
    ]


def _metrics(
    loss: PolicyLoss,
    out: TensorDict,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mask: torch.Tensor,
    weighted: bool,
) -> dict[str, float]:
    with torch.no_grad():
        neg_log_ratio = old_log_prob.detach() - log_prob.detach()
        neg_log_ratio = torch.where(mask, neg_log_ratio, torch.zeros_like(neg_log_ratio))
        ppo_kl = neg_log_ratio.sum() / mask.sum().clamp(min=1)
        names = ["actor/pg_clipfrac", "actor/ppo_kl"]
        values = [out[loss.out_key("clip_fraction")], ppo_kl]
        extra = _metric_names(loss, weighted)
        names += [f"actor/gspo_components/{name}" for name in extra]
        values += [out[name if name.startswith("filtered_") else loss.out_key(name)] for name in extra]
        floats = torch.stack([v.float().reshape(()) for v in values]).tolist()  # one device sync
    metrics = dict(zip(names, floats, strict=True))
    metrics["actor/pg_clipfrac_lower"] = 0.0
    return metrics


def _empty_step(
    loss_module: PolicyLoss, log_prob: torch.Tensor, mask: torch.Tensor, weighted: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    # A micro-batch with no valid token contributes nothing, but verl still calls backward on it.
    dtype = compute_dtype(log_prob)
    zero = torch.zeros((), dtype=dtype, device=log_prob.device)
    loss = torch.where(mask, log_prob.to(dtype), zero).sum() * 0.0
    names = ["actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"]
    names += [f"actor/gspo_components/{n}" for n in _metric_names(loss_module, weighted)]
    return loss, dict.fromkeys(names, 0.0)


def verl_policy_loss(recipe: str | Recipe) -> PolicyLossFn:
    """The verl policy-loss function of ``recipe``, unregistered.

    ``recipe`` is the name of a stock recipe (a key of :data:`~gspo_components.RECIPES`; verl's
    clip ratios then rebuild it, see the module docstring) or any
    :class:`~gspo_components.Recipe`, user-written ones included (run as built). Its signature is
    verl's: ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
    rollout_is_weights) -> (pg_loss, pg_metrics)``. It needs no verl import.

    Raises ``ValueError`` for an unknown name, for another type, and for a recipe that reads an
    entry verl does not pass (a KL or entropy term, its own rollout correction, a part reading
    ``entropy`` or ``ref_log_probs``).
    """
    base = stock_or_recipe("verl_policy_loss", recipe)
    stock = isinstance(recipe, str)
    name = recipe if stock else base.name
    own_clip = _clip_params(base)
    clip_from_config = stock and own_clip is not None and _takes_clip_range(name)
    own_aggregation = base.loss.objective.aggregation
    objective = base.loss.objective
    where = f"verl_policy_loss({name!r})"
    if objective.kl_coef > 0:
        raise ValueError(
            f"{where}: the recipe's kl_coef = {objective.kl_coef} > 0, but verl passes a policy loss no "
            "reference log-probs; build it with kl_coef=0 and use verl's actor.use_kl_loss / kl_loss_coef"
        )
    if objective.entropy_coef != 0:
        raise ValueError(
            f"{where}: the recipe's entropy_coef = {objective.entropy_coef} != 0, but verl passes a policy "
            "loss no entropies; build it with entropy_coef=0 and use verl's actor.entropy_coeff"
        )
    if base.loss.rollout_correction is not None:
        raise ValueError(
            f"{where}: the recipe has its own rollout_correction, which reads 'rollout_log_probs'; verl "
            "passes a policy loss its own correction as rollout_is_weights instead (algorithm.rollout_correction); "
            "build the recipe without rollout_correction"
        )
    check_inputs(
        where,
        name,
        base.loss,
        VERL_INPUTS,
        "verl passes a policy loss only old_log_prob, log_prob, advantages, response_mask and rollout_is_weights",
    )
    by_aggregation: dict[str, PolicyLoss] = {own_aggregation: base.loss}
    token_advantages = _takes_token_advantages(base.loss)

    def loss_module_for(aggregation: str, config: Any) -> PolicyLoss:
        if clip_from_config:
            low, high = (
                own_clip
                if config is None
                else _config_clip(f"verl loss {name!r}", own_clip, config, required=True)
            )
            return _stock_loss(name, low, high, aggregation)
        if own_clip is not None and config is not None:
            wanted = _config_clip(f"verl loss {name!r}", own_clip, config, required=False)
            if wanted is not None and wanted != own_clip:
                _warn_once(
                    (name, "clip", wanted, own_clip),
                    f"gspo_components verl loss {name!r}: verl's config sets the clip range "
                    f"(clip_ratio_low, clip_ratio_high) = {wanted}, but this Recipe object runs with its own "
                    f"clipper's (eps_low, eps_high) = {own_clip}; verl's values are not applied (build the "
                    "recipe with the band you want, or register a stock recipe by name)",
                )
        if aggregation not in by_aggregation:
            by_aggregation[aggregation] = _with_aggregation(base.loss, aggregation)
        return by_aggregation[aggregation]

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = own_aggregation,
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        aggregation = _check_aggregation(name, own_aggregation, loss_agg_mode)
        mask = check_mask(f"verl loss {name!r}", "response_mask", response_mask)
        weighted = rollout_is_weights is not None
        loss_module = loss_module_for(aggregation, config)
        if not bool(mask.any()):
            return _empty_step(loss_module, log_prob, mask, weighted)
        if not token_advantages and advantages.dim() == 2:
            advantages = _row_mean(advantages, mask)
        entries = {
            loss_module.key("log_probs"): log_prob,
            loss_module.key("old_log_probs"): old_log_prob,
            loss_module.key("advantages"): advantages,
            loss_module.key("response_mask"): mask,
        }
        td = TensorDict(entries, batch_size=mask.shape[:1])
        out = loss_module(
            td, normalizers=_normalizers(mask, aggregation, config), is_weights=rollout_is_weights
        )
        return out[loss_module.out_key("loss")], _metrics(
            loss_module, out, log_prob, old_log_prob, mask, weighted
        )

    policy_loss.__name__ = f"{name}_policy_loss"
    policy_loss.__qualname__ = f"verl_policy_loss.<{name}>"
    policy_loss.__doc__ = (
        f"gspo_components recipe {name!r} as a verl policy loss (see gspo_components.integrations.verl)."
    )
    return policy_loss


def _named_recipes(recipes: Mapping[str, str | Recipe] | Iterable[str | Recipe]) -> dict[str, str | Recipe]:
    if isinstance(recipes, str | Recipe):
        recipes = [recipes]
    if isinstance(recipes, Mapping):
        items = list(recipes.items())
    else:
        items = [(r.name if isinstance(r, Recipe) else r, r) for r in recipes]
    named: dict[str, str | Recipe] = {}
    for name, recipe in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"register_verl_losses: every name must be a non-empty str, got {name!r}")
        if name in named:
            raise ValueError(f"register_verl_losses: two recipes would be registered as {name!r}")
        named[name] = recipe
    return named


def register_verl_losses(
    prefix: str = DEFAULT_PREFIX,
    recipes: Mapping[str, str | Recipe] | Iterable[str | Recipe] | None = None,
) -> dict[str, PolicyLossFn]:
    """Register recipes' losses with verl's ``register_policy_loss`` as ``prefix + name``.

    ``recipes``: None (default) registers every stock recipe of :data:`~gspo_components.RECIPES`
    under its name; otherwise stock names and :class:`~gspo_components.Recipe` objects (each
    registered under ``recipe.name``), or a mapping ``{name: recipe}``. Returns ``{registered
    name: function}``. Select one in verl's config with
    ``actor_rollout_ref.actor.policy_loss.loss_mode=gspo_components/gspo_token``. Registering
    again replaces the earlier entry (verl's registry is a plain dict).

    With ``recipes=None`` a stock recipe that verl cannot feed (one whose parts read an entry verl
    does not pass a policy loss, e.g. ``entropy``; :func:`verl_policy_loss` refuses it) is not
    registered, and its reason is kept in :data:`UNSUPPORTED`, so that the ``import verl``
    plugin never fails; a recipe you name is refused with its ``ValueError``.
    """
    from verl.trainer.ppo.core_algos import register_policy_loss

    registered = {}
    if recipes is None:
        functions = {}
        for name in RECIPES:
            try:
                functions[name] = verl_policy_loss(name)
            except ValueError as err:
                UNSUPPORTED[name] = str(err)
    else:
        functions = {name: verl_policy_loss(r) for name, r in _named_recipes(recipes).items()}
    for name, fn in functions.items():
        registered[f"{prefix}{name}"] = register_policy_loss(f"{prefix}{name}")(fn)
    return registered
