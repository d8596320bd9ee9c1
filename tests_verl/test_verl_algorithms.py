"""The loss/algorithms parts and recipes against verl 0.9.1's own policy losses (the installed
package, run inside .venv-verl through tests/test_verl_env.py).

- GMPO (``gmpo``) vs verl ``geo_mean``: equal in value and gradient, with verl's quirks shown where
  they change a result (``loss_agg_mode`` ignored; empty rows counted in the batch mean).
- SAPO (``sapo``) vs verl ``sapo`` (always seq-mean-token-mean in verl).
- Clip-Cov / KL-Cov (``clip_cov``, ``kl_cov``) vs verl ``clip_cov`` / ``kl_cov``, Clip-Cov's random
  selection included (same torch seed, same tokens).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict
from test_verl import Batch, run, verl_batches
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig, PolicyLossConfig

from gspo_components.loss.algorithms.cov import clip_cov, kl_cov
from gspo_components.loss.algorithms.gmpo import gmpo
from gspo_components.loss.recipes import sapo

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
pytestmark = pytest.mark.filterwarnings("ignore:gspo_components verl loss:UserWarning")


def config(
    eps_low: float = 0.2, eps_high: float = 0.2, mode: str = "token-mean", **kwargs: object
) -> ActorConfig:
    """verl's ActorConfig (sapo and cispo refuse a DictConfig); ``policy_loss`` fields by keyword."""
    policy = {k: kwargs.pop(k) for k in list(kwargs) if k in PolicyLossConfig.__dataclass_fields__}
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=eps_low,
        clip_ratio_high=eps_high,
        loss_agg_mode=mode,
        policy_loss=PolicyLossConfig(**policy),
        **kwargs,
    )


def ours(recipe, batch: Batch, advantages: torch.Tensor, *, weights: bool = False, **extra: torch.Tensor):
    """(loss, d loss/d log_probs, output) of a recipe on a verl batch."""
    x = batch.log_probs.clone().requires_grad_()
    entries = {
        "log_probs": x,
        "old_log_probs": batch.old_log_probs,
        "advantages": advantages,
        "response_mask": batch.mask,
        **extra,
    }
    is_weights = batch.weights if weights else None
    out = recipe.loss(TensorDict(entries, batch_size=[batch.mask.shape[0]]), is_weights=is_weights)
    loss = out[recipe.loss.out_key("loss")]
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, out


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> float:
    """Assert closeness; return the max abs difference (for the report)."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    return (a - b).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# GMPO vs verl geo_mean

log_eps = st.sampled_from([(0.4, 0.4), (0.2, 0.2), (0.1, 0.3)]) | st.tuples(
    st.floats(0.01, 2.0), st.floats(0.01, 2.0)
)


@given(data=st.data())
def test_gmpo_equals_verl_geo_mean(data: st.DataObject) -> None:
    """Same ε (log space), sequence advantages, non-empty rows: value and gradient equal to
    rounding (verl divides by Σm + 1e-8, we by Σm), under every loss_agg_mode verl is given —
    geo_mean ignores it and always takes the plain mean over sequences."""
    batch = data.draw(verl_batches(sequence_advantages=True, weights=False))
    eps_low, eps_high = data.draw(log_eps)
    mode = data.draw(st.sampled_from(AGG_MODES))
    theirs = run(get_policy_loss_fn("geo_mean"), batch, mode, config(eps_low, eps_high, mode), weights=False)
    mine = ours(gmpo(eps_low=eps_low, eps_high=eps_high), batch, batch.advantages[:, 0])
    close(mine[0], theirs[0], rtol=1e-9, atol=1e-12)
    close(mine[1], theirs[1], rtol=1e-8, atol=1e-14)


def _fixed_batch(empty_row: bool = False) -> Batch:
    gen = torch.Generator().manual_seed(11)
    lengths = torch.tensor([5, 2, 0 if empty_row else 4, 3])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    lp = torch.where(mask, -torch.rand(4, 5, generator=gen, dtype=torch.float64) * 3, 0.0)
    old = torch.where(mask, lp - (torch.rand(4, 5, generator=gen, dtype=torch.float64) - 0.5), 0.0)
    adv = torch.tensor([[1.0], [-0.5], [2.0], [-1.5]], dtype=torch.float64).expand(4, 5)
    return Batch(
        mask=mask, log_probs=lp, old_log_probs=old, advantages=torch.where(mask, adv, 0.0), weights=None
    )


def test_geo_mean_counts_empty_rows_in_its_mean() -> None:
    """verl's geo_mean is torch.mean over all N rows, an empty row included (it adds 0): with one
    empty row of four, verl's loss and gradient are 3/4 of ours (the mean over non-empty rows)."""
    batch = _fixed_batch(empty_row=True)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    theirs = run(get_policy_loss_fn("geo_mean"), batch, "token-mean", config(0.4, 0.4), weights=False)
    mine = ours(gmpo(), batch, adv)
    torch.testing.assert_close(mine[0] * 3 / 4, theirs[0], rtol=1e-9, atol=0)
    torch.testing.assert_close(mine[1] * 3 / 4, theirs[1], rtol=1e-8, atol=1e-15)


