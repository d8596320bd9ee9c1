"""Rollout-correction modes against verl 0.9.1's own functions (verl/trainer/ppo/rollout_corr_helper.py).

Runs in ``.venv-verl`` through tests/test_verl_env.py. Checks, on random float64 batches:

- ``RolloutCorrection(mode="icepop")`` (token and sequence-product level) equals verl's
  ``compute_rollout_correction_weights(rollout_is="token"/"sequence", rollout_is_threshold="lo_hi")``
  (verl's IcePop, preset ``decoupled_token_icepop``), and ``truncate`` equals verl's TIS;
- ``RolloutCorrection(mode="seq-mask-tis")`` equals verl's ``compute_rollout_correction_and_rejection_mask``
  with ``rollout_is`` TIS and ``rollout_rs="seq_mean_k1"`` (presets ``decoupled_geo_rs_token_tis`` /
  ``decoupled_geo_rs_seq_tis``): our weight = verl's weight × verl's rejection mask, with our band
  [1/hi, 1/lo] for verl's ``"lo_hi"`` (verl bounds the geometric mean of π_rollout/π_old);
- in a loss: ``grpo(rollout_correction=icepop)`` equals verl's vanilla PPO loss (dual clip out of
  reach) given verl's IcePop weights, value and gradient; with ``seq-mask-tis`` the only difference
  is the documented denominator (verl drops a rejected sequence from ``response_mask``, we weight it
  0): under seq-mean-token-mean, ours · N = verl · K, K the sequences verl keeps.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
from verl.trainer.ppo.rollout_corr_helper import (
    compute_rollout_correction_and_rejection_mask,
    compute_rollout_correction_weights,
)
from verl.workers.config import ActorConfig, PolicyLossConfig

from gspo_components.loss.recipes import grpo
from gspo_components.loss.rollout_correction import RolloutCorrection, rollout_correction_weights

LEVEL = {"token": "token", "sequence-product": "sequence"}  # ours -> verl's rollout_is


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old_log_probs, rollout_log_probs, mask) float64, every row non-empty, 0 at padding (verl
    multiplies by the mask, so NaN there would reach its weights; ours are checked for NaN elsewhere)."""
    n = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, 24), min_size=n, max_size=n))
    width = max(lengths) + draw(st.integers(0, 2))
    scale = draw(st.sampled_from([1e-4, 1e-3, 0.05, 0.5, 2.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    old = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 5
    rollout = old - (torch.rand(n, width, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    # Row 0 on-policy (ρ = 1, inside every band): verl's IS metrics divide by zero (ZeroDivisionError in
    # compute_is_metrics' effective sample size) when every weight of the batch is 0.
    rollout[0] = old[0]
    return torch.where(mask, old, 0.0), torch.where(mask, rollout, 0.0), mask


@given(batch=batches(), level=st.sampled_from(list(LEVEL)), band=st.sampled_from([(0.5, 5.0), (0.9, 1.2)]))
def test_icepop_is_verls_icepop(
    batch: tuple[torch.Tensor, ...], level: str, band: tuple[float, float]
) -> None:
    old, rollout, mask = batch
    ref, _ = compute_rollout_correction_weights(
        old - rollout, mask, rollout_is=LEVEL[level], rollout_is_threshold=f"{band[0]}_{band[1]}"
    )
    got = rollout_correction_weights(
        old, rollout, mask, level=level, mode="icepop", lower=band[0], upper=band[1]
    )
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0.0)


@given(batch=batches(), level=st.sampled_from(list(LEVEL)), cap=st.sampled_from([1.0, 2.0, 5.0]))
def test_truncate_is_verls_tis(batch: tuple[torch.Tensor, ...], level: str, cap: float) -> None:
    old, rollout, mask = batch
    ref, _ = compute_rollout_correction_weights(
        old - rollout, mask, rollout_is=LEVEL[level], rollout_is_threshold=cap
    )
    got = rollout_correction_weights(old, rollout, mask, level=level, mode="truncate", upper=cap)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0.0)


@given(
    batch=batches(),
    level=st.sampled_from(list(LEVEL)),
    cap=st.sampled_from([1.5, 2.0]),
    band=st.sampled_from([(0.999, 1.001), (0.99, 1.02), (0.7, 1.6)]),
)
def test_seq_mask_tis_is_verls_geo_rs_with_tis(
    batch: tuple[torch.Tensor, ...], level: str, cap: float, band: tuple[float, float]
) -> None:
    old, rollout, mask = batch
    lo, hi = band
    proto, new_mask, _ = compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, rollout_is=LEVEL[level], rollout_is_threshold=cap,
        rollout_rs="seq_mean_k1", rollout_rs_threshold=f"{lo}_{hi}",
    )  # fmt: skip
    ref = proto.batch["rollout_is_weights"] * new_mask
    got = rollout_correction_weights(
        old, rollout, mask, level=level, mode="seq-mask-tis", upper=cap, geo_lower=1 / hi, geo_upper=1 / lo
    )
    # Rows on the band's edge could round either way between verl's masked mean (+1e-8 in its
    # denominator) and ours; hypothesis' continuous draws do not land there (the rows are compared exactly).
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0.0)


def _actor_config() -> ActorConfig:
    return ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2, clip_ratio_high=0.2,
        clip_ratio_c=1e10, loss_agg_mode="seq-mean-token-mean", policy_loss=PolicyLossConfig(loss_mode="vanilla"),
    )  # fmt: skip


