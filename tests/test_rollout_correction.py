"""Rollout-correction tests (TIS / MIS; docs/algorithms.md "Rollout correction", docs/importance.md).

Proves:

- token-level, sequence-product and sequence-geometric TIS (min(ρ, C)) and MIS
  (ρ · 1[lower ≤ ρ ≤ upper]) equal an independent per-row reference, with 0 at padding;
- the weights are detached, whatever requires grad upstream;
- the sequence product and the geometric mean differ whenever L > 1 and the log-ratios are not 0;
- composed into a recipe (``grpo(rollout_correction=RolloutCorrection(...))``), the Objective
  multiplies each token's loss by its weight: loss and gradient equal the reference
  agg(token_loss · w), and ``is_weight_mean`` is reported.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from gspo_components import (
    PPOClip,
    RolloutCorrection,
    TokenLogRatio,
    grpo,
    rollout_correction_weights,
)

LEVELS = ("token", "sequence-product", "sequence-geometric")


@st.composite
def rollout_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old_log_probs, rollout_log_probs, mask) in float64 with garbage at padding."""
    n = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 30), min_size=n, max_size=n))
    width = max(lengths) + draw(st.integers(0, 2))
    scale = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    old = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 5
    rollout = old - (torch.rand(n, width, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    nan = torch.full_like(old, float("nan"))
    return torch.where(mask, old, nan), torch.where(mask, rollout, -nan), mask


def reference_weights(
    old: torch.Tensor,
    rollout: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    mode: str,
    upper: float,
    lower: float | None,
) -> torch.Tensor:
    """ρ = π_old / π_rollout per token, or per row as the product (Σ of log-ratios) or the
    geometric mean; log ρ clamped to ±20; TIS min(ρ, upper), MIS ρ·1[lower ≤ ρ ≤ upper]."""
    n, width = mask.shape
    out = torch.zeros(n, width, dtype=torch.float64)
    old_l, roll_l = old.tolist(), rollout.tolist()
    for i in range(n):
        length = int(mask[i].sum())
        u = [old_l[i][t] - roll_l[i][t] for t in range(length)]
        for t in range(length):
            if level == "token":
                log_rho = u[t]
            elif level == "sequence-product":
                log_rho = math.fsum(u)
            else:
                log_rho = math.fsum(u) / length
            rho = math.exp(min(20.0, max(-20.0, log_rho)))
            if mode == "truncate":
                out[i, t] = min(rho, upper)
            else:
                out[i, t] = rho if (lower or 0.0) <= rho <= upper else 0.0
    return out


@settings(max_examples=60)
@given(
    batch=rollout_batches(),
    level=st.sampled_from(LEVELS),
    mode=st.sampled_from(["truncate", "mask"]),
    upper=st.sampled_from([1.0, 1.5, 2.0, 10.0]),
    lower=st.sampled_from([None, 0.5, 0.9]),
)
def test_weights_match_reference(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    level: str,
    mode: str,
    upper: float,
    lower: float | None,
) -> None:
    old, rollout, mask = batch
    if mode == "truncate":
        lower = None
    old_g = old.clone().requires_grad_(True)
    got = rollout_correction_weights(old_g, rollout, mask, level=level, mode=mode, upper=upper, lower=lower)
    assert not got.requires_grad and got.grad_fn is None
    want = reference_weights(old, rollout, mask, level, mode, upper, lower)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-300)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))


