"""verl adapter: each recipe's loss as a verl policy loss (``actor.policy_loss.loss_mode``).

verl (tested with 0.9.1) looks policy losses up by name in ``verl.trainer.ppo.core_algos``'s
registry and calls them with keywords::

    pg_loss, pg_metrics = fn(old_log_prob=..., log_prob=..., advantages=..., response_mask=...,
                             loss_agg_mode=config.loss_agg_mode, config=actor_config,
                             rollout_is_weights=... or None)

:func:`register_verl_losses` registers one such function per recipe through verl's own
``register_policy_loss``, under ``prefix + recipe`` (``"gspo_components/gspo_token"``, ...).
Each function runs the recipe's :class:`~gspo_components.loss.recipes.PolicyLoss` (weighter, clipper,
objective) on the tensors verl hands it:

- **aggregation**: verl's ``loss_agg_mode`` (``token-mean``, ``seq-mean-token-mean``,
  ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``); verl's ``token-sum`` has no counterpart
  and raises ``ValueError``. When the mode is not the recipe's own (verl's ``ActorConfig``
  defaults to ``token-mean``; GSPO's paper aggregation is ``seq-mean-token-mean``), a
  ``UserWarning`` says so once per process.
- **normalisers**: from ``config.global_batch_info`` (``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``, ``dp_size``), which verl fills so that
  micro-batch losses add up to the mini-batch loss across gradient accumulation and ranks. They
  become a :class:`~gspo_components.loss.aggregation.LossNormalizers`; a missing entry falls back to
  this micro-batch's own count, as in verl's ``agg_loss``.
- **clip range**: ``config.clip_ratio_low`` / ``config.clip_ratio_high`` (each falling back to
  ``config.clip_ratio``), or the recipe's defaults when ``config`` is None. CISPO reads only
  ``clip_ratio_high``: its truncation has no lower bound (MiniMax-M1).
- **rollout correction**: ``rollout_is_weights`` multiplies the per-token loss, detached.
- **what stays in verl**: advantages (``algorithm.adv_estimator``), the KL loss
  (``use_kl_loss``) and the entropy bonus (``entropy_coeff``) are added by verl around the policy
  loss, so the recipes run here with ``kl_coef=0`` and no entropy term.

The metrics are verl's three (``actor/pg_clipfrac``, ``actor/ppo_kl``,
``actor/pg_clipfrac_lower``, the last always 0 as no recipe uses a dual clip) plus this
library's under ``actor/gspo_components/``, as Python floats.

verl is imported only inside :func:`register_verl_losses`; importing this module needs only
torch and tensordict. verl runs the actor in Ray worker processes, so the registration must
happen in each of them: installing this package declares a ``verl.plugins`` entry point
(:mod:`gspo_components.integrations.verl_plugin`) that verl loads in every process at
``import verl``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tensordict import TensorDict

from ..loss import recipes as _recipes
from ..loss._checks import check_mask, compute_dtype
from ..loss.aggregation import AGGREGATIONS, LossNormalizers, local_normalizers
from ..loss.recipes import PolicyLoss

__all__ = ["DEFAULT_PREFIX", "RECIPE_NAMES", "register_verl_losses", "verl_policy_loss"]

DEFAULT_PREFIX = "gspo_components/"
RECIPE_NAMES = ("grpo", "gspo", "gspo_token", "dr_grpo", "dapo", "cispo")

# The recipe's own aggregation (its default), used when verl passes no loss_agg_mode.
_RECIPE_AGGREGATION = {
    "grpo": "seq-mean-token-mean",
    "gspo": "seq-mean-token-mean",
    "gspo_token": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
}
# (eps_low, eps_high) of each recipe, used when no config is given.
_RECIPE_CLIP = {
    "grpo": (0.2, 0.2),
    "gspo": (3e-4, 4e-4),
    "gspo_token": (3e-4, 4e-4),
    "dr_grpo": (0.2, 0.2),
    "dapo": (0.2, 0.28),
    "cispo": (None, 0.28),
}
_EXTRA_METRICS = (
    "clip_fraction_low",
    "clip_fraction_high",
    "seq_clip_fraction",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
)
_WARNED: set[tuple[str, str]] = set()


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config.name`` for verl's ActorConfig (a dataclass with ``.get``), a DictConfig or a dict."""
    if config is None:
        return default
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(name, default)
    return getattr(config, name, default)


def _clip_range(recipe: str, config: Any) -> tuple[float | None, float]:
    default_low, default_high = _RECIPE_CLIP[recipe]
    if config is None:
        return default_low, default_high
    clip = _config_value(config, "clip_ratio")
    high = _config_value(config, "clip_ratio_high")
    high = clip if high is None else high
    if high is None:
        raise ValueError(f"verl loss {recipe!r}: config has neither clip_ratio_high nor clip_ratio")
    if recipe == "cispo":
        return None, float(high)
    low = _config_value(config, "clip_ratio_low")
    low = clip if low is None else low
    if low is None:
        raise ValueError(f"verl loss {recipe!r}: config has neither clip_ratio_low nor clip_ratio")
    return float(low), float(high)


@functools.lru_cache(maxsize=64)
def _policy_loss(recipe: str, eps_low: float | None, eps_high: float, aggregation: str) -> PolicyLoss:
    build = getattr(_recipes, recipe)
    if recipe == "cispo":
        return build(eps_high=eps_high, eps_low=eps_low, aggregation=aggregation).loss
    return build(eps_low=eps_low, eps_high=eps_high, aggregation=aggregation).loss


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


