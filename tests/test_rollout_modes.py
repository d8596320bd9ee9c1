"""Rollout-correction modes ``icepop`` and ``seq-mask-tis`` (gspo_components/loss/rollout_correction.py).

Proves, against an independent float64 reference written from the formulas (plain Python loops):

- ``icepop``: w = ρ · 1[α ≤ ρ ≤ β] at every level, with the paper's default band [0.5, 5]
  (IcePop, arXiv 2510.18855): tokens outside the band get weight 0, tokens inside keep ρ;
- ``seq-mask-tis``: w = min(ρ, C) · 1[g_lo ≤ exp(mean_t u) ≤ g_hi] at every level of the TIS
  weight, the mask always by the row's geometric mean (verl's decoupled_geo_rs_*_tis presets);
- padding (NaN / ±inf there) is inert: weight 0 at padding, no NaN reaches a valid weight;
- composed into a recipe, loss and gradient equal agg(token_loss · w) of the reference weights;
- the existing modes are unchanged by default (``upper`` still defaults to 2 for them);
- bad parameters are ValueErrors naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from gspo_components import PPOClip, TokenLogRatio, grpo
from gspo_components.loss.rollout_correction import (
    ROLLOUT_MODES,
    RolloutCorrection,
    rollout_correction_weights,
)

LEVELS = ("token", "sequence-product", "sequence-geometric")


@st.composite
def rollout_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old_log_probs, rollout_log_probs, mask) in float64 with NaN / -NaN at padding."""
    n = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 12), min_size=n, max_size=n))
    width = max(lengths) + draw(st.integers(0, 2))
    scale = draw(st.sampled_from([0.0, 0.0005, 0.01, 0.3, 1.5]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    old = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 5
    rollout = old - (torch.rand(n, width, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    nan = torch.full_like(old, float("nan"))
    return torch.where(mask, old, nan), torch.where(mask, rollout, -nan), mask


def reference(
    old: torch.Tensor,
    rollout: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    mode: str,
    upper: float,
    lower: float,
    geo: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    n, width = mask.shape
    out = torch.zeros(n, width, dtype=torch.float64)
    for i in range(n):
        length = int(mask[i].sum())
        u = [float(old[i, t]) - float(rollout[i, t]) for t in range(length)]
        geo_mean = math.exp(math.fsum(u) / length)
        keep_row = geo[0] <= geo_mean <= geo[1]
        for t in range(length):
            log_rho = {
                "token": u[t],
                "sequence-product": math.fsum(u),
                "sequence-geometric": math.fsum(u) / length,
            }
            rho = math.exp(min(20.0, max(-20.0, log_rho[level])))
            if mode == "icepop":
                out[i, t] = rho if lower <= rho <= upper else 0.0
            else:  # seq-mask-tis
                out[i, t] = min(rho, upper) if keep_row else 0.0
    return out


def test_modes_extend_the_existing_tuple() -> None:
    assert ROLLOUT_MODES == ("truncate", "mask", "icepop", "seq-mask-tis")


@settings(max_examples=60)
@given(
    batch=rollout_batches(),
    level=st.sampled_from(LEVELS),
    band=st.sampled_from([None, (0.8, 1.25), (0.5, 2.0)]),
)
def test_icepop_matches_reference(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], level: str, band: tuple[float, float] | None
) -> None:
    old, rollout, mask = batch
    kwargs = {} if band is None else {"lower": band[0], "upper": band[1]}
    lower, upper = band or (0.5, 5.0)  # the paper's α, β are the defaults
    got = rollout_correction_weights(
        old.requires_grad_(True), rollout, mask, level=level, mode="icepop", **kwargs
    )
    assert got.grad_fn is None and not got.requires_grad
    want = reference(old.detach(), rollout, mask, level, "icepop", upper, lower)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))


@settings(max_examples=60)
@given(
    batch=rollout_batches(),
    level=st.sampled_from(LEVELS),
    cap=st.sampled_from([1.0, 2.0, 10.0]),
    geo=st.sampled_from([None, (0.99, 1.01), (0.7, 1.6)]),
)
def test_seq_mask_tis_matches_reference(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    level: str,
    cap: float,
    geo: tuple[float, float] | None,
) -> None:
    old, rollout, mask = batch
    kwargs = {} if geo is None else {"geo_lower": geo[0], "geo_upper": geo[1]}
    got = rollout_correction_weights(
        old, rollout, mask, level=level, mode="seq-mask-tis", upper=cap, **kwargs
    )
    want = reference(old, rollout, mask, level, "seq-mask-tis", cap, 0.0, geo or (0.999, 1.001))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))


