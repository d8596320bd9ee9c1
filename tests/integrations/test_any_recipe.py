"""A user-written recipe in the torchrl and TRL adapters, and the TRL settings a recipe replaces.

The recipe is composed here with ``gspo_components.compose`` from a Clipper and a TokenFilter
written in this file (a hard gate on the log-ratio, and a filter that keeps short responses); no
adapter knows these parts. It runs

- in torchrl's ``RecipeLoss`` on a real ``TransformersWrapper`` rollout, and
- in TRL's ``GRPOTrainer`` (``RecipeGRPOTrainer``): real optimizer steps whose accumulated gradient
  equals the recipe's on the whole window, and ``_compute_loss`` on an off-policy batch,

each time equal to its own ``recipe.loss(td)`` on the same batch (log-probs from a plain forward
pass), with the gate and the filter both acting. TRL: ``loss_type`` / ``importance_sampling_level``
warn; ``top_entropy_quantile`` / ``off_policy_mask_threshold`` become TopEntropyFilter / OPSMFilter
on a copy of the recipe and then equal TRL's own masked loss.
"""

from __future__ import annotations

import warnings

import pytest
import test_torchrl
import test_trl
import torch
from test_trl import (
    PROMPTS,
    SPG4,
    G,
    WindowGradientCheck,
    _assert_close,
    _config,
    _loss_and_grads,
    _trainer,
)
from trl import GRPOTrainer

import gspo_components as gc
from gspo_components.integrations.torchrl import RecipeLoss
from gspo_components.integrations.trl import RecipeGRPOTrainer
from gspo_components.loss.algorithms.top_entropy import TopEntropyFilter
from gspo_components.loss.numerics import Padding, clamped_ratio

same_batch = test_trl.same_batch  # one generated TRL batch, off-policy π_old (module-scoped fixture)
rollout = test_torchrl.rollout  # one torchrl rollout through TransformersWrapper and MCAdvantage
_list_to_stack = test_torchrl._list_to_stack


class HardGate(gc.Clipper):
    """−J_t = −w_t Â inside the band |log w_t| ≤ ``band``, 0 (and no gradient) outside it."""

    def __init__(self, band: float = 0.1, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.band = band
        self.params.update(band=band)

    def surrogate(self, log_ratio, advantages, padding: Padding, **inputs):
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        outside = log_ratio.abs() > self.band
        w = clamped_ratio(log_ratio, self.max_log_ratio)
        return torch.where(outside, torch.zeros_like(w), -(w * adv)), outside & padding.mask


class ShortResponsesOnly(gc.TokenFilter):
    """Keeps the responses of at most ``max_tokens`` tokens (one decision per response)."""

    name = "long_responses"

    def __init__(self, max_tokens: int, **keys: object) -> None:
        super().__init__(**keys)
        self.max_tokens = max_tokens

    def keep(self, padding: Padding) -> torch.Tensor:
        return padding.lengths <= self.max_tokens


def custom_recipe(max_tokens: int = 7, aggregation: str = "seq-mean-token-mean") -> gc.Recipe:
    return gc.compose(
        "hard_gate",
        gc.GroupNormalizedAdvantage(),
        gc.TokenLogRatio(),
        HardGate(0.1),
        aggregation=aggregation,
        filters=[ShortResponsesOnly(max_tokens)],
    )


# ---------------------------------------------------------------------------------------------
# torchrl


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_user_recipe_in_torchrl(rollout, aggregation):
    model, batch = rollout["model"], rollout["batch"]
    prompt = batch["tokens", "prompt"].shape[-1]
    lengths = batch["masks", "all_attention_mask"][:, prompt:].sum(-1)
    max_tokens = int(lengths.float().median())
    assert (lengths > max_tokens).any() and (lengths <= max_tokens).any()
    recipe = custom_recipe(max_tokens, aggregation)
    out = RecipeLoss(test_torchrl._scorer(model, rollout["tokenizer"]), recipe)(batch)
    ref = test_torchrl._reference(recipe, model, batch)
    ref_loss = ref[recipe.loss.out_key("loss")]
    torch.testing.assert_close(out["loss_objective"], ref_loss, rtol=1e-5, atol=1e-7)
    expected = test_torchrl._grads(ref_loss, model)
    assert any(g.abs().sum() > 0 for g in expected)
    test_torchrl._assert_grads_close(test_torchrl._grads(out["loss_objective"], model), expected)
    removed = float(lengths[lengths > max_tokens].sum() / lengths.sum())
    assert float(out["filtered_long_responses"]) == pytest.approx(removed)
    assert 0 < float(out["clip_fraction"]) < 1  # the gate cut some tokens (π_old perturbed by 0.3)


# ---------------------------------------------------------------------------------------------
# TRL


def test_user_recipe_in_trl_compute_loss(tmp_path, tiny_tokenizer, make_tiny_model, same_batch):
    lengths = same_batch["completion_mask"].sum(-1)
    recipe = custom_recipe(max_tokens=int(lengths.max()) - 1)  # the longest responses are filtered out
    assert (lengths <= recipe.loss.filters[0].max_tokens).any()
    loss, grads, metrics = _loss_and_grads(
        RecipeGRPOTrainer, tmp_path, tiny_tokenizer, make_tiny_model, same_batch, {}, recipe=recipe
    )
    model = make_tiny_model(0)
    ref = test_trl._reference_loss(recipe, model, same_batch)
    expected = test_trl._grads(ref, model)
    assert any(g.abs().sum() > 0 for g in expected)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-8)
    _assert_close(grads, expected, rtol=1e-5, atol=1e-7)
    assert 0 < metrics["recipe/clip_fraction"][-1] < 1
    assert 0 < metrics["recipe/filtered_long_responses"][-1] < 1


