"""TRL: a ``GRPOTrainer`` whose loss is any recipe.

:class:`RecipeGRPOTrainer` subclasses TRL's ``GRPOTrainer`` and overrides only the loss
(``_compute_loss``) and, optionally, the advantages. Generation, rewards, logging, vLLM and
distributed training stay TRL's. For each micro-batch it scores the completions with TRL's own
``_get_per_token_logps_and_entropies`` and maps TRL's batch onto the recipe's keys:

===================================  =====================  ====================================
TRL batch entry                      recipe key             note
===================================  =====================  ====================================
per-token log-probs of the model     ``log_probs``          carries the gradient
``old_per_token_logps``              ``old_log_probs``      TRL omits it when on-policy; then
                                                            ``sg(log_probs)``, as TRL does
``advantages`` [B] or [B, T]         ``advantages``         [B, T]: per-token (GSPO-token)
``completion_mask`` × ``tool_mask``  ``response_mask``
``ref_per_token_logps``              ``ref_log_probs``      present when ``beta > 0``
``sampling_per_token_logps``         ``rollout_log_probs``  vLLM's log-probs, for a recipe built
                                                            with ``rollout_correction=``
``importance_sampling_ratio``        ``is_weights``         TRL's own vLLM correction, when on
                                                            (passed as ``loss(td, is_weights=)``)
entropies (when needed)              ``entropy``            only when the recipe reads them
                                                            (``entropy_coef != 0``, a filter)
===================================  =====================  ====================================

**Any recipe.** A stock recipe or one written with :func:`~gspo_components.compose` (custom
clippers and filters included). What the trainer feeds it is derived from its parts; a recipe
reading an entry the table cannot supply is refused at construction. The recipe decides the
objective, so TRL's ``loss_type`` and ``importance_sampling_level`` are not read: a non-default
value gives a ``UserWarning`` naming it. TRL's two token masks become filters appended to a copy
of the recipe's: ``top_entropy_quantile = ρ < 1`` adds
:class:`~gspo_components.loss.algorithms.top_entropy.TopEntropyFilter` (ρ), and
``off_policy_mask_threshold = δ`` adds :class:`~gspo_components.loss.algorithms.opsm.OPSMFilter`
(δ) measured, as TRL does, from vLLM's log-probs when the batch has them and from π_old otherwise.

**Exact normalisation across micro-batches.** TRL splits each generation batch into
``steps_per_generation`` micro-batches and accumulates ``gradient_accumulation_steps`` of them per
optimizer step. This trainer counts the step's normalisers (tokens, non-empty sequences, length)
over the micro-batches of the current accumulation window, which TRL has already generated and
buffered, and across ranks (:func:`~gspo_components.step_normalizers`). The gradient of an
optimizer step then equals the recipe's gradient on the whole window, for every aggregation. This
needs each window inside one generation batch: ``steps_per_generation × num_iterations`` must be a
multiple of ``gradient_accumulation_steps`` (TRL's default, ``steps_per_generation =
gradient_accumulation_steps``, is); other settings are refused at construction.

**GSPO-token with per-token advantages.** TRL removed its sequence-token level. Pass
``token_advantages=fn``: ``fn(batch)`` receives TRL's generation batch (``completion_ids``,
``completion_mask``, sequence ``advantages`` [B], ...) and returns advantages [B, T]; use a
:func:`~gspo_components.gspo_token` recipe.

**Advantages.** By default TRL's advantages are used ((r − mean) / (std + 1e-4) per group, with
``scale_rewards``). ``advantages="recipe"`` recomputes them from the same rewards with the recipe's
``.advantage`` (e.g. exact zeros for constant groups, or Dr.GRPO's mean-only baseline).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from tensordict import NestedKey, TensorDict
from trl import GRPOConfig, GRPOTrainer

from ..loss._module import key_of
from ..loss.aggregation import LossNormalizers, step_normalizers
from ..loss.algorithms.opsm import OPSMFilter
from ..loss.algorithms.top_entropy import TopEntropyFilter
from ..loss.recipes import Recipe
from ._recipes import check_inputs, reads, with_filters

__all__ = ["RecipeGRPOTrainer", "trl_batch_to_tensordict"]

_MODEL_KWARGS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
_CANONICAL = (
    "log_probs",
    "old_log_probs",
    "advantages",
    "response_mask",
    "ref_log_probs",
    "rollout_log_probs",
    "is_weights",
    "entropy",
)
# TRL's batch holds the log-probs OPSM measures the drift from here: vLLM's when present, else π_old.
_OPSM_KEY = "trl_opsm_sampling_log_probs"
# GRPOConfig settings the recipe replaces: a non-default value is ignored, with a warning.
_IGNORED = ("loss_type", "importance_sampling_level", "epsilon", "epsilon_high")


def _loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    mask = batch["completion_mask"]
    if batch.get("tool_mask") is not None:
        mask = mask * batch["tool_mask"]
    return mask.bool()


def trl_batch_to_tensordict(
    batch: dict[str, Any],
    per_token_logps: torch.Tensor,
    *,
    entropies: torch.Tensor | None = None,
    keys: dict[str, NestedKey] | None = None,
) -> TensorDict:
    """Map one TRL micro-batch and the model's per-token log-probs onto the recipe's keys.

    See the module table. ``keys`` renames the canonical entries (default: their own names).
    ``importance_sampling_ratio`` of shape [B, 1] (TRL's sequence-level modes) is broadcast to
    [B, T].
    """
    keys = {name: name for name in _CANONICAL} | (keys or {})
    mask = _loss_mask(batch)
    n, t = mask.shape
    if per_token_logps.shape != mask.shape:
        raise ValueError(
            f"trl_batch_to_tensordict: per_token_logps must have shape {list(mask.shape)} like "
            f"'completion_mask', got {list(per_token_logps.shape)}"
        )
    old = batch.get("old_per_token_logps")
    out = {
        keys["log_probs"]: per_token_logps,
        keys["old_log_probs"]: per_token_logps.detach() if old is None else old,
        keys["advantages"]: batch["advantages"],
        keys["response_mask"]: mask,
    }
    if batch.get("ref_per_token_logps") is not None:
        out[keys["ref_log_probs"]] = batch["ref_per_token_logps"]
    if batch.get("sampling_per_token_logps") is not None:
        out[keys["rollout_log_probs"]] = batch["sampling_per_token_logps"]
    if batch.get("importance_sampling_ratio") is not None:
        out[keys["is_weights"]] = batch["importance_sampling_ratio"].expand(n, t)
    if entropies is not None:
        out[keys["entropy"]] = entropies
    return TensorDict(out, batch_size=[n])


def _check_args(args: Any, recipe: Recipe) -> None:
    """Refuse GRPOConfig settings that a recipe would silently not honour."""
    where = "RecipeGRPOTrainer"
    objective = recipe.loss.objective
    ga = args.gradient_accumulation_steps
    cycle = args.steps_per_generation * args.num_iterations
    if cycle % ga != 0:
        raise ValueError(
            f"{where}: steps_per_generation × num_iterations = {args.steps_per_generation} × "
            f"{args.num_iterations} must be a multiple of gradient_accumulation_steps = {ga}: an "
            "optimizer step would otherwise use completions not yet generated, and its exact "
            "normalisers could not be counted (TRL's default steps_per_generation = "
            "gradient_accumulation_steps works)"
        )
    if float(args.beta) != float(objective.kl_coef):
        raise ValueError(
            f"{where}: GRPOConfig.beta = {args.beta} but the recipe's kl_coef = {objective.kl_coef}; "
            "set them equal (TRL computes the reference log-probs only when beta > 0, and the "
            "recipe's kl_coef weights the KL term)"
        )
    unsupported = {
        "delta": (getattr(args, "delta", None), None),
        "entropy_coef": (getattr(args, "entropy_coef", 0.0), 0.0),
        "use_adaptive_entropy": (getattr(args, "use_adaptive_entropy", False), False),
    }
    if float(args.beta) != 0.0:  # the correction multiplies TRL's KL term only
        unsupported["use_bias_correction_kl"] = (getattr(args, "use_bias_correction_kl", False), False)
    changed = [f"{k}={v!r}" for k, (v, default) in unsupported.items() if v != default]
    if changed:
        raise ValueError(
            f"{where}: {', '.join(changed)} change TRL's loss and are not applied to a recipe; leave "
            "them at their defaults (use the recipe's entropy_coef for an entropy bonus)"
        )
    quantile = getattr(args, "top_entropy_quantile", 1.0)
    if not 0.0 <= float(quantile) <= 1.0:
        raise ValueError(f"{where}: GRPOConfig.top_entropy_quantile must be in [0, 1], got {quantile!r}")
    for name, filter_name in (("top_entropy_quantile", "top_entropy"), ("off_policy_mask_threshold", "opsm")):
        if _trl_filter_on(args, name) and any(f.name == filter_name for f in recipe.loss.filters):
            raise ValueError(
                f"{where}: GRPOConfig.{name} = {getattr(args, name)!r} would add a {filter_name!r} filter, "
                f"but the recipe {recipe.name!r} already has one; set it in one place"
            )


def _trl_filter_on(args: Any, name: str) -> bool:
    value = getattr(args, name, None)
    return value is not None and (name != "top_entropy_quantile" or float(value) < 1.0)


def _warn_ignored(args: Any, recipe: Recipe) -> None:
    """One UserWarning per GRPOConfig setting that the recipe replaces and that is not TRL's default."""
    aggregation = recipe.loss.objective.aggregation
    weighter = type(recipe.loss.weighter).__name__
    for name in _IGNORED:
        value = getattr(args, name, None)
        default = GRPOConfig.__dataclass_fields__[name].default
        if value != default:
            warnings.warn(
                f"RecipeGRPOTrainer: GRPOConfig.{name}={value!r} is ignored: the recipe {recipe.name!r} "
                f"decides the loss (its weighter {weighter}, its aggregation {aggregation!r}); leave "
                f"{name} at TRL's default {default!r} or build the recipe you want",
                UserWarning,
                stacklevel=3,
            )


def _with_trl_filters(recipe: Recipe, args: Any, keys: dict[str, NestedKey]) -> Recipe:
    """The recipe with TRL's token masks appended as filters (a copy; the recipe is not changed)."""
    added = []
    if _trl_filter_on(args, "top_entropy_quantile"):
        added.append(TopEntropyFilter(float(args.top_entropy_quantile), in_keys={"entropy": keys["entropy"]}))
    if _trl_filter_on(args, "off_policy_mask_threshold"):
        added.append(
            OPSMFilter(
                float(args.off_policy_mask_threshold),
                in_keys={
                    "log_probs": keys["log_probs"],
                    "old_log_probs": _OPSM_KEY,
                    "advantages": keys["advantages"],
                },
            )
        )
    return with_filters(recipe, added) if added else recipe


class RecipeGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with a recipe's loss (see the module docstring).

    Args:
        *args, **kwargs: ``GRPOTrainer``'s arguments (model, reward_funcs, args, datasets, ...).
        recipe: the :class:`~gspo_components.Recipe` whose ``.loss`` replaces TRL's loss. TRL's
            ``loss_type``, ``importance_sampling_level``, ``epsilon`` and ``epsilon_high`` are then
            unused: a value other than TRL's default warns, once per setting.
            ``GRPOConfig.beta`` must equal the recipe's ``kl_coef`` (TRL loads the reference model
            only when ``beta > 0``). ``top_entropy_quantile`` and ``off_policy_mask_threshold``
            add TopEntropyFilter / OPSMFilter to a copy of the recipe (``self.recipe``).
        advantages: ``"trl"`` (default) keeps TRL's advantages; ``"recipe"`` recomputes them from
            the same rewards with ``recipe.advantage`` (groups of ``num_generations``).
        token_advantages: ``fn(batch) -> Tensor[B, T]``, called once per generation batch (on each
            process's share) after the advantages; its result replaces ``batch["advantages"]``.

    Raises ``ValueError`` at construction for TRL options that change TRL's loss and that a recipe
    does not reproduce (``delta``, entropy bonus, ``use_bias_correction_kl`` with ``beta > 0``),
    for a recipe that reads an entry TRL's batch does not hold, and for micro-batch layouts
    without exact normalisers.
    """

    def __init__(
        self,
        *args: Any,
        recipe: Recipe,
        advantages: Literal["trl", "recipe"] = "trl",
        token_advantages: Callable[[dict[str, Any]], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(recipe, Recipe):
            raise ValueError(
                f"RecipeGRPOTrainer: recipe must be a gspo_components Recipe, got {type(recipe).__name__}"
            )
        if advantages not in ("trl", "recipe"):
            raise ValueError(f"RecipeGRPOTrainer: advantages must be 'trl' or 'recipe', got {advantages!r}")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # fail before TRL loads models; without args TRL's defaults pass
            _check_args(config, recipe)
        super().__init__(*args, **kwargs)
        _check_args(self.args, recipe)
        _warn_ignored(self.args, recipe)
        keys = {name: key_of(recipe.loss, name) for name in _CANONICAL}
        recipe = _with_trl_filters(recipe, self.args, keys)
        available = ["log_probs", "old_log_probs", "advantages", "response_mask", "entropy"]
        if float(self.args.beta) > 0:
            available.append("ref_log_probs")
        if self.use_vllm:
            available.append("rollout_log_probs")
        check_inputs(
            "RecipeGRPOTrainer",
            recipe.name,
            recipe.loss,
            available,
            "TRL's batch has ref_log_probs only with beta > 0 and rollout_log_probs only with vLLM",
        )
        self.recipe = recipe
        self.advantage_source = advantages
        self.token_advantages = token_advantages
        self._recipe_keys = keys
        self._opsm = _trl_filter_on(self.args, "off_policy_mask_threshold")
        self._needs_entropy = reads(recipe.loss, "entropy")
        self._last_rewards_per_func: torch.Tensor | None = None
        if advantages == "recipe" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "RecipeGRPOTrainer: advantages='recipe' sums the weighted rewards, so it needs "
                "multi_objective_aggregation='sum_then_normalize'"
            )
        trl_is_correction = self.use_vllm and getattr(self.args, "vllm_importance_sampling_correction", False)
        if trl_is_correction and recipe.loss.rollout_correction is not None:
            raise ValueError(
                "RecipeGRPOTrainer: both TRL's vllm_importance_sampling_correction and the recipe's "
                "rollout_correction are on; keep one"
            )

    # -- advantages -----------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # type: ignore[no-untyped-def]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):  # type: ignore[no-untyped-def]
        self._last_rewards_per_func = None
        batch = super()._generate_and_score_completions(inputs)
        if self.advantage_source == "recipe":
            batch["advantages"] = self._recipe_advantages(len(inputs))
        if self.token_advantages is not None:
            adv = self.token_advantages(batch)
            mask = batch["completion_mask"]
            if not isinstance(adv, torch.Tensor) or adv.shape != mask.shape or not adv.is_floating_point():
                got = list(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__
                raise ValueError(
                    f"RecipeGRPOTrainer: token_advantages must return a float tensor of shape "
                    f"{list(mask.shape)} like 'completion_mask', got {got}"
                )
            batch["advantages"] = adv.detach().to(device=mask.device, dtype=torch.float32)
        return batch

    def _recipe_advantages(self, local_size: int) -> torch.Tensor:
        """recipe.advantage on the gathered rewards, sliced to this process's samples."""
        rewards_per_func = self._last_rewards_per_func
        if rewards_per_func is None:
            raise RuntimeError("RecipeGRPOTrainer: no rewards were computed for this batch")
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        valid = ~torch.isnan(rewards_per_func).all(dim=1)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(rewards.shape[0], device=rewards.device) // group_size
        estimator = self.recipe.advantage
        td = TensorDict(
            {
                key_of(estimator, "rewards"): torch.where(valid, rewards, torch.zeros_like(rewards)),
                key_of(estimator, "group_ids"): group_ids,
                key_of(estimator, "reward_valid"): valid,
            },
            batch_size=[rewards.shape[0]],
        )
        adv = estimator(td).get(estimator.out_keys[0])
        start = self.accelerator.process_index * local_size
        return adv[start : start + local_size].float()

    # -- loss -----------------------------------------------------------------------------------

    def _step_normalizers(self, inputs: dict[str, Any]) -> LossNormalizers | None:
        """Normalisers of the accumulation window that ``inputs`` belongs to; ``None`` (the batch
        is its own step) when called outside TRL's training loop."""
        buffer = self._buffered_inputs
        if buffer is None or not any(inputs is b for b in buffer):
            return None
        ga = self.args.gradient_accumulation_steps
        if self.current_gradient_accumulation_steps != ga:
            raise ValueError(
                "RecipeGRPOTrainer: a partial gradient-accumulation window "
                f"({self.current_gradient_accumulation_steps} of {ga} micro-batches) cannot be aligned "
                "with TRL's generation batches"
            )
        spg = self.args.steps_per_generation
        start = self._step - self._step % ga
        window = [buffer[(start + k) % spg] for k in range(ga)]
        if not any(inputs is b for b in window):
            raise RuntimeError("RecipeGRPOTrainer: the micro-batch is not in its accumulation window")
        objective = self.recipe.loss.objective
        return step_normalizers(
            [_loss_mask(b) for b in window],
            max_length=objective.max_length,
            sync_ranks=objective.sync_ranks,
            process_group=objective.process_group,
        )

    def _compute_loss(self, model, inputs):  # type: ignore[no-untyped-def]
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=self._needs_entropy,
            compute_aux_loss=self.aux_loss_enabled,
            **{name: inputs.get(name) for name in _MODEL_KWARGS},
        )
        mode = "train" if self.model.training else "eval"
        td = trl_batch_to_tensordict(inputs, per_token_logps, entropies=entropies, keys=self._recipe_keys)
        if self._opsm:  # TRL's rule: the drift from vLLM's log-probs when present, else from π_old
            sampling = self._recipe_keys["rollout_log_probs"]
            source = (
                sampling if sampling in td.keys(include_nested=True) else self._recipe_keys["old_log_probs"]
            )
            td.set(_OPSM_KEY, td.get(source))
        normalizers = self._step_normalizers(inputs) if mode == "train" else None
        # TRL's own vLLM correction is passed explicitly: the chain refuses is_weights in the batch
        is_key = self._recipe_keys["is_weights"]
        is_weights = td.pop(is_key) if is_key in td.keys(include_nested=True) else None
        out = self.recipe.loss(td, normalizers=normalizers, is_weights=is_weights)
        loss_key = self.recipe.loss.out_key("loss")
        loss = out[loss_key]
        if self.aux_loss_enabled:
            scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / scale
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())
        for name, value in out.items():
            if name == loss_key:
                continue
            gathered = self.accelerator.gather(value.detach().float().reshape(1))
            self._metrics[mode][f"recipe/{name}"].append(gathered.nanmean().item())
        return loss
