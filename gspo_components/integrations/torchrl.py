"""torchrl: any recipe as a ``LossModule`` on torchrl's LLM TensorDict layout.

torchrl's LLM wrappers (``TransformersWrapper``, ``vLLMWrapper``) write TensorClasses into the
rollout TensorDict: ``tokens`` (``prompt`` / ``response`` / ``full``), ``log_probs`` (same
fields), ``masks`` (``all_attention_mask``, ``all_assistant_mask``), and ``MCAdvantage`` writes
``advantage``. torchrl ships ``GRPOLoss`` / ``DAPO`` / ``CISPOLoss`` on that layout, but no GSPO.
:class:`RecipeLoss` reads the same entries and hands them to a recipe's ``.loss``:

=====================================  ==========================  ==================================
torchrl entry (default key)            recipe key                  how
=====================================  ==========================  ==================================
``actor_network`` (generate=False)     ``log_probs``               ℓ of ``("tokens", "full")`` under
                                                                   the dist of ``masking_strategy``
                                                                   (the route ``GRPOLoss`` takes)
``("log_probs", "full")``              ``old_log_probs``           π_old (the sampler's log-probs)
dist mask ∧ finite(π_old)              ``response_mask``           which tokens are trained on
``"advantage"`` [N, 1, 1] / [N]        ``advantages`` [N]          ``MCAdvantage``: one per sequence
``"advantage"`` [N, T_full(, 1)]       ``advantages`` [N, L]       per token (GSPO-token)
``("next", "ref_log_probs", "full")``  ``ref_log_probs``           only when the recipe reads it (KL)
``rollout_log_probs`` (unset)          ``rollout_log_probs``       only when ``set_keys`` names it
dist entropy                           ``entropy``                 only when the recipe reads it
                                                                   (``entropy_coef != 0``, or a
                                                                   filter / clipper input)
=====================================  ==========================  ==================================

torchrl keeps full sequences (prompt and response, padded on the left); the recipe's key schema
is response-only and right-padded. The trained tokens of each row are therefore *compacted*: the
positions selected by the mask are gathered, in order, to the front of a ``[N, L_max]`` tensor
(``L_max`` the longest response of the call). The gather is differentiable, so gradients reach the
model unchanged, and the default length of ``seq-mean-token-sum-norm`` is the response width, not
the width of prompt and response together.

Any recipe works, user-written ones included: what is read is derived from the recipe's parts
(the entries its weighter, filters and clipper declare, and its Objective's KL / entropy terms);
a recipe that reads an entry this table cannot supply is refused at construction with a
``ValueError`` naming it.

The output is a TensorDict of batch size ``[]`` in torchrl's convention: ``loss_objective`` (the
recipe's loss, read through ``policy_loss.out_key("loss")``, KL and entropy terms included, so
summing every ``loss_*`` entry is right) and the recipe's detached metrics (``clip_fraction``,
``ratio_mean``, ``kl``, ``filtered_<name>`` of its filters, ...).

Micro-batches: pass ``normalizers=`` (see :meth:`RecipeLoss.step_normalizers`) to make the gradient
summed over micro-batches equal the whole batch's, for every aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict import LazyStackedTensorDict, NestedKey, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.objectives import LossModule

from ..loss._module import key_of
from ..loss.aggregation import LossNormalizers, step_normalizers
from ..loss.recipes import PolicyLoss, Recipe
from ._recipes import check_inputs, reads

__all__ = ["RecipeLoss", "compact_response"]

# The recipe entries RecipeLoss can build from torchrl's layout (module table).
TORCHRL_INPUTS = (
    "log_probs",
    "old_log_probs",
    "advantages",
    "response_mask",
    "ref_log_probs",
    "rollout_log_probs",
    "entropy",
)

MaskingStrategy = Literal["sft", "rlhf", "generic"]
_STRATEGIES = ("sft", "rlhf", "generic")


def compact_response(
    mask: torch.Tensor, *tensors: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Gather the masked-in positions of each row, in order, to the front: [N, T] → [N, L_max].

    Returns the compact mask (``arange(L_max) < L_i``) and each tensor gathered the same way
    (``None`` passes through). Positions past ``L_i`` hold values from masked-out positions; every
    recipe part masks them. ``L_max`` is at least 1, so an all-padding batch keeps a shape.
    """
    mask = mask.bool()
    lengths = mask.sum(-1)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    compact = torch.arange(width, device=mask.device) < lengths.unsqueeze(-1)
    out: list[torch.Tensor | None] = []
    for t in tensors:
        out.append(None if t is None else t.gather(-1, order))
    return compact, out