def test_user_recipe_trains_in_trl(tmp_path, tiny_tokenizer, make_tiny_model):
    """Two real optimizer steps (the second off-policy) of GRPOTrainer's loop with the user's
    recipe: before each, the accumulated gradient equals the recipe's on the whole window."""
    check = WindowGradientCheck()
    args = _config(
        tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, **SPG4
    )
    recipe = custom_recipe(max_tokens=7)
    tr = _trainer(
        RecipeGRPOTrainer, make_tiny_model(0), tiny_tokenizer, args, recipe=recipe, callbacks=[check]
    )
    check.trainer = tr
    tr.train()
    assert tr.recipe is recipe  # no TRL mask was asked for: the recipe runs as given
    assert len(check.windows) == 2
    for window in check.windows:
        assert any(g.abs().sum() > 0 for g in window["actual"])
        _assert_close(window["actual"], window["expected"], rtol=1e-5, atol=1e-6)
    logged = [
        h["recipe/filtered_long_responses"] for h in tr.state.log_history if "recipe/clip_fraction" in h
    ]
    assert len(logged) == 2


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("loss_type", "grpo"),
        ("importance_sampling_level", "sequence"),
        ("epsilon", 0.3),
        ("epsilon_high", 0.5),
    ],
)
def test_trl_settings_the_recipe_replaces_warn_once(
    tmp_path, tiny_tokenizer, make_tiny_model, setting, value
):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(
            RecipeGRPOTrainer,
            make_tiny_model(0),
            tiny_tokenizer,
            _config(tmp_path, **{setting: value}),
            recipe=gc.gspo(),
        )
    ours = [str(w.message) for w in caught if "RecipeGRPOTrainer" in str(w.message)]
    assert len(ours) == 1, ours
    assert f"GRPOConfig.{setting}={value!r} is ignored: the recipe 'gspo'" in ours[0]
    with pytest.warns(UserWarning, match=rf"GRPOConfig\.{setting}={value!r} is ignored"):
        _trainer(
            RecipeGRPOTrainer,
            make_tiny_model(0),
            tiny_tokenizer,
            _config(tmp_path, **{setting: value}),
            recipe=gc.gspo(),
        )
    with warnings.catch_warnings(record=True) as caught:  # TRL's defaults: nothing to say
        warnings.simplefilter("always")
        _trainer(RecipeGRPOTrainer, make_tiny_model(0), tiny_tokenizer, _config(tmp_path), recipe=gc.gspo())
    assert not [w for w in caught if "RecipeGRPOTrainer" in str(w.message)]


