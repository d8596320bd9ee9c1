"""The loss/algorithms recipes against TRL 1.16's own GRPOTrainer._compute_loss, on the same generated
batch (the tiny Qwen3 of conftest.py, CPU, no vLLM): the fixture and helpers of test_trl.py.

- SAPO (``loss_type="sapo"``), VESPO (``"vespo"``), LUSPO (``"luspo"``, sequence level): value and
  gradient equal.
- INTELLECT-2's two-sided clip (``delta=δ``): equal to ``PPOClip(dual_clip=δ)`` when δ ≥ 1 + ε_high
  (INTELLECT-2 uses δ = 4 with ε = 0.2); for 1 < δ < 1 + ε_high TRL's formula
  −min(min(w, δ) Â, clip(w) Â) is PPOClip(ε_low, δ − 1, dual_clip = 1 + ε_high) instead.
"""

from __future__ import annotations

import pytest
import test_trl
import torch
from test_trl import _assert_close, _loss_and_grads, _plain_log_probs
from trl import GRPOTrainer

import gspo_components as gc
from gspo_components.integrations.trl import RecipeGRPOTrainer
from gspo_components.loss.algorithms.luspo import luspo
from gspo_components.loss.algorithms.vespo import vespo
from gspo_components.loss.recipes import sapo

same_batch = test_trl.same_batch  # the module-scoped fixture: one generated batch, off-policy π_old


def _pair(tmp_path, tok, make_model, batch, trl_settings, recipe):
    theirs = _loss_and_grads(GRPOTrainer, tmp_path / "trl", tok, make_model, batch, trl_settings)
    ours = _loss_and_grads(RecipeGRPOTrainer, tmp_path / "ours", tok, make_model, batch, {}, recipe=recipe)
    return ours, theirs


def _diffs(ours, theirs) -> tuple[float, float]:
    grad = max((a - b).abs().max().item() for a, b in zip(ours[1], theirs[1], strict=True))
    return (ours[0] - theirs[0]).abs().item(), grad


def _assert_same(ours, theirs) -> None:
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)  # float32 sums of O(1) terms
    _assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)
    print("max |Δloss| = {:.3g}, max |Δgrad| = {:.3g}".format(*_diffs(ours, theirs)))


def _differs(ours, theirs) -> bool:
    value = torch.allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-7)
    grads = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ours[1], theirs[1], strict=True))
    return not (value and grads)


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_equals_trl_sapo(tmp_path, tiny_tokenizer, make_tiny_model, same_batch, taus) -> None:
    settings = {"loss_type": "sapo", "sapo_temperature_pos": taus[0], "sapo_temperature_neg": taus[1]}
    recipe = sapo(tau_pos=taus[0], tau_neg=taus[1])
    _assert_same(*_pair(tmp_path, tiny_tokenizer, make_tiny_model, same_batch, settings, recipe))


def test_sapo_defaults_are_trls() -> None:
    from trl import GRPOConfig

    field = GRPOConfig.__dataclass_fields__
    clipper = sapo().loss.clipper
    assert (clipper.tau_pos, clipper.tau_neg) == (
        field["sapo_temperature_pos"].default,
        field["sapo_temperature_neg"].default,
    )


@pytest.mark.parametrize("params", [(2.0, 3.0, 3.0, 2.0), (1.0, 0.5, 4.0, 1.5)])
def test_vespo_equals_trl_vespo(tmp_path, tiny_tokenizer, make_tiny_model, same_batch, params) -> None:
    names = ("k_pos", "lambda_pos", "k_neg", "lambda_neg")
    settings = {"loss_type": "vespo", "importance_sampling_level": "token"}
    settings.update({f"vespo_{n}": v for n, v in zip(names, params, strict=True)})
    recipe = vespo(**dict(zip(names, params, strict=True)))
    _assert_same(*_pair(tmp_path, tiny_tokenizer, make_tiny_model, same_batch, settings, recipe))