def test_module_is_detached_and_writes_is_weights() -> None:
    mask = torch.tensor([[True, True, True], [True, False, False]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, float("nan"), 0.0]]).requires_grad_(True)
    rollout = torch.tensor([[-1.2, -1.7, -0.5], [-0.1, 0.0, float("inf")]])
    td = TensorDict(
        {"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask}, batch_size=[2]
    )
    RolloutCorrection("sequence-product", "mask", upper=2.0, lower=0.5)(td)
    w = td["is_weights"]
    assert not w.requires_grad
    u = [0.2 - 0.3 + 0.0, -0.2]
    want = torch.tensor([[math.exp(u[0])] * 3, [math.exp(u[1]), 0.0, 0.0]])
    torch.testing.assert_close(w, want)
    # renamed keys
    td2 = TensorDict({"o": old, "r": rollout, "m": mask}, batch_size=[2])
    RolloutCorrection(in_keys=["o", "r", "m"], out_keys={"is_weights": "w"})(td2)
    torch.testing.assert_close(
        td2["w"], torch.exp(torch.where(mask, old - rollout, 0.0)).clamp(max=2.0) * mask
    )


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_product_differs_from_geometric_mean(mode: str) -> None:
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    old = torch.tensor([[-1.0, -1.0, -1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    rollout = old - 0.1  # every token ratio e^0.1
    kwargs = {"mode": mode, "upper": 5.0}
    product = rollout_correction_weights(old, rollout, mask, level="sequence-product", **kwargs)
    geometric = rollout_correction_weights(old, rollout, mask, level="sequence-geometric", **kwargs)
    token = rollout_correction_weights(old, rollout, mask, level="token", **kwargs)
    e = math.exp(0.1)
    torch.testing.assert_close(product[0, :3], torch.full((3,), e**3, dtype=torch.float64))
    torch.testing.assert_close(geometric[0, :3], torch.full((3,), e, dtype=torch.float64))
    assert bool((product[0, :3] != geometric[0, :3]).all())  # L = 3: product ≠ geometric mean
    # L = 1: all three levels agree
    assert product[1, 0] == geometric[1, 0] == token[1, 0]


@settings(max_examples=50)
@given(
    batch=rollout_batches(),
    level=st.sampled_from(LEVELS),
    mode=st.sampled_from(["truncate", "mask"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_recipe_multiplies_token_loss_by_is_weights(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], level: str, mode: str, seed: int
) -> None:
    old, rollout, mask = batch
    gen = torch.Generator().manual_seed(seed)
    n = mask.shape[0]
    log_probs = old + 0.1 * torch.randn(old.shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    lower = 0.8 if mode == "mask" else None
    correction = RolloutCorrection(level, mode, upper=1.5, lower=lower)
    recipe = grpo(rollout_correction=correction)

    def make_td(lp: torch.Tensor) -> TensorDict:
        return TensorDict(
            {
                "log_probs": lp,
                "old_log_probs": old,
                "rollout_log_probs": rollout,
                "advantages": adv,
                "response_mask": mask,
            },
            batch_size=[n],
        )

    lp = log_probs.clone().requires_grad_(True)
    td = make_td(lp)
    out = recipe.loss(td)
    out["loss"].backward()
    assert "is_weights" not in td.keys()  # the caller's TensorDict is left alone

    # reference: the same token loss, multiplied by the reference weights, row-by-row seq-mean
    lp_ref = log_probs.clone().requires_grad_(True)
    work = PPOClip(0.2, 0.2)(TokenLogRatio()(make_td(lp_ref)))
    w = reference_weights(old, rollout, mask, level, mode, 1.5, lower)
    weighted = torch.where(mask, work["token_loss"], 0.0) * w
    lengths = mask.sum(-1)
    want = sum(weighted[i, : int(lengths[i])].sum() / int(lengths[i]) for i in range(n)) / n
    want.backward()
    torch.testing.assert_close(out["loss"], want.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out["is_weight_mean"], (w.sum() / mask.sum()).float())


def test_mask_band_edges_are_inclusive() -> None:
    """MIS keeps ρ on the band's edges: ρ · 1[lower ≤ ρ ≤ upper]; TIS min(ρ, C) is ρ at ρ = C."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    rollout = old.clone()  # ρ = 1 exactly at every token
    ones = torch.ones(1, 3, dtype=torch.float64)
    for level in LEVELS:
        at_lower = rollout_correction_weights(
            old, rollout, mask, level=level, mode="mask", upper=2.0, lower=1.0
        )
        at_upper = rollout_correction_weights(
            old, rollout, mask, level=level, mode="mask", upper=1.0, lower=0.5
        )
        at_cap = rollout_correction_weights(old, rollout, mask, level=level, mode="truncate", upper=1.0)
        assert torch.equal(at_lower, ones) and torch.equal(at_upper, ones) and torch.equal(at_cap, ones)
    outside = rollout_correction_weights(old, old - 0.1, mask, mode="mask", upper=1.05, lower=0.5)
    assert torch.equal(outside, torch.zeros(1, 3, dtype=torch.float64))  # e^0.1 > 1.05