def _opsm_threshold(batch, model) -> float:
    """δ halfway between the smallest and largest mean k1 KL(π_old ‖ π_θ) of the batch's
    negative-advantage responses, so OPSM drops some of them and keeps others."""
    log_probs = test_trl._plain_log_probs(model, batch).detach()
    mask = batch["completion_mask"].bool()
    kl = torch.where(mask, batch["old_per_token_logps"] - log_probs, 0.0).sum(-1) / mask.sum(-1)
    negative = kl[batch["advantages"] < 0]
    assert negative.numel() >= 2 and negative.min() < negative.max()
    return float(negative.min() + negative.max()) / 2


TRL_MASKS = {
    # TRL setting: (its value from the batch and model, metric of the filter it becomes)
    "top_entropy_quantile": (lambda batch, model: 0.5, "recipe/filtered_top_entropy"),
    "off_policy_mask_threshold": (_opsm_threshold, "recipe/filtered_opsm"),
}


@pytest.mark.parametrize("setting", list(TRL_MASKS))
def test_trl_masks_become_filters_and_equal_trl(
    tmp_path, tiny_tokenizer, make_tiny_model, same_batch, setting
):
    """TRL's top-entropy and OPSM masks, set in GRPOConfig, are appended to a copy of the recipe as
    TopEntropyFilter / OPSMFilter: the loss and gradients then equal TRL's own grpo loss with the
    same setting, and differ from the recipe without the mask."""
    threshold, metric = TRL_MASKS[setting]
    value = threshold(same_batch, make_tiny_model(0))
    recipe = gc.grpo()
    theirs = _loss_and_grads(
        GRPOTrainer,
        tmp_path / "trl",
        tiny_tokenizer,
        make_tiny_model,
        same_batch,
        {"loss_type": "grpo", setting: value},
    )
    ours = _loss_and_grads(
        RecipeGRPOTrainer,
        tmp_path / "ours",
        tiny_tokenizer,
        make_tiny_model,
        same_batch,
        {setting: value},
        recipe=recipe,
    )
    plain = _loss_and_grads(
        RecipeGRPOTrainer, tmp_path / "plain", tiny_tokenizer, make_tiny_model, same_batch, {}, recipe=recipe
    )
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-8)
    _assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)
    assert 0 < ours[2][metric][-1] < 1
    assert not torch.allclose(ours[0], plain[0], rtol=1e-4, atol=1e-6)
    assert len(recipe.loss.filters) == 0  # the user's recipe is not changed


def test_trl_mask_already_in_the_recipe_is_refused(tmp_path, tiny_tokenizer, make_tiny_model):
    recipe = gc.grpo(filters=[TopEntropyFilter(0.2)])
    with pytest.raises(ValueError, match=r"top_entropy_quantile = 0\.5 would add a 'top_entropy' filter"):
        _trainer(
            RecipeGRPOTrainer,
            make_tiny_model(0),
            tiny_tokenizer,
            _config(tmp_path, top_entropy_quantile=0.5),
            recipe=recipe,
        )
    tr = _trainer(RecipeGRPOTrainer, make_tiny_model(0), tiny_tokenizer, _config(tmp_path), recipe=recipe)
    batch = tr._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:2] for _ in range(G)])
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    tr._compute_loss(tr.model, batch)  # the recipe's own filter reads the entropies TRL computed
    assert 0 < tr._metrics["train"]["recipe/filtered_top_entropy"][-1] < 1