class RecipeLoss(LossModule):
    """A torchrl ``LossModule`` that computes a recipe's loss on torchrl's LLM layout.

    Args:
        actor_network: a torchrl LLM wrapper with ``generate=False`` (it scores ``tokens.full``
            with gradients), e.g. ``TransformersWrapper(model, input_mode="tokens",
            generate=False, pad_output=True)``.
        recipe: a :class:`~gspo_components.Recipe` (its ``.loss`` is used) or a
            :class:`~gspo_components.PolicyLoss`.
        masking_strategy: which tokens are trained on, as in torchrl's ``GRPOLoss``: ``"sft"``
            (response tokens: the attention mask minus the prompt), ``"rlhf"`` (assistant tokens,
            multi-turn) or ``"generic"`` (every attended token).

    Keys (``set_keys``, same names as ``GRPOLoss``): ``advantage``, ``action``
    (``("tokens", "full")``), ``sample_log_prob`` (π_old, ``("log_probs", "full")``),
    ``ref_log_probs``, ``prompt_tokens``, ``attention_mask``, ``assistant_mask``, and
    ``rollout_log_probs`` (``None``: not read) for a recipe built with ``rollout_correction=``.

    ``forward(td, normalizers=None)`` returns ``loss_objective`` and metrics (module docstring).
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable entries of the input TensorDict (``loss.set_keys(name=key)``)."""

        advantage: NestedKey = "advantage"
        action: NestedKey = ("tokens", "full")
        sample_log_prob: NestedKey = ("log_probs", "full")
        ref_log_probs: NestedKey = ("next", "ref_log_probs", "full")
        rollout_log_probs: NestedKey | None = None
        prompt_tokens: NestedKey = ("tokens", "prompt")
        attention_mask: NestedKey = ("masks", "all_attention_mask")
        assistant_mask: NestedKey = ("masks", "all_assistant_mask")

    tensor_keys: _AcceptedKeys

    def __init__(
        self,
        actor_network: TensorDictModuleBase,
        recipe: Recipe | PolicyLoss,
        *,
        masking_strategy: MaskingStrategy = "sft",
    ) -> None:
        super().__init__()
        if masking_strategy not in _STRATEGIES:
            raise ValueError(
                f"RecipeLoss: masking_strategy must be one of {list(_STRATEGIES)}, got {masking_strategy!r}"
            )
        policy_loss = recipe.loss if isinstance(recipe, Recipe) else recipe
        if not isinstance(policy_loss, PolicyLoss):
            raise ValueError(
                f"RecipeLoss: recipe must be a Recipe or a PolicyLoss, got {type(recipe).__name__}"
            )
        recipe_name = recipe.name if isinstance(recipe, Recipe) else type(recipe).__name__
        check_inputs(
            "RecipeLoss",
            recipe_name,
            policy_loss,
            TORCHRL_INPUTS,
            "write the entry into the recipe's batch yourself and call recipe.loss directly",
        )
        if getattr(actor_network, "generate", False):
            raise ValueError(
                "RecipeLoss: actor_network must score tokens (generate=False); build one with "
                "wrapper.get_new_version(generate=False)"
            )
        self.actor_network = actor_network
        self.policy_loss = policy_loss
        self.recipe_name = recipe_name
        self.masking_strategy = masking_strategy
        self._needs_ref = reads(policy_loss, "ref_log_probs")
        self._needs_rollout = reads(policy_loss, "rollout_log_probs")
        self._needs_entropy = reads(policy_loss, "entropy")
        self._max_length = policy_loss.objective.max_length
        self._loss_key = policy_loss.out_key("loss")
        self._key = {
            name: key_of(policy_loss, name)
            for name in (
                "log_probs",
                "old_log_probs",
                "advantages",
                "response_mask",
                "ref_log_probs",
                "rollout_log_probs",
                "entropy",
            )
        }

    # -- keys -----------------------------------------------------------------------------------

    @property
    def in_keys(self) -> list[NestedKey]:
        actor = self.__dict__.get("_modules", {}).get("actor_network")
        keys = list(getattr(actor, "in_keys", []) or [])
        k = self.tensor_keys
        keys += [k.action, k.sample_log_prob, k.advantage]
        if getattr(self, "_needs_ref", False):
            keys.append(k.ref_log_probs)
        if k.rollout_log_probs is not None:
            keys.append(k.rollout_log_probs)
        return list(dict.fromkeys(keys))

    @in_keys.setter
    def in_keys(self, value: object) -> None:  # LossModule/TensorDictModuleBase may assign it
        pass

    @property
    def out_keys(self) -> list[NestedKey]:
        policy_loss = self.__dict__.get("_modules", {}).get("policy_loss")
        loss_key = getattr(self, "_loss_key", "loss")
        return ["loss_objective", *[k for k in getattr(policy_loss, "out_keys", []) if k != loss_key]]

    @out_keys.setter
    def out_keys(self, value: object) -> None:
        pass

    def _forward_value_estimator_keys(self, **kwargs: object) -> None:
        pass  # no value estimator

    # -- masks ----------------------------------------------------------------------------------

    def _old_log_probs(self, td: TensorDictBase) -> torch.Tensor:
        old = td.get(
            self.tensor_keys.sample_log_prob,
            None,
            as_padded_tensor=True,
            padding_side="left",
            padding_value=0.0,
        )
        if old is None:
            raise ValueError(
                f"RecipeLoss: missing key {self.tensor_keys.sample_log_prob!r} (π_old, the sampler's "
                "log-probs of the full sequence); score tokens.full without gradient, or set_keys(sample_log_prob=...)"
            )
        if old.requires_grad:
            raise ValueError(
                f"RecipeLoss: {self.tensor_keys.sample_log_prob!r} (π_old) must not require grad"
            )
        return old

    def response_mask(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The tokens trained on, [N, T_full], computed from the data alone (no forward pass).

        It is the mask of ``masking_strategy`` (torchrl's rule) and-ed with a finite π_old, and
        equals the mask :meth:`forward` uses; :meth:`step_normalizers` counts it.
        """
        td = self._flat(tensordict)
        k = self.tensor_keys
        get = dict(as_padded_tensor=True, padding_side="left", padding_value=False)
        if self.masking_strategy == "generic":
            mask = td.get(k.attention_mask, None, **get)
            what = k.attention_mask
        elif self.masking_strategy == "sft" and td.get(k.prompt_tokens, None) is not None:
            mask = self._sft_mask(td)
            what = k.attention_mask
        else:  # "rlhf", or "sft" without prompt tokens (torchrl falls back to the assistant mask)
            mask = td.get(k.assistant_mask, None, **get)
            what = k.assistant_mask
        if mask is None:
            raise ValueError(f"RecipeLoss: masking_strategy={self.masking_strategy!r} needs {what!r}")
        return mask.bool() & torch.isfinite(self._old_log_probs(td))

    def _sft_mask(self, td: TensorDictBase) -> torch.Tensor:
        """Attention mask with each row's prompt removed (torchrl's ``_get_dist_with_prompt_mask``)."""
        k = self.tensor_keys
        attention = td.get(k.attention_mask, None)
        if isinstance(attention, torch.Tensor) and not attention.is_nested:
            prompt = td.get(k.prompt_tokens, as_padded_tensor=True, padding_side="left", padding_value=-100)
            mask = attention.bool().clone()
            mask[..., : prompt.shape[-1]] = False
            return mask
        rows = []
        for am, p in zip(
            td.get(k.attention_mask, as_list=True), td.get(k.prompt_tokens, as_list=True), strict=True
        ):
            am = am.bool().clone()
            am[..., : p.shape[-1]] = False
            rows.append(am)
        return torch.nn.utils.rnn.pad_sequence(
            rows, batch_first=True, padding_value=False, padding_side="left"
        )

    def step_normalizers(self, micro_batches: Iterable[TensorDictBase], **kwargs: object) -> LossNormalizers:
        """The normalisers of an optimizer step made of ``micro_batches`` (TensorDicts in this
        loss's layout), for ``forward(mb, normalizers=...)``. Counts :meth:`response_mask` after
        compaction; keyword arguments go to :func:`~gspo_components.step_normalizers`."""
        masks = [compact_response(self.response_mask(mb))[0] for mb in micro_batches]
        kwargs.setdefault("max_length", self._max_length)
        return step_normalizers(masks, **kwargs)  # type: ignore[arg-type]

    # -- forward --------------------------------------------------------------------------------

    @staticmethod
    def _flat(td: TensorDictBase) -> TensorDictBase:
        return td.reshape(-1) if td.ndim > 1 else td

    def _dist(self, td: TensorDictBase) -> torch.distributions.Distribution:
        actor = self.actor_network
        method = {"sft": "_get_sft_dist", "rlhf": "_get_rlhf_dist", "generic": "_get_generic_dist"}[
            self.masking_strategy
        ]
        if hasattr(actor, method):
            return getattr(actor, method)(td)
        if hasattr(actor, "get_dist"):
            return actor.get_dist(td, logits_key="logits")
        raise ValueError(f"RecipeLoss: actor_network has neither {method} nor get_dist")

    def _advantages(self, td: TensorDictBase, n: int, width: int) -> torch.Tensor:
        key = self.tensor_keys.advantage
        if isinstance(td, LazyStackedTensorDict) and key in td.keys(include_nested=True):
            # One scalar per sequence ([N] over a lazy stack): tensordict's padded read fails on
            # 0-dim entries ("ArrayRef: invalid slice"), and nothing needs padding there.
            first = td.tensordicts[0].get(key) if td.tensordicts else None
            padded = not (isinstance(first, torch.Tensor) and first.dim() == 0)
        else:
            padded = True
        adv = (
            td.get(key, None, as_padded_tensor=True, padding_side="left", padding_value=0.0)
            if padded
            else td.get(key)
        )
        if adv is None:
            raise ValueError(f"RecipeLoss: missing key {key!r} (advantages, e.g. from MCAdvantage)")
        adv = adv.detach()
        if adv.shape[0] != n:
            raise ValueError(f"RecipeLoss: {key!r} must have a leading dimension {n}, got {list(adv.shape)}")
        flat = adv.reshape(n, -1)
        if flat.shape[1] == 1:
            return flat[:, 0]
        if adv.dim() == 3 and adv.shape[-1] == 1:
            adv = adv.squeeze(-1)
        if adv.dim() == 2 and adv.shape[1] == width:
            return adv
        raise ValueError(
            f"RecipeLoss: {key!r} must hold one value per sequence ([N], [N, 1], [N, 1, 1]) or one "
            f"per token of {self.tensor_keys.action!r} ([N, {width}] or [N, {width}, 1]); got {list(adv.shape)}"
        )

    def forward(
        self, tensordict: TensorDictBase, normalizers: LossNormalizers | None = None
    ) -> TensorDictBase:
        td = self._flat(tensordict).copy()
        k = self.tensor_keys
        if td.get(k.action, None) is None:
            raise ValueError(f"RecipeLoss: missing key {k.action!r} (the scored tokens)")
        dist = self._dist(td)
        action = td.get(k.action, as_padded_tensor=True, padding_side="left", padding_value=-100)
        log_probs = dist.log_prob(action)
        old = self._old_log_probs(td)
        if log_probs.shape != old.shape:
            raise ValueError(
                f"RecipeLoss: the current log-probs have shape {list(log_probs.shape)} but "
                f"{k.sample_log_prob!r} has {list(old.shape)}; check masking_strategy and padding"
            )
        mask = dist.mask.bool() & torch.isfinite(old)
        if normalizers is not None and not torch.equal(mask, self.response_mask(td)):
            raise ValueError(
                "RecipeLoss: the actor's mask differs from response_mask(td), so the step's "
                "normalisers would not count this micro-batch's tokens; check the keys and masking_strategy"
            )
        n, width = mask.shape
        adv = self._advantages(td, n, width)
        ref = rollout = entropy = None
        if self._needs_ref:
            ref = td.get(k.ref_log_probs, None, as_padded_tensor=True, padding_side="left", padding_value=0.0)
            if ref is None:
                raise ValueError(
                    f"RecipeLoss: recipe {self.recipe_name!r} reads ref_log_probs (a KL term) but "
                    f"{k.ref_log_probs!r} is missing"
                )
            ref = ref.reshape(n, -1) if ref.dim() == 3 else ref
        if k.rollout_log_probs is not None:
            rollout = td.get(
                k.rollout_log_probs, as_padded_tensor=True, padding_side="left", padding_value=0.0
            )
        elif self._needs_rollout:
            raise ValueError(
                f"RecipeLoss: recipe {self.recipe_name!r} reads rollout_log_probs (the engine's log-probs); "
                "name their key with loss.set_keys(rollout_log_probs=...)"
            )
        if self._needs_entropy:
            entropy = dist.entropy()
        per_token_adv = adv if adv.dim() == 2 else None
        compact, (lp, old_c, adv_c, ref_c, rollout_c, ent_c) = compact_response(
            mask, log_probs, old, per_token_adv, ref, rollout, entropy
        )
        batch = {
            self._key["log_probs"]: lp,
            self._key["old_log_probs"]: old_c,
            self._key["response_mask"]: compact,
            self._key["advantages"]: adv if adv_c is None else adv_c,
        }
        for name, value in (("ref_log_probs", ref_c), ("rollout_log_probs", rollout_c), ("entropy", ent_c)):
            if value is not None:
                batch[self._key[name]] = value
        out = self.policy_loss(TensorDict(batch, batch_size=[n]), normalizers=normalizers)
        result = TensorDict({"loss_objective": out[self._loss_key]}, batch_size=[])
        for key, value in out.items():
            if key != self._loss_key:
                result.set(key, value.detach())
        return result