def test_geo_mean_is_not_token_mean() -> None:
    """geo_mean ignores loss_agg_mode: our gmpo(aggregation="token-mean") (length-weighted mean of
    the per-response losses) differs from verl's geo_mean under "token-mean"."""
    batch = _fixed_batch()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    theirs = run(get_policy_loss_fn("geo_mean"), batch, "token-mean", config(0.4, 0.4), weights=False)
    same = ours(gmpo(), batch, adv)
    weighted = ours(gmpo(aggregation="token-mean"), batch, adv)
    torch.testing.assert_close(same[0], theirs[0], rtol=1e-9, atol=0)
    assert not math.isclose(weighted[0].item(), theirs[0].item(), rel_tol=1e-3)


# ---------------------------------------------------------------------------------------------
# SAPO vs verl sapo

taus = st.sampled_from([(1.0, 1.05), (0.5, 2.0)]) | st.tuples(st.floats(0.05, 5.0), st.floats(0.05, 5.0))


@given(data=st.data())
def test_sapo_equals_verl_sapo(data: st.DataObject) -> None:
    """Token or sequence advantages, with and without rollout IS weights, any τ: value and
    gradient equal to rounding; verl's sapo always aggregates seq-mean-token-mean whatever
    loss_agg_mode it is given, which is the recipe's default."""
    batch = data.draw(verl_batches())
    tau_pos, tau_neg = data.draw(taus)
    mode = data.draw(st.sampled_from(AGG_MODES))
    cfg = config(mode=mode, tau_pos=tau_pos, tau_neg=tau_neg)
    theirs = run(get_policy_loss_fn("sapo"), batch, mode, cfg)
    mine = ours(sapo(tau_pos=tau_pos, tau_neg=tau_neg), batch, batch.advantages, weights=True)
    close(mine[0], theirs[0], rtol=1e-12, atol=1e-14)
    close(mine[1], theirs[1], rtol=1e-10, atol=1e-15)


def test_sapo_defaults_are_verls() -> None:
    default = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    clipper = sapo().loss.clipper
    assert (clipper.tau_pos, clipper.tau_neg) == (default.tau_pos, default.tau_neg) == (1.0, 1.05)


# ---------------------------------------------------------------------------------------------
# Clip-Cov / KL-Cov vs verl clip_cov / kl_cov

cov_ratios = st.sampled_from([2e-4, 0.01, 0.1, 0.5, 1.0])


