"""Any recipe through the verl adapter (verl 0.9.1 itself, run inside .venv-verl).

- Every stock recipe of ``gspo_components.RECIPES`` that verl can feed, registered by the plugin,
  runs through verl's own ``ppo_loss`` and equals ``recipe.loss`` on the same batch.
- A user-written recipe (a Clipper and a TokenFilter written here, composed with
  ``gspo_components.compose``) registered as a Recipe object: its loss equals its own
  ``recipe.loss(td)`` and a float64 plain-loop reference of its formula, through verl's registry
  and ``ppo_loss``.
- The paths that warn or refuse: a Recipe object's clip band is not overridden by verl's config
  (warned once), verl's loss_agg_mode other than the recipe's (warned once, applied), recipes that
  read entries verl does not pass, bad registrations.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tensordict import TensorDict
from test_verl import PREFIX, VERL_RECIPES, _fixed_batch, _ppo_loss_inputs, actor_config, run
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.utils.losses import ppo_loss

import gspo_components as gc
import gspo_components.integrations.verl as verl_adapter
from gspo_components.integrations.verl import register_verl_losses, verl_policy_loss
from gspo_components.loss.numerics import Padding, clamped_ratio


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


def custom_recipe(
    aggregation: str = "seq-mean-token-mean", band: float = 0.1, max_tokens: int = 4
) -> gc.Recipe:
    return gc.compose(
        "hard_gate",
        gc.GroupNormalizedAdvantage(),
        gc.TokenLogRatio(),
        HardGate(band),
        aggregation=aggregation,
        filters=[ShortResponsesOnly(max_tokens)],
    )


def plain_loop_loss(log_probs, old, adv, mask, band: float, max_tokens: int) -> torch.Tensor:
    """The custom recipe's loss from its formula, float64, one response at a time
    (seq-mean-token-mean: mean over responses of the token mean, removed responses still counted)."""
    rows = []
    for i in range(mask.shape[0]):
        length = int(mask[i].sum())
        keep = 1.0 if length <= max_tokens else 0.0
        total = log_probs.new_zeros(())
        for t in range(length):
            lr = log_probs[i, t] - old[i, t]
            total = total + (0.0 if abs(lr.item()) > band else -torch.exp(lr) * adv[i, t] * keep)
        rows.append(total / length)
    return torch.stack(rows).mean()


def recipe_loss(recipe: gc.Recipe, log_probs, old, adv, mask, **kwargs):
    td = TensorDict(
        {"log_probs": log_probs, "old_log_probs": old, "advantages": adv, "response_mask": mask},
        batch_size=[mask.shape[0]],
    )
    return recipe.loss(td, **kwargs)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verl_adapter, "_WARNED", set())


# ---------------------------------------------------------------------------------------------
# Every stock recipe


@pytest.mark.parametrize("name", VERL_RECIPES)
def test_every_stock_recipe_through_verls_ppo_loss(name: str) -> None:
    """Registered by the plugin, selected by name in verl's config, called by verl's ppo_loss with
    the recipe's own clip band and aggregation: the gradient with respect to the model's unpadded
    log-probs is that of ``recipe.loss`` on the padded batch (verl's [N, T] advantages reduced to
    one per response for a clipper that takes only those, as verl's geo_mean does)."""
    recipe = gc.RECIPES[name]()
    params = getattr(recipe.loss.clipper, "params", {})
    low, high = params.get("eps_low"), params.get("eps_high")
    clip = {} if high is None else {"eps_low": 0.2 if low is None else low, "eps_high": high}
    mode = recipe.loss.objective.aggregation
    data, flat, mask = _ppo_loss_inputs(11, weights=False)
    config = actor_config(mode=mode, loss_mode=PREFIX + name, **clip)
    torch.manual_seed(0)  # the same draws for a recipe with a random part (Clip-Cov's token selection)
    loss, metrics = ppo_loss(config, {"log_probs": flat}, data)
    (grad,) = torch.autograd.grad(loss, flat)
    assert {"actor/pg_loss", "actor/pg_clipfrac"} <= set(metrics)

    flat_ref = flat.detach().clone().requires_grad_()
    log_probs = _padded(flat_ref, mask, prompt=3)
    adv = data["advantages"].expand_as(mask)
    out = None
    for advantages in (adv, torch.where(mask, adv, 0.0).sum(-1) / mask.sum(-1)):
        try:
            torch.manual_seed(0)
            out = recipe_loss(recipe, log_probs, data["old_log_probs"], advantages, mask)
            break
        except ValueError:  # a clipper that takes one advantage per response refuses [N, T]
            continue
    ref = out[recipe.loss.out_key("loss")]
    (ref_grad,) = torch.autograd.grad(ref, flat_ref)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-15)