def test_icepop_keeps_rho_inside_and_zeroes_outside() -> None:
    """Hand case: token ratios e^{-1}, 1, e^{1}, e^{2} with [α, β] = [0.5, 5]: 0, 1, e, 0."""
    mask = torch.ones(1, 4, dtype=torch.bool)
    rollout = torch.zeros(1, 4, dtype=torch.float64)
    old = torch.tensor([[-1.0, 0.0, 1.0, 2.0]], dtype=torch.float64)
    got = RolloutCorrection(mode="icepop")(TensorDict({"old_log_probs": old, "rollout_log_probs": rollout,
                                                      "response_mask": mask}, batch_size=[1]))["is_weights"]  # fmt: skip
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.0, math.e, 0.0]], dtype=torch.float64))


def test_seq_mask_tis_hand_case() -> None:
    """Row 0: token ratios e^{0.5}, e^{-0.5} (geometric mean 1, kept), TIS cap 1.5 → [1.5, e^{-0.5}];
    row 1: e^{0.2} twice (geometric mean e^{0.2} > 1.1, rejected) → 0 (padding NaN ignored)."""
    mask = torch.tensor([[True, True, False], [True, True, False]])
    old = torch.tensor([[0.5, -0.5, float("nan")], [0.2, 0.2, float("inf")]], dtype=torch.float64)
    rollout = torch.zeros(2, 3, dtype=torch.float64)
    got = rollout_correction_weights(
        old, rollout, mask, mode="seq-mask-tis", upper=1.5, geo_lower=0.9, geo_upper=1.1
    )
    want = torch.tensor([[1.5, math.exp(-0.5), 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_existing_modes_keep_their_defaults() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    rollout = torch.zeros(1, 2, dtype=torch.float64)
    torch.testing.assert_close(
        rollout_correction_weights(old, rollout, mask), torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        rollout_correction_weights(old, rollout, mask, mode="mask"),
        torch.tensor([[0.0, 0.0]], dtype=torch.float64),
    )
    module = RolloutCorrection()
    assert (module.upper, module.lower) == (2.0, None)


@settings(max_examples=30)
@given(
    batch=rollout_batches(),
    level=st.sampled_from(LEVELS),
    mode=st.sampled_from(["icepop", "seq-mask-tis"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_recipe_multiplies_token_loss_by_the_weights(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], level: str, mode: str, seed: int
) -> None:
    old, rollout, mask = batch
    gen = torch.Generator().manual_seed(seed)
    n = mask.shape[0]
    log_probs = old + 0.1 * torch.randn(old.shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    params = (
        {"upper": 1.5, "lower": 0.8}
        if mode == "icepop"
        else {"upper": 1.5, "geo_lower": 0.9, "geo_upper": 1.1}
    )
    recipe = grpo(rollout_correction=RolloutCorrection(level, mode, **params))

    def make_td(lp: torch.Tensor) -> TensorDict:
        keys = {"log_probs": lp, "old_log_probs": old, "rollout_log_probs": rollout, "advantages": adv}
        return TensorDict({**keys, "response_mask": mask}, batch_size=[n])

    lp = log_probs.clone().requires_grad_(True)
    out = recipe.loss(make_td(lp))
    out["loss"].backward()

    lp_ref = log_probs.clone().requires_grad_(True)
    work = PPOClip(0.2, 0.2)(TokenLogRatio()(make_td(lp_ref)))
    geo = (0.9, 1.1) if mode == "seq-mask-tis" else (0.0, math.inf)
    w = reference(old, rollout, mask, level, mode, 1.5, 0.8, geo)
    weighted = torch.where(mask, work["token_loss"], 0.0) * w
    lengths = mask.sum(-1)
    want = sum(weighted[i, : int(lengths[i])].sum() / int(lengths[i]) for i in range(n)) / n
    want.backward()
    torch.testing.assert_close(out["loss"], want.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-10, atol=1e-14)
    assert bool(torch.isfinite(lp.grad).all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "icepop", "lower": 2.0, "upper": 1.0}, "lower"),
        ({"mode": "icepop", "upper": 0.4}, "upper must be > the default lower 0.5"),
        ({"mode": "seq-mask-tis", "lower": 0.5}, "lower applies to mode='mask' only"),
        ({"mode": "truncate", "geo_lower": 0.9}, "geo_lower applies to mode='seq-mask-tis' only"),
        ({"mode": "icepop", "geo_upper": 1.1}, "geo_upper applies to mode='seq-mask-tis' only"),
        ({"mode": "seq-mask-tis", "geo_lower": 1.2, "geo_upper": 1.1}, "geo_lower"),
        ({"mode": "seq-mask-tis", "geo_upper": 0.0}, "geo_upper"),
        ({"mode": "seq-mask-tis", "geo_lower": -1.0}, "geo_lower"),
        ({"mode": "seq-mask-tis", "geo_upper": float("inf")}, "geo_upper"),
        ({"mode": "icepops"}, "mode must be one of"),
    ],
)
def test_bad_parameters_are_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RolloutCorrection(**kwargs)
    mask = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        rollout_correction_weights(torch.zeros(1, 1), torch.zeros(1, 1), mask, **kwargs)
