"""DPPO (arXiv 2602.04879) against verl 0.9.1's own ``dppo_tv`` / ``dppo_kl`` policy losses.

verl's loss is −Â·sg(min(r, C))·ℓ·keep with the binary-TV / binary-KL mask ``keep``; ours
(:func:`gspo_components.loss.algorithms.dppo.dppo`) is the same mask as a TokenFilter with a CISPO
truncated-IS clipper, whose value is −Â·min(r, C)·keep (no factor ℓ) and whose gradient is verl's.
So the gradients with respect to ℓ must agree to rounding, for both masks, every shared
aggregation and per-sequence or per-token advantages, and ``filtered_dppo`` must equal verl's
``pg_clipfrac`` (the fraction of valid tokens its mask removes).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig, PolicyLossConfig

from gspo_components.loss.algorithms.dppo import DPPOFilter, dppo
from gspo_components.loss.numerics import Padding

F64 = torch.float64
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
VERL_NAME = {"binary_tv": "dppo_tv", "binary_kl": "dppo_kl"}


def config(low: float, high: float, cap: float, agg: str, loss_mode: str) -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_c=cap,
        loss_agg_mode=agg,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )


@st.composite
def batches(draw: st.DrawFn) -> dict:
    """Probabilities of both policies in (0, 1] (log-probs ≤ 0, as verl's binary KL needs), a drawn
    drift scale, advantages per sequence (broadcast, as verl receives them) or per token, finite
    garbage at the padding (verl masks by multiplying)."""
    n = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    width = max(lengths) + draw(st.integers(0, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 0.1, 0.5, 1.5, 4.0]))
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    old = -torch.rand(n, width, generator=gen, dtype=F64) * 3.0
    lp = (old + torch.randn(n, width, generator=gen, dtype=F64) * scale).clamp(max=-1e-6)
    per_token = draw(st.booleans())
    adv = torch.randn(n, width if per_token else 1, generator=gen, dtype=F64)
    adv = torch.where(torch.rand(adv.shape, generator=gen) < 0.15, torch.zeros_like(adv), adv).expand(
        n, width
    )
    garbage = draw(st.sampled_from([0.0, -7.0]))
    pad = lambda x, v: torch.where(mask, x, torch.full_like(x, v))  # noqa: E731
    return {
        "mask": mask,
        "log_probs": pad(lp, garbage),
        "old_log_probs": pad(old, garbage),
        "advantages": pad(adv, 0.0),
        "per_token": per_token,
    }


def verl_loss(b: dict, cfg: ActorConfig, name: str):
    lp = b["log_probs"].clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=b["old_log_probs"],
        log_prob=lp,
        advantages=b["advantages"],
        response_mask=b["mask"],
        loss_agg_mode=cfg.loss_agg_mode,
        config=cfg,
        rollout_is_weights=None,
    )
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g, metrics


def our_loss(b: dict, recipe):
    adv = b["advantages"] if b["per_token"] else b["advantages"][:, 0]
    td = TensorDict(
        {
            "log_probs": b["log_probs"].clone().requires_grad_(),
            "old_log_probs": b["old_log_probs"],
            "advantages": adv,
            "response_mask": b["mask"],
        },
        batch_size=[b["mask"].shape[0]],
    )
    out = recipe.loss(td)
    (g,) = torch.autograd.grad(out["loss"], td["log_probs"])
    return out["loss"].detach(), g, out


@given(
    b=batches(),
    mode=st.sampled_from(["binary_tv", "binary_kl"]),
    bounds=st.sampled_from([(0.2, 0.2), (0.05, 0.1), (0.01, 0.3)]),
    cap=st.sampled_from([3.0, 20.0]),
    agg=st.sampled_from(MODES),
)
def test_dppo_gradient_and_mask_match_verl(b: dict, mode: str, bounds: tuple, cap: float, agg: str) -> None:
    low, high = bounds
    _, v_grad, v_metrics = verl_loss(b, config(low, high, cap, agg, VERL_NAME[mode]), VERL_NAME[mode])
    _, o_grad, out = our_loss(
        b, dppo(mode=mode, delta_low=low, delta_high=high, tis_cap=cap, aggregation=agg)
    )
    # seq-mean-token-mean: verl divides each row by L_i + 1e-8, ours by L_i (relative 1e-8)
    rtol = 2e-8 if agg == "seq-mean-token-mean" else 1e-10
    torch.testing.assert_close(o_grad, v_grad, rtol=rtol, atol=1e-15)
    assert out["filtered_dppo"].item() == pytest.approx(v_metrics["actor/pg_clipfrac"], abs=1e-6)
    assert torch.all(o_grad[~b["mask"]] == 0)


def test_dppo_value_is_verls_divided_by_log_prob() -> None:
    """One valid token per row, token-mean over one row: verl's value is ours times ℓ."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    # p' → p: 0.25 → 0.3 with Â > 0 (TV 0.05, KL 0.006: kept), 0.2 → 0.6 with Â < 0 (a move the
    # advantage does not push: kept), 0.3 → 0.7 with Â > 0 (TV 0.4, KL 0.34 > 0.2: masked)
    cases = ((0.3, 0.25, 1.0, True), (0.6, 0.2, -2.0, True), (0.7, 0.3, 1.0, False))
    for p, p_old, a, expected in cases:
        lp, old = math.log(p), math.log(p_old)
        b = {
            "mask": mask,
            "log_probs": torch.tensor([[lp]], dtype=F64),
            "old_log_probs": torch.tensor([[old]], dtype=F64),
            "advantages": torch.tensor([[a]], dtype=F64),
            "per_token": True,
        }
        for mode in ("binary_tv", "binary_kl"):
            v, _, _ = verl_loss(b, config(0.2, 0.2, 20.0, "token-mean", VERL_NAME[mode]), VERL_NAME[mode])
            o, _, _ = our_loss(b, dppo(mode=mode))
            keep = bool(DPPOFilter(mode).keep(*_pad_inputs(b)).item())
            w = min(math.exp(lp - old), 20.0)
            assert o.item() == pytest.approx(-a * w * keep, rel=1e-12, abs=1e-15)
            assert v.item() == pytest.approx(-a * w * lp * keep, rel=1e-12, abs=1e-15)
            assert keep == expected


def _pad_inputs(b: dict):
    return Padding(b["mask"]), b["log_probs"], b["old_log_probs"], b["advantages"]