def _padded(flat: torch.Tensor, mask: torch.Tensor, *, prompt: int) -> torch.Tensor:
    """The [N, T] response log-probs inside ``_ppo_loss_inputs``'s unpadded layout (differentiable)."""
    rows, offset = [], 0
    for length in mask.sum(-1).tolist():
        row = flat[offset + prompt - 1 : offset + prompt - 1 + length]
        rows.append(torch.cat([row, row.new_zeros(mask.shape[1] - length)]))
        offset += prompt + length
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# A user-written recipe


def _custom_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lengths 4, 2, 5, 3 (max_tokens = 4 removes the third); log-ratios of ±0.3 so the gate cuts
    some tokens; per-token advantages constant per response, 0 at padding, as verl's."""
    batch = _fixed_batch()
    mask = torch.cat([batch.mask, torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)])
    gen = torch.Generator().manual_seed(5)
    lp = -torch.rand(4, 5, generator=gen, dtype=torch.float64)
    old = lp - torch.randn(4, 5, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.tensor([[1.0], [-0.5], [0.7], [-1.2]], dtype=torch.float64) * mask
    return lp, old, adv, mask


def test_user_recipe_registered_as_a_recipe_object() -> None:
    recipe = custom_recipe()
    registered = register_verl_losses(prefix="mine/", recipes=[recipe])
    assert list(registered) == ["mine/hard_gate"]
    fn = get_policy_loss_fn("mine/hard_gate")
    assert fn is registered["mine/hard_gate"]
    lp, old, adv, mask = _custom_batch()
    x = lp.clone().requires_grad_()
    # verl's config carries a clip band; the recipe has none to override (no eps_low / eps_high)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, metrics = fn(
            old_log_prob=old,
            log_prob=x,
            advantages=adv,
            response_mask=mask,
            loss_agg_mode="seq-mean-token-mean",
            config=actor_config(0.2, 0.2),
        )
    (grad,) = torch.autograd.grad(loss, x)
    y = lp.clone().requires_grad_()
    own = recipe_loss(recipe, y, old, adv, mask)
    own_loss = own[recipe.loss.out_key("loss")]
    (own_grad,) = torch.autograd.grad(own_loss, y)
    assert torch.equal(loss, own_loss) and torch.equal(grad, own_grad)
    z = lp.clone().requires_grad_()
    ref = plain_loop_loss(z, old, adv, mask, band=0.1, max_tokens=4)
    (ref_grad,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)
    # the gate and the filter both acted, and the metrics say how much
    lengths = mask.sum(-1)
    removed = float(lengths[lengths > 4].sum() / lengths.sum())
    assert metrics["actor/gspo_components/filtered_long_responses"] == pytest.approx(removed)
    gated = ((lp - old).abs() > 0.1) & mask
    assert 0 < metrics["actor/pg_clipfrac"] == pytest.approx(float(gated.sum() / mask.sum()))
    assert removed > 0


def test_user_recipe_through_verls_ppo_loss() -> None:
    """The same recipe selected by name in verl's config and called by verl's ppo_loss (unpadded
    model log-probs, global batch info), with rollout IS weights: equal to recipe.loss(td,
    is_weights=...)."""
    recipe = custom_recipe(max_tokens=6)
    register_verl_losses(prefix="mine/", recipes={"gate": recipe})
    data, flat, mask = _ppo_loss_inputs(3, weights=True)
    config = actor_config(mode="seq-mean-token-mean", loss_mode="mine/gate")
    loss, _ = ppo_loss(config, {"log_probs": flat}, data)
    (grad,) = torch.autograd.grad(loss, flat)
    flat_ref = flat.detach().clone().requires_grad_()
    out = recipe_loss(
        recipe,
        _padded(flat_ref, mask, prompt=3),
        data["old_log_probs"],
        data["advantages"].expand_as(mask),
        mask,
        is_weights=data["rollout_is_weights"],
    )
    ref = out[recipe.loss.out_key("loss")]
    (ref_grad,) = torch.autograd.grad(ref, flat_ref)
    assert float(out["clip_fraction"]) > 0 and float(out["filtered_long_responses"]) > 0
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Warnings and refusals