def _check_aggregation(recipe: str, loss_agg_mode: str) -> str:
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(
            f"verl loss {recipe!r}: loss_agg_mode must be one of {list(AGGREGATIONS)}, got "
            f"{loss_agg_mode!r}"
            + (" (verl's token-sum has no counterpart here)" if loss_agg_mode == "token-sum" else "")
        )
    own = _RECIPE_AGGREGATION[recipe]
    if loss_agg_mode != own and (recipe, loss_agg_mode) not in _WARNED:
        _WARNED.add((recipe, loss_agg_mode))
        warnings.warn(
            f"gspo_components verl loss {recipe!r} runs with loss_agg_mode={loss_agg_mode!r} (verl's "
            f"actor.loss_agg_mode); the recipe's own aggregation is {own!r}",
            UserWarning,
            stacklevel=3,
        )
    return loss_agg_mode


def _metrics(
    out: TensorDict, log_prob: torch.Tensor, old_log_prob: torch.Tensor, mask: torch.Tensor, weighted: bool
) -> dict[str, float]:
    with torch.no_grad():
        neg_log_ratio = old_log_prob.detach() - log_prob.detach()
        neg_log_ratio = torch.where(mask, neg_log_ratio, torch.zeros_like(neg_log_ratio))
        ppo_kl = neg_log_ratio.sum() / mask.sum().clamp(min=1)
        names = ["actor/pg_clipfrac", "actor/ppo_kl"]
        values = [out["clip_fraction"], ppo_kl]
        extra = list(_EXTRA_METRICS) + (["is_weight_mean"] if weighted else [])
        names += [f"actor/gspo_components/{name}" for name in extra]
        values += [out[name] for name in extra]
        floats = torch.stack([v.float().reshape(()) for v in values]).tolist()  # one device sync
    metrics = dict(zip(names, floats, strict=True))
    metrics["actor/pg_clipfrac_lower"] = 0.0
    return metrics


def _empty_step(
    log_prob: torch.Tensor, mask: torch.Tensor, weighted: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    # A micro-batch with no valid token contributes nothing, but verl still calls backward on it.
    dtype = compute_dtype(log_prob)
    zero = torch.zeros((), dtype=dtype, device=log_prob.device)
    loss = torch.where(mask, log_prob.to(dtype), zero).sum() * 0.0
    names = ["actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"]
    names += [
        f"actor/gspo_components/{n}" for n in (*_EXTRA_METRICS, *(("is_weight_mean",) if weighted else ()))
    ]
    return loss, dict.fromkeys(names, 0.0)


def verl_policy_loss(recipe: str) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """The verl policy-loss function of ``recipe`` (one of :data:`RECIPE_NAMES`), unregistered.

    Its signature is verl's: ``(old_log_prob, log_prob, advantages, response_mask,
    loss_agg_mode, config, rollout_is_weights) -> (pg_loss, pg_metrics)``; see the module
    docstring for how each argument is read. It needs no verl import.
    """
    if recipe not in RECIPE_NAMES:
        raise ValueError(f"verl_policy_loss: recipe must be one of {list(RECIPE_NAMES)}, got {recipe!r}")

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = _RECIPE_AGGREGATION[recipe],
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        aggregation = _check_aggregation(recipe, loss_agg_mode)
        mask = check_mask(f"verl loss {recipe!r}", "response_mask", response_mask)
        weighted = rollout_is_weights is not None
        if not bool(mask.any()):
            return _empty_step(log_prob, mask, weighted)
        eps_low, eps_high = _clip_range(recipe, config)
        loss_module = _policy_loss(recipe, eps_low, eps_high, aggregation)
        entries = {
            "log_probs": log_prob,
            "old_log_probs": old_log_prob,
            "advantages": advantages,
            "response_mask": mask,
        }
        td = TensorDict(entries, batch_size=mask.shape[:1])
        out = loss_module(
            td, normalizers=_normalizers(mask, aggregation, config), is_weights=rollout_is_weights
        )
        return out["loss"], _metrics(out, log_prob, old_log_prob, mask, weighted)

    policy_loss.__name__ = f"{recipe}_policy_loss"
    policy_loss.__qualname__ = f"verl_policy_loss.<{recipe}>"
    policy_loss.__doc__ = (
        f"gspo_components recipe {recipe!r} as a verl policy loss (see gspo_components.integrations.verl)."
    )
    return policy_loss


def register_verl_losses(
    prefix: str = DEFAULT_PREFIX, recipes: Iterable[str] = RECIPE_NAMES
) -> dict[str, Callable[..., tuple[torch.Tensor, dict[str, float]]]]:
    """Register each recipe's loss with verl's ``register_policy_loss`` as ``prefix + recipe``.

    Returns ``{registered name: function}``. Select one in verl's config with
    ``actor_rollout_ref.actor.policy_loss.loss_mode=gspo_components/gspo_token``. Registering
    again replaces the earlier entry (verl's registry is a plain dict).
    """
    from verl.trainer.ppo.core_algos import register_policy_loss

    registered = {}
    for recipe in recipes:
        fn = verl_policy_loss(recipe)
        name = f"{prefix}{recipe}"
        registered[name] = register_policy_loss(name)(fn)
    return registered
