"""What the adapters need to know about a recipe, read from the recipe object itself.

No trainer is imported here. The adapters accept any :class:`~gspo_components.Recipe` (a stock one
from :data:`~gspo_components.RECIPES` or one written by a user with
:func:`~gspo_components.compose`), so what a trainer must feed it is derived from its parts:
the canonical entries each part declares, and the Objective's KL / entropy settings.
"""

from __future__ import annotations

from collections.abc import Iterable

from tensordict.nn import TensorDictModuleBase

from ..loss.recipes import PolicyLoss, Recipe
from ..loss.registry import RECIPES

# Written and read inside the chain: never fed by a trainer.
_INTERMEDIATES = frozenset({"log_ratio", "token_loss", "clipped", "is_weights", "loss_weights"})


def stock_or_recipe(where: str, recipe: object) -> Recipe:
    """``recipe`` as a Recipe: a name in :data:`RECIPES` is built with its defaults."""
    if isinstance(recipe, str) and recipe in RECIPES:
        recipe = RECIPES[recipe]()
    if isinstance(recipe, Recipe):
        if not isinstance(recipe.loss, PolicyLoss):
            raise ValueError(
                f"{where}: recipe {recipe.name!r} must have a gspo_components PolicyLoss as its loss "
                f"(the adapter reads its parts), got {type(recipe.loss).__name__}"
            )
        return recipe
    raise ValueError(
        f"{where}: recipe must be a gspo_components Recipe or the name of a stock recipe "
        f"(one of {list(RECIPES)}), got {recipe!r}"
    )


def _part_inputs(part: TensorDictModuleBase) -> set[str]:
    """The canonical names a part reads; the raw keys of a part without declared names."""
    in_map = getattr(part, "_in_map", None)
    if isinstance(in_map, dict):
        return set(in_map)
    return {k if isinstance(k, str) else ".".join(k) for k in getattr(part, "in_keys", [])}


def required_inputs(loss: PolicyLoss) -> set[str]:
    """The canonical batch entries ``loss`` cannot run without.

    Every entry that the weighter, the rollout correction, the filters and the clipper declare
    (``response_mask``, ``log_probs``, ``old_log_probs``, ``advantages``, the clipper's and filters'
    ``inputs``, ``rollout_log_probs``), plus ``log_probs`` / ``ref_log_probs`` when the Objective
    has a KL term and ``entropy`` when it has an entropy term; the chain's own intermediates
    (``log_ratio``, ``is_weights``, ...) are left out.
    """
    names: set[str] = set()
    for part in (loss.weighter, loss.rollout_correction, *loss.filters, loss.clipper):
        if part is not None:
            names |= _part_inputs(part)
    objective = loss.objective
    names |= {"response_mask"}
    if objective.kl_coef > 0:
        names |= {"log_probs", "ref_log_probs"}
    if objective.entropy_coef != 0:
        names.add("entropy")
    return names - _INTERMEDIATES


def reads(loss: PolicyLoss, name: str) -> bool:
    """Whether ``loss`` needs the canonical entry ``name`` (see :func:`required_inputs`)."""
    return name in required_inputs(loss)


def check_inputs(where: str, recipe_name: str, loss: PolicyLoss, available: Iterable[str], hint: str) -> None:
    """ValueError naming the entries ``loss`` needs that the trainer does not provide."""
    missing = sorted(required_inputs(loss) - set(available))
    if missing:
        raise ValueError(
            f"{where}: recipe {recipe_name!r} reads {missing}, which this trainer does not provide "
            f"(it provides {sorted(set(available))}); {hint}"
        )


def with_filters(recipe: Recipe, filters: Iterable[TensorDictModuleBase]) -> Recipe:
    """A copy of ``recipe`` whose PolicyLoss has ``filters`` appended to its own (the parts are
    shared, not copied)."""
    loss = recipe.loss
    new_loss = PolicyLoss(
        loss.weighter,
        loss.clipper,
        loss.objective,
        rollout_correction=loss.rollout_correction,
        filters=[*loss.filters, *filters],
    )
    return Recipe(recipe.name, recipe.advantage, new_loss)