def test_vespo_defaults_are_trls() -> None:
    from trl import GRPOConfig

    field = GRPOConfig.__dataclass_fields__
    c = vespo().loss.clipper
    assert (c.k_pos, c.lambda_pos, c.k_neg, c.lambda_neg) == tuple(
        field[f"vespo_{n}"].default for n in ("k_pos", "lambda_pos", "k_neg", "lambda_neg")
    )


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.2, 0.28)])
def test_luspo_equals_trl_luspo(tmp_path, tiny_tokenizer, make_tiny_model, same_batch, eps) -> None:
    settings = {
        "loss_type": "luspo",
        "importance_sampling_level": "sequence",
        "epsilon": eps[0],
        "epsilon_high": eps[1],
    }
    recipe = luspo(eps_low=eps[0], eps_high=eps[1])
    ours, theirs = _pair(tmp_path, tiny_tokenizer, make_tiny_model, same_batch, settings, recipe)
    _assert_same(ours, theirs)
    # and it is not GSPO (the length weighting matters on this batch of uneven lengths)
    gspo = _loss_and_grads(
        RecipeGRPOTrainer,
        tmp_path / "gspo",
        tiny_tokenizer,
        make_tiny_model,
        same_batch,
        {},
        recipe=gc.gspo(eps_low=eps[0], eps_high=eps[1]),
    )
    assert _differs(gspo, theirs)


def _ratios(make_model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        lp = _plain_log_probs(make_model(0), batch)
    w = torch.exp(lp - batch["old_per_token_logps"])
    mask = batch["completion_mask"].bool()
    adv = batch["advantages"][:, None].expand_as(w)
    return w, adv, mask


def test_two_sided_delta_equals_dual_clip(tmp_path, tiny_tokenizer, make_tiny_model, same_batch) -> None:
    """δ = 1.5 > 1 + ε_high = 1.2: TRL's delta equals PPOClip(dual_clip=1.5) in value and
    gradient; the batch holds negative-advantage tokens with w > δ, so δ acts (TRL without it
    differs)."""
    w, adv, mask = _ratios(make_tiny_model, same_batch)
    assert ((adv < 0) & (w > 1.5) & mask).any()
    settings = {"loss_type": "grpo", "delta": 1.5}
    ours, theirs = _pair(
        tmp_path, tiny_tokenizer, make_tiny_model, same_batch, settings, gc.grpo(dual_clip=1.5)
    )
    _assert_same(ours, theirs)
    plain = _loss_and_grads(
        GRPOTrainer, tmp_path / "plain", tiny_tokenizer, make_tiny_model, same_batch, {"loss_type": "grpo"}
    )
    assert _differs(plain, theirs)


def test_two_sided_delta_below_the_clip_band_is_not_dual_clip(
    tmp_path, tiny_tokenizer, make_tiny_model, same_batch
) -> None:
    """δ = 1.1 < 1 + ε_high = 1.2: TRL's −min(min(w, δ) Â, clip(w, 0.8, 1.2) Â) caps positive
    advantages at δ (w > 1.1 clipped) and negative ones at 1.2 (not δ): it is
    PPOClip(0.2, 0.1, dual_clip=1.2), and not PPOClip(0.2, 0.2, dual_clip=1.1)."""
    w, adv, mask = _ratios(make_tiny_model, same_batch)
    assert ((adv > 0) & (w > 1.1) & mask).any() and ((adv < 0) & (w > 1.1) & (w < 1.2) & mask).any()
    settings = {"loss_type": "grpo", "delta": 1.1}
    ours, theirs = _pair(
        tmp_path, tiny_tokenizer, make_tiny_model, same_batch, settings, gc.grpo(dual_clip=1.1)
    )
    assert _differs(ours, theirs)
    equivalent = _loss_and_grads(
        RecipeGRPOTrainer,
        tmp_path / "eq",
        tiny_tokenizer,
        make_tiny_model,
        same_batch,
        {},
        recipe=gc.grpo(eps_low=0.2, eps_high=0.1, dual_clip=1.2),
    )
    _assert_same(equivalent, theirs)