@given(data=st.data())
def test_clip_cov_equals_verl_clip_cov_with_the_same_seed(data: st.DataObject) -> None:
    """Same torch seed before each call: the same tokens are drawn, so value and gradient agree
    (with token or sequence advantages, rollout IS weights, any aggregation verl shares)."""
    batch = data.draw(verl_batches())
    eps_low, eps_high = data.draw(st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)]))
    ratio = data.draw(cov_ratios)
    lb, ub = data.draw(st.sampled_from([(1.0, 5.0), (0.25, 2.0), (-1.0, 10.0)]))
    mode = data.draw(st.sampled_from(AGG_MODES))
    seed = data.draw(st.integers(0, 2**31 - 1))
    cfg = config(eps_low, eps_high, mode, clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    torch.manual_seed(seed)
    theirs = run(get_policy_loss_fn("clip_cov"), batch, mode, cfg)
    torch.manual_seed(seed)
    recipe = clip_cov(eps_low=eps_low, eps_high=eps_high, clip_ratio=ratio, lb=lb, ub=ub, aggregation=mode)
    mine = ours(recipe, batch, batch.advantages, weights=True)
    close(mine[0], theirs[0], rtol=1e-12, atol=1e-14)
    close(mine[1], theirs[1], rtol=1e-10, atol=1e-15)


def _cov_batch() -> Batch:
    """Eight sequences of 16 tokens with spread log-probs and advantages: many tokens have
    1 < Cov < 5, so the random draw matters."""
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([16, 9, 12, 3, 16, 7, 10, 14])
    mask = torch.arange(16).unsqueeze(0) < lengths.unsqueeze(1)
    lp = torch.where(mask, -torch.rand(8, 16, generator=gen, dtype=torch.float64) * 6, 0.0)
    old = torch.where(mask, lp - 0.05 * torch.randn(8, 16, generator=gen, dtype=torch.float64), 0.0)
    adv = (torch.randn(8, 1, generator=gen, dtype=torch.float64) * 2).expand(8, 16)
    return Batch(
        mask=mask, log_probs=lp, old_log_probs=old, advantages=torch.where(mask, adv, 0.0), weights=None
    )


def test_clip_cov_draw_is_random_and_seeded_like_verl() -> None:
    """Different seeds select different tokens (the losses differ), the same seed the same ones
    as verl; and a private generator leaves the global stream untouched."""
    batch = _cov_batch()
    cfg = config(clip_cov_ratio=0.05)
    losses = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        theirs = run(get_policy_loss_fn("clip_cov"), batch, "token-mean", cfg)
        torch.manual_seed(seed)
        mine = ours(clip_cov(clip_ratio=0.05), batch, batch.advantages[:, 0])
        assert torch.equal(mine[0], theirs[0]) or math.isclose(mine[0], theirs[0], rel_tol=1e-13)
        torch.testing.assert_close(mine[1], theirs[1], rtol=1e-12, atol=1e-16)
        # the number of Cov-selected tokens: max(int(0.05 · 87), 1) = 4 zero-gradient tokens beyond PPO's
        assert mine[2]["clip_fraction"].item() * 87 >= 4 - 1e-6
        losses.append(mine[0].item())
    assert len(set(losses)) == 3, losses
    state = torch.get_rng_state()
    ours(clip_cov(clip_ratio=0.05, generator=torch.Generator().manual_seed(0)), batch, batch.advantages[:, 0])
    assert torch.equal(torch.get_rng_state(), state)


@given(data=st.data())
def test_kl_cov_equals_verl_kl_cov(data: st.DataObject) -> None:
    """Deterministic top-k by Cov: value and gradient agree, with IS weights, any aggregation."""
    batch = data.draw(verl_batches())
    ratio = data.draw(cov_ratios)
    coef = data.draw(st.sampled_from([0.1, 1.0, 3.0]))
    mode = data.draw(st.sampled_from(AGG_MODES))
    cfg = config(mode=mode, kl_cov_ratio=ratio, ppo_kl_coef=coef)
    theirs = run(get_policy_loss_fn("kl_cov"), batch, mode, cfg)
    mine = ours(kl_cov(kl_ratio=ratio, kl_coef=coef, aggregation=mode), batch, batch.advantages, weights=True)
    close(mine[0], theirs[0], rtol=1e-12, atol=1e-14)
    close(mine[1], theirs[1], rtol=1e-10, atol=1e-15)


def test_cov_recipe_defaults_are_verls() -> None:
    default = PolicyLossConfig()
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    c = clip_cov().loss.clipper
    assert (c.clip_ratio, c.lb, c.ub) == (default.clip_cov_ratio, default.clip_cov_lb, default.clip_cov_ub)
    assert (c.eps_low, c.eps_high) == (actor.clip_ratio_low, actor.clip_ratio_high)
    k = kl_cov().loss.clipper
    assert (k.kl_ratio, k.kl_coef) == (default.kl_cov_ratio, default.ppo_kl_coef)
    assert clip_cov().loss.objective.aggregation == kl_cov().loss.objective.aggregation == actor.loss_agg_mode