def test_recipe_object_keeps_its_clip_band_and_warns_once() -> None:
    """A Recipe object runs as built: verl's clip_ratio_low/high are not applied to it (a stock
    name is rebuilt with them); a differing config warns once, an equal one does not."""
    recipe = gc.dapo()  # PPOClip 0.2 / 0.28, as an object
    batch = _fixed_batch()
    fn = verl_policy_loss(recipe)
    with pytest.warns(
        UserWarning, match=r"\(clip_ratio_low, clip_ratio_high\) = \(0\.0003, 0\.0004\).*\(0\.2, 0\.28\)"
    ):
        loss, _, _ = run(fn, batch, "token-mean", actor_config(3e-4, 4e-4, "token-mean"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _, _ = run(fn, batch, "token-mean", actor_config(3e-4, 4e-4, "token-mean"))  # once
        same, _, _ = run(fn, batch, "token-mean", actor_config(0.2, 0.28, "token-mean"))
    assert torch.equal(loss, again) and torch.equal(loss, same)
    lp, old, adv, mask = batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask
    own = recipe_loss(recipe, lp, old, adv, mask)[recipe.loss.out_key("loss")]
    assert torch.equal(loss, own)
    by_name, _, _ = run(verl_policy_loss("dapo"), batch, "token-mean", actor_config(3e-4, 4e-4, "token-mean"))
    narrow = recipe_loss(gc.dapo(eps_low=3e-4, eps_high=4e-4), lp, old, adv, mask)["loss"]
    assert torch.equal(by_name, narrow) and not torch.allclose(by_name, loss)


def test_recipe_object_follows_verls_aggregation_with_a_warning() -> None:
    recipe = custom_recipe()
    lp, old, adv, mask = _custom_batch()
    fn = verl_policy_loss(recipe)
    x = lp.clone().requires_grad_()
    with pytest.warns(
        UserWarning, match=r"'hard_gate' runs with loss_agg_mode='token-mean'.*'seq-mean-token-mean'"
    ):
        loss, _ = fn(
            old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode="token-mean"
        )
    token_mean = recipe_loss(custom_recipe("token-mean"), lp, old, adv, mask)["loss"]
    own = recipe_loss(recipe, lp, old, adv, mask)["loss"]
    assert torch.equal(loss.detach(), token_mean) and not torch.allclose(token_mean, own)
    assert recipe.loss.objective.aggregation == "seq-mean-token-mean"  # the recipe is not changed


class EntropyFilter(gc.TokenFilter):
    inputs = ("entropy",)

    def keep(self, padding: Padding, entropy: torch.Tensor) -> torch.Tensor:
        return entropy > 0.5


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        (gc.grpo(kl_coef=0.1), r"kl_coef = 0\.1 > 0.*use_kl_loss"),
        (gc.grpo(entropy_coef=0.01), r"entropy_coef = 0\.01 != 0.*entropy_coeff"),
        (gc.grpo(rollout_correction=gc.RolloutCorrection()), r"rollout_correction.*rollout_is_weights"),
        (gc.grpo(filters=[EntropyFilter()]), r"reads \['entropy'\], which this trainer does not provide"),
        ("ppo", r"name of a stock recipe.*got 'ppo'"),
        (gc.grpo().loss, r"got PolicyLoss"),
    ],
    ids=["kl", "entropy-bonus", "rollout-correction", "entropy-filter", "unknown-name", "not-a-recipe"],
)
def test_recipes_verl_cannot_feed_are_refused(recipe: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        verl_policy_loss(recipe)
    with pytest.raises(ValueError, match=match):
        register_verl_losses(prefix="refused/", recipes=[recipe])


def test_bad_registrations() -> None:
    with pytest.raises(ValueError, match="two recipes would be registered as 'gspo'"):
        register_verl_losses(prefix="dup/", recipes=["gspo", gc.gspo(eps_low=0.1)])
    one = register_verl_losses(prefix="single/", recipes="gspo")  # a bare name is one recipe
    assert list(one) == ["single/gspo"]