def _ours(mode: str, old, rollout, mask, log_probs, adv, **params) -> tuple[torch.Tensor, torch.Tensor]:
    lp = log_probs.clone().requires_grad_(True)
    recipe = grpo(rollout_correction=RolloutCorrection("token", mode, **params))
    td = TensorDict(
        {"log_probs": lp, "old_log_probs": old, "rollout_log_probs": rollout, "advantages": adv,
         "response_mask": mask},
        batch_size=[mask.shape[0]],
    )  # fmt: skip
    loss = recipe.loss(td)["loss"]
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def _verl(old, log_probs, adv, mask, weights) -> tuple[torch.Tensor, torch.Tensor]:
    lp = log_probs.clone().requires_grad_(True)
    loss, _ = compute_policy_loss_vanilla(
        old_log_prob=old, log_prob=lp, advantages=adv[:, None].expand_as(lp), response_mask=mask,
        loss_agg_mode="seq-mean-token-mean", config=_actor_config(), rollout_is_weights=weights,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


@pytest.mark.parametrize("seed", range(5))
def test_losses_with_verls_weights(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, width = 6, 9
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    mask = torch.arange(width)[None] < lengths[:, None]
    old = torch.where(mask, -torch.rand(n, width, generator=gen, dtype=torch.float64) * 4, 0.0)
    rollout = torch.where(mask, old + torch.randn(n, width, generator=gen, dtype=torch.float64) * 0.6, 0.0)
    log_probs = torch.where(mask, old + torch.randn(n, width, generator=gen, dtype=torch.float64) * 0.2, 0.0)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)

    # IcePop: identical loss and gradient.
    w, _ = compute_rollout_correction_weights(
        old - rollout, mask, rollout_is="token", rollout_is_threshold="0.5_5.0"
    )
    assert bool((w[mask] == 0).any()) and bool((w[mask] > 0).any())  # the band cuts some tokens, keeps others
    loss, grad = _ours("icepop", old, rollout, mask, log_probs, adv)
    ref_loss, ref_grad = _verl(old, log_probs, adv, mask, w)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-300)

    # seq-mask-tis: same numerators; verl's rejected rows also leave the seq-mean's count.
    proto, new_mask, _ = compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, rollout_is="token", rollout_is_threshold=2.0, rollout_rs="seq_mean_k1",
        rollout_rs_threshold="0.9_1.1",
    )  # fmt: skip
    kept = int((new_mask.sum(-1) > 0).sum())
    assert 0 < kept < n, "the draw must reject some rows and keep others"
    loss, grad = _ours("seq-mask-tis", old, rollout, mask, log_probs, adv, upper=2.0, geo_lower=1 / 1.1,
                       geo_upper=1 / 0.9)  # fmt: skip
    ref_loss, ref_grad = _verl(old, log_probs, adv, new_mask, proto.batch["rollout_is_weights"])
    torch.testing.assert_close(loss * n, ref_loss * kept, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(grad * n, ref_grad * kept, rtol=1e-12, atol=1e-300)
