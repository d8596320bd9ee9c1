"""AdvantageEstimator tests: property 9 of docs/algorithms.md, and the estimators' exact values.

Proves, for the group-normalised (GRPO), group-mean (Dr.GRPO), leave-one-out (RLOO) and
batch-whitened (REINFORCE++-baseline) estimators:

- Σ_g Â = 0 in every group (for batch-whitened, the group-centred values x_i sum to 0, and so
  does Â = x / const);
- invariance under r → a·r + b, a > 0 (eps = 0) of the group-normalised and batch-whitened
  advantages; the group-mean and RLOO advantages scale by a;
- group locality: changing group k's rewards leaves every other group's advantages bit-identical;
- permuting the samples permutes the advantages;
- zero-variance groups, single-sample groups included, give exactly 0;
- values equal an independent per-group reference written from docs/algorithms.md (Bessel std, eps,
  RLOO computed literally as leave-one-out, batch whitening per its docstring);
- ``reward_valid``: invalid samples get 0 and take no part in their group's statistics;
- non-finite rewards on valid samples raise ``ValueError``;
- the TensorDict modules (incl. the per-token pass-through) write ``advantages`` and honour
  ``in_keys`` / ``out_keys`` overrides in mapping and sequence form;
- ``PerTokenAdvantage`` refuses NaN / ±inf at valid positions, naming the key and position;
- extreme rewards (issue 13): float32 [1e20, −1e20] → ±1/√2, [3e38, 2e38] → finite (±1/√2,
  RLOO ±1e38), [3e38, 3e38, −3e38, 1] finite for the normalising estimators and a ValueError for
  group-mean / RLOO whose exact value is beyond float32; eps = 0 with [0, 1e-30] (and subnormals,
  float64 1e-300) → ±1/√2; float64 rewards near 1.8e308;
- hypothesis: any finite float32 rewards (subnormal to ±3.4e38, mixed per-group magnitudes, any
  valid mask) give finite results equal to an exact-rational reference within float32 rounding,
  exact zeros where due, and a ValueError exactly when the reference overflows; malformed
  arguments (shapes, dtypes, non-tensors, empty, NaN/inf, bad eps) are ValueErrors naming them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import grouped_rewards
from tensordict import TensorDict

from gspo_components import (
    BatchWhitenedAdvantage,
    GroupMeanAdvantage,
    GroupNormalizedAdvantage,
    LeaveOneOutAdvantage,
    PerTokenAdvantage,
    batch_whitened_advantages,
    group_mean_advantages,
    group_normalized_advantages,
    leave_one_out_advantages,
)

Estimator = Callable[..., torch.Tensor]

ESTIMATORS: dict[str, Estimator] = {
    "group-normalized": group_normalized_advantages,
    "group-mean": group_mean_advantages,
    "rloo": leave_one_out_advantages,
    "batch-whitened": batch_whitened_advantages,
}
GROUP_LOCAL = ("group-normalized", "group-mean", "rloo")


def _groups(group_ids: torch.Tensor) -> list[torch.Tensor]:
    """Index tensors of the samples of each group."""
    return [torch.nonzero(group_ids == g).flatten() for g in torch.unique(group_ids)]


def _is_constant(values: list[float]) -> bool:
    return len(values) < 2 or max(values) == min(values)


# ---------------------------------------------------------------------------------------------
# Independent references, written from docs/algorithms.md with Python floats and a loop over groups.
# ---------------------------------------------------------------------------------------------


def _centred_reference(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """x_i = r_i − mean_g r over the valid samples of i's group; 0 for constant groups and
    invalid samples."""
    out = [0.0] * rewards.shape[0]
    for idx in _groups(group_ids):
        members = [int(i) for i in idx if bool(valid[i])]
        values = [float(rewards[i]) for i in members]
        if _is_constant(values):
            continue
        mean = statistics.fmean(values)
        for i, r in zip(members, values, strict=True):
            out[i] = r - mean
    return out


def reference_advantages(
    kind: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The advantage of docs/algorithms.md, computed one group at a time."""
    n = rewards.shape[0]
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool)
    out = [0.0] * n
    if kind == "batch-whitened":
        x = _centred_reference(rewards, group_ids, valid)
        xs = [x[i] for i in range(n) if bool(valid[i])]
        std = statistics.stdev(xs) if len(xs) >= 2 else 0.0
        for i in range(n):
            if x[i] != 0.0:
                out[i] = x[i] / (std + eps)
        return torch.tensor(out, dtype=torch.float64)
    for idx in _groups(group_ids):
        members = [int(i) for i in idx if bool(valid[i])]
        values = [float(rewards[i]) for i in members]
        if _is_constant(values):
            continue
        mean = statistics.fmean(values)
        for i, r in zip(members, values, strict=True):
            if kind == "group-normalized":
                out[i] = (r - mean) / (statistics.stdev(values) + eps)
            elif kind == "group-mean":
                out[i] = r - mean
            else:  # RLOO, literally: r_i minus the mean of the *other* samples of the group
                others = [values[j] for j in range(len(values)) if members[j] != i]
                out[i] = r - statistics.fmean(others)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Property 9
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100)
@given(batch=grouped_rewards(), kind=st.sampled_from(sorted(ESTIMATORS)))
def test_group_sums_are_zero(batch: tuple[torch.Tensor, torch.Tensor], kind: str) -> None:
    rewards, group_ids = batch
    adv = ESTIMATORS[kind](rewards, group_ids)
    assert adv.shape == rewards.shape and adv.dtype == torch.float64
    for idx in _groups(group_ids):
        total = float(adv[idx].sum())
        assert abs(total) <= 1e-12 * (1.0 + float(adv[idx].abs().sum())), (kind, idx.tolist(), total)


@settings(max_examples=100)
@given(
    batch=grouped_rewards(),
    a=st.floats(0.01, 100.0),
    b=st.floats(-100.0, 100.0),
    kind=st.sampled_from(sorted(ESTIMATORS)),
)
def test_affine_reward_transform(
    batch: tuple[torch.Tensor, torch.Tensor], a: float, b: float, kind: str
) -> None:
    """Group-normalised and batch-whitened Â are invariant under r → a·r + b (eps = 0);
    group-mean and RLOO Â scale by a."""
    rewards, group_ids = batch
    fn = ESTIMATORS[kind]
    kwargs = {"eps": 0.0} if kind in ("group-normalized", "batch-whitened") else {}
    before = fn(rewards, group_ids, **kwargs)
    after = fn(a * rewards + b, group_ids, **kwargs)
    expected = before if kwargs else a * before
    assert not torch.isnan(after).any()
    # cancellation in a·r + b − mean costs about ulp(|b|) / (a · spread): allow for it
    atol = 1e-12 * (1.0 + abs(b) / a) * (a if not kwargs else 1.0)
    torch.testing.assert_close(after, expected, rtol=1e-9, atol=atol)
    # zero-variance groups stay exactly zero under the transform
    for idx in _groups(group_ids):
        if _is_constant(rewards[idx].tolist()):
            assert torch.equal(after[idx], torch.zeros_like(after[idx]))


@settings(max_examples=100)
@given(batch=grouped_rewards(), seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(GROUP_LOCAL))
def test_group_locality(batch: tuple[torch.Tensor, torch.Tensor], seed: int, kind: str) -> None:
    """Changing group k's rewards leaves every other group's advantages bit-identical."""
    rewards, group_ids = batch
    fn = ESTIMATORS[kind]
    gen = torch.Generator().manual_seed(seed)
    groups = _groups(group_ids)
    k = groups[int(torch.randint(len(groups), (1,), generator=gen))]
    changed = rewards.clone()
    changed[k] = torch.randn(k.numel(), generator=gen, dtype=torch.float64) * 10
    before, after = fn(rewards, group_ids), fn(changed, group_ids)
    others = torch.ones_like(group_ids, dtype=torch.bool)
    others[k] = False
    assert torch.equal(before[others], after[others])


@settings(max_examples=100)
@given(batch=grouped_rewards(), seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(sorted(ESTIMATORS)))
def test_permutation_equivariance(batch: tuple[torch.Tensor, torch.Tensor], seed: int, kind: str) -> None:
    rewards, group_ids = batch
    fn = ESTIMATORS[kind]
    perm = torch.randperm(rewards.shape[0], generator=torch.Generator().manual_seed(seed))
    permuted = fn(rewards[perm], group_ids[perm])
    torch.testing.assert_close(permuted, fn(rewards, group_ids)[perm], rtol=1e-12, atol=1e-12)


@settings(max_examples=100)
@given(batch=grouped_rewards(), eps=st.sampled_from([0.0, 1e-6]))
def test_zero_variance_groups_are_exactly_zero(batch: tuple[torch.Tensor, torch.Tensor], eps: float) -> None:
    rewards, group_ids = batch
    for kind, fn in ESTIMATORS.items():
        kwargs = {"eps": eps} if kind in ("group-normalized", "batch-whitened") else {}
        adv = fn(rewards, group_ids, **kwargs)
        for idx in _groups(group_ids):
            if _is_constant(rewards[idx].tolist()):
                assert torch.equal(adv[idx], torch.zeros_like(adv[idx])), (kind, rewards[idx])


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
def test_singleton_and_constant_groups_explicit(kind: str) -> None:
    rewards = torch.tensor([3.7, 0.1, 0.1, 0.1, 1.0, 2.0, -5.0], dtype=torch.float64)
    group_ids = torch.tensor([42, 7, 7, 7, -3, -3, 99])  # 42 and 99 are singletons, 7 constant
    adv = ESTIMATORS[kind](rewards, group_ids)
    zero_at = torch.tensor([True, True, True, True, False, False, True])
    assert torch.equal(adv[zero_at], torch.zeros(5, dtype=torch.float64))
    assert bool((adv[~zero_at] != 0).all())


# ---------------------------------------------------------------------------------------------
# Values against the independent reference
# ---------------------------------------------------------------------------------------------


@settings(max_examples=150)
@given(
    batch=grouped_rewards(),
    kind=st.sampled_from(sorted(ESTIMATORS)),
    eps=st.sampled_from([0.0, 1e-6, 0.1, 1.0]),
)
def test_values_match_reference(batch: tuple[torch.Tensor, torch.Tensor], kind: str, eps: float) -> None:
    rewards, group_ids = batch
    kwargs = {"eps": eps} if kind in ("group-normalized", "batch-whitened") else {}
    got = ESTIMATORS[kind](rewards, group_ids, **kwargs)
    want = reference_advantages(kind, rewards, group_ids, eps=eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_values_by_hand() -> None:
    """A worked example, so that the reference itself is pinned: group {1, 2, 6}, Bessel std."""
    rewards = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    gid = torch.zeros(3, dtype=torch.long)
    mean, std = 3.0, math.sqrt((4 + 1 + 9) / 2)
    torch.testing.assert_close(
        group_normalized_advantages(rewards, gid, eps=0.5),
        torch.tensor([-2 / (std + 0.5), -1 / (std + 0.5), 3 / (std + 0.5)], dtype=torch.float64),
    )
    torch.testing.assert_close(
        leave_one_out_advantages(rewards, gid), torch.tensor([-3.0, -1.5, 4.5]).double()
    )
    torch.testing.assert_close(group_mean_advantages(rewards, gid), rewards - mean)
    x = rewards - mean
    torch.testing.assert_close(
        batch_whitened_advantages(rewards, gid, eps=0.5), x / (math.sqrt(float((x * x).sum()) / 2) + 0.5)
    )
    for kind, fn in ESTIMATORS.items():
        kwargs = {"eps": 0.5} if kind in ("group-normalized", "batch-whitened") else {}
        torch.testing.assert_close(
            fn(rewards, gid, **kwargs), reference_advantages(kind, rewards, gid, eps=0.5)
        )


def test_float32_rewards_stay_float32() -> None:
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5], dtype=torch.float32)
    gid = torch.tensor([0, 0, 1, 1])
    for kind, fn in ESTIMATORS.items():
        got = fn(rewards, gid)
        assert got.dtype == torch.float32, kind
        torch.testing.assert_close(
            got.double(), reference_advantages(kind, rewards.double(), gid), rtol=1e-5, atol=1e-6
        )


# ---------------------------------------------------------------------------------------------
# reward_valid
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100)
@given(batch=grouped_rewards(), seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(sorted(ESTIMATORS)))
def test_invalid_samples_are_left_out(batch: tuple[torch.Tensor, torch.Tensor], seed: int, kind: str) -> None:
    """Invalid samples get Â = 0, any reward there (NaN included) is ignored, and the valid ones
    get exactly what the batch without the invalid samples gives them."""
    rewards, group_ids = batch
    fn = ESTIMATORS[kind]
    gen = torch.Generator().manual_seed(seed)
    valid = torch.rand(rewards.shape[0], generator=gen) < 0.7
    poisoned = torch.where(valid, rewards, torch.full_like(rewards, float("nan")))
    got = fn(poisoned, group_ids, valid=valid)
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))
    if bool(valid.any()):
        without = fn(rewards[valid], group_ids[valid])
        torch.testing.assert_close(got[valid], without, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        got, reference_advantages(kind, rewards, group_ids, valid=valid), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_valid_reward_raises(kind: str, bad: float) -> None:
    rewards = torch.tensor([1.0, bad, 0.0, 2.0], dtype=torch.float64)
    gid = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"'rewards' holds NaN or ±inf for a valid sample"):
        ESTIMATORS[kind](rewards, gid)
    # marked invalid, the same value is fine
    valid = torch.tensor([True, False, True, True])
    assert bool(torch.isfinite(ESTIMATORS[kind](rewards, gid, valid=valid)).all())


# ---------------------------------------------------------------------------------------------
# TensorDict modules
# ---------------------------------------------------------------------------------------------

MODULES: dict[str, tuple[Callable[..., torch.nn.Module], Estimator]] = {
    "group-normalized": (GroupNormalizedAdvantage, group_normalized_advantages),
    "group-mean": (GroupMeanAdvantage, group_mean_advantages),
    "rloo": (LeaveOneOutAdvantage, leave_one_out_advantages),
    "batch-whitened": (BatchWhitenedAdvantage, batch_whitened_advantages),
}


def _reward_td() -> tuple[TensorDict, torch.Tensor, torch.Tensor, torch.Tensor]:
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 3.0], dtype=torch.float32)
    gid = torch.tensor([5, 5, 5, 9, 9, 9])
    valid = torch.tensor([True, True, False, True, True, True])
    td = TensorDict({"rewards": rewards, "group_ids": gid}, batch_size=[6])
    return td, rewards, gid, valid


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_modules_write_advantages(kind: str) -> None:
    cls, fn = MODULES[kind]
    td, rewards, gid, valid = _reward_td()
    out = cls()(td)
    assert out is td
    assert torch.equal(td["advantages"], fn(rewards, gid))
    assert cls().in_keys == ["rewards", "group_ids", "reward_valid"] and cls().out_keys == ["advantages"]
    # the optional reward_valid key is honoured when present
    td.set("reward_valid", valid)
    cls()(td)
    assert torch.equal(td["advantages"], fn(rewards, gid, valid=valid))
    assert td["advantages"][2] == 0


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_modules_key_overrides(kind: str) -> None:
    cls, fn = MODULES[kind]
    _, rewards, gid, valid = _reward_td()
    want = fn(rewards, gid, valid=valid)
    td = TensorDict(
        {("data", "r"): rewards, "gid": gid, "ok": valid},
        batch_size=[6],
    )
    mapping = cls(
        in_keys={"rewards": ("data", "r"), "group_ids": "gid", "reward_valid": "ok"},
        out_keys={"advantages": ("out", "adv")},
    )
    assert mapping.in_keys == [("data", "r"), "gid", "ok"] and mapping.out_keys == [("out", "adv")]
    mapping(td)
    assert torch.equal(td["out", "adv"], want)
    assert "advantages" not in td.keys()

    td2 = TensorDict({"r": rewards, "gid": gid}, batch_size=[6])
    sequence = cls(in_keys=["r", "gid"], out_keys=["adv"])
    assert sequence.in_keys[:2] == ["r", "gid"] and sequence.out_keys == ["adv"]
    sequence(td2)
    assert torch.equal(td2["adv"], fn(rewards, gid))
    # a sequence renames the required inputs only; the optional one keeps its default name
    td2.set("reward_valid", valid)
    sequence(td2)
    assert torch.equal(td2["adv"], want)


def test_per_token_advantage_passes_through() -> None:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for dtype, want_dtype in (
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ):
        tok = torch.tensor([[0.5, -1.25, float("nan")], [2.0, float("inf"), 7.0]], dtype=dtype)
        td = TensorDict({"token_advantages": tok, "response_mask": mask}, batch_size=[2])
        PerTokenAdvantage()(td)
        assert td["advantages"].dtype == want_dtype
        torch.testing.assert_close(td["advantages"], tok.to(want_dtype), equal_nan=True, rtol=0, atol=0)
    # overrides, mapping and sequence
    tok = torch.randn(2, 3)
    td = TensorDict({"ta": tok, "m": mask}, batch_size=[2])
    PerTokenAdvantage(in_keys={"token_advantages": "ta", "response_mask": "m"}, out_keys={"advantages": "A"})(
        td
    )
    assert torch.equal(td["A"], tok)
    td = TensorDict({"ta": tok, "m": mask}, batch_size=[2])
    PerTokenAdvantage(in_keys=["ta", "m"], out_keys=["A2"])(td)
    assert torch.equal(td["A2"], tok)
    bad = TensorDict({"token_advantages": torch.randn(2, 4), "response_mask": mask}, batch_size=[2])
    with pytest.raises(
        ValueError, match=r"'token_advantages' must have shape \[N, T\] = \[2, 3\].*got \[2, 4\]"
    ):
        PerTokenAdvantage()(bad)


def test_per_token_advantage_refuses_non_finite_valid_entries() -> None:
    """NaN / ±inf where response_mask is set is a ValueError naming the key and the position;
    the same values in the padding pass (they are masked downstream)."""
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for bad in (float("nan"), float("inf"), float("-inf")):
        tok = torch.tensor([[0.5, -1.0, bad], [1.0, bad, 2.0]])
        td = TensorDict({"token_advantages": tok, "response_mask": mask}, batch_size=[2])
        with pytest.raises(ValueError, match=r"'token_advantages' must be finite .*at \[1, 1\]"):
            PerTokenAdvantage()(td)
    # a bf16 / fp16 value beyond float16's range is already inf before the cast: refused too
    tok = torch.tensor([[0.5, 7e4, 0.0], [1.0, 2.0, 3.0]]).to(torch.float16)
    td = TensorDict({"token_advantages": tok, "response_mask": mask}, batch_size=[2])
    with pytest.raises(ValueError, match=r"'token_advantages' must be finite .*at \[0, 1\]"):
        PerTokenAdvantage()(td)
    # renamed key: the message names the key the module reads
    td = TensorDict({"ta": torch.full((2, 3), float("nan")), "response_mask": mask}, batch_size=[2])
    with pytest.raises(ValueError, match="'token_advantages' must be finite"):
        PerTokenAdvantage(in_keys={"token_advantages": "ta"})(td)
    # a 0/1 float mask is read as a mask; values other than 0/1 are refused
    td = TensorDict({"token_advantages": torch.ones(2, 3), "response_mask": mask.float() * 2}, batch_size=[2])
    with pytest.raises(ValueError, match="'response_mask'"):
        PerTokenAdvantage()(td)


# ---------------------------------------------------------------------------------------------
# Extreme and malformed rewards
# ---------------------------------------------------------------------------------------------

SQRT_HALF = 0.7071067811865476  # 1/sqrt(2): any two distinct rewards, Bessel std, eps = 0


def _gid(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def test_huge_rewards_do_not_overflow_the_group_statistics() -> None:
    """float32 rewards whose squares (or sums) overflow: the issue's cases, values by hand.

    [1e20, −1e20]: mean 0, std = sqrt(2e40) = 1.414e20, so Â = ±1/sqrt(2) (the unscaled float32
    formula squares 1e20 to inf and gave [0, −0]). [3e38, 2e38]: mean 2.5e38 (the float32 sum
    overflows), centred ±0.5e38, RLOO ±1e38, and 1/sqrt(2) again.
    """
    r = torch.tensor([1e20, -1e20])
    for eps in (0.0, 1e-6):
        torch.testing.assert_close(
            group_normalized_advantages(r, _gid(2), eps=eps), torch.tensor([SQRT_HALF, -SQRT_HALF])
        )
        torch.testing.assert_close(
            batch_whitened_advantages(r, _gid(2), eps=eps), torch.tensor([SQRT_HALF, -SQRT_HALF])
        )
    r = torch.tensor([3e38, 2e38])
    torch.testing.assert_close(group_normalized_advantages(r, _gid(2)), torch.tensor([SQRT_HALF, -SQRT_HALF]))
    torch.testing.assert_close(batch_whitened_advantages(r, _gid(2)), torch.tensor([SQRT_HALF, -SQRT_HALF]))
    torch.testing.assert_close(group_mean_advantages(r, _gid(2)), torch.tensor([0.5e38, -0.5e38]))
    torch.testing.assert_close(leave_one_out_advantages(r, _gid(2)), torch.tensor([1e38, -1e38]))


def test_issue_case_three_e38_group_is_finite() -> None:
    """[3e38, 3e38, −3e38, 1]: mean 0.75e38, deviations up to −3.75e38 (beyond float32's max).
    Reference in float64 by hand: Â = (r − m) / s with m = (3e38 + 3e38 − 3e38 + 1)/4 and s the
    Bessel std. The normalising estimators are finite and match; the group-mean and RLOO
    advantages are themselves beyond float32's range, a ValueError saying so (float64 works)."""
    values = [3e38, 3e38, -3e38, 1.0]
    r32 = torch.tensor(values)
    exact32 = [float(v) for v in r32.tolist()]  # the float32-rounded rewards
    m = sum(exact32) / 4
    s = math.sqrt(sum((v - m) ** 2 for v in exact32) / 3)
    want = torch.tensor([(v - m) / s for v in exact32])
    for fn in (group_normalized_advantages, batch_whitened_advantages):
        got = fn(r32, _gid(4))
        assert bool(torch.isfinite(got).all()), (fn.__name__, got)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for fn in (group_mean_advantages, leave_one_out_advantages):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: an advantage overflows torch.float32"):
            fn(r32, _gid(4))
        got64 = fn(r32.double(), _gid(4))
        scale = 1.0 if fn is group_mean_advantages else 4 / 3
        torch.testing.assert_close(
            got64, torch.tensor([scale * (v - m) for v in exact32], dtype=torch.float64)
        )


def test_eps_zero_with_tiny_rewards_is_finite() -> None:
    """eps = 0 and [0, 1e-30]: the float32 square of 1e-30 underflows to 0, and the unscaled
    formula gave [−inf, inf]. The scale-free value is ±1/sqrt(2); float64 at 1e-300 and float32
    subnormals likewise."""
    for r in (
        torch.tensor([0.0, 1e-30]),
        torch.tensor([0.0, 1e-300], dtype=torch.float64),
        torch.tensor([0.0, 1e-45]),  # the smallest float32 subnormal
        torch.tensor([-1e-45, 1e-45]),
    ):
        for fn in (group_normalized_advantages, batch_whitened_advantages):
            got = fn(r, _gid(2), eps=0.0)
            torch.testing.assert_close(got, torch.tensor([-SQRT_HALF, SQRT_HALF], dtype=r.dtype))


def test_float64_rewards_near_the_float64_max() -> None:
    """[1.7e308, −1.7e308, 1e308]: the normalising estimators are scale-free, so the reference is
    computed in units of 1e308 ([1.7, −1.7, 1]); the centred value −1.7e308 − 3.3e307 is beyond
    float64, so the group-mean advantage is a ValueError."""
    r = torch.tensor([1.7e308, -1.7e308, 1e308], dtype=torch.float64)
    units = [1.7, -1.7, 1.0]
    m, s = statistics.fmean(units), statistics.stdev(units)
    want = torch.tensor([(u - m) / s for u in units], dtype=torch.float64)
    for fn in (group_normalized_advantages, batch_whitened_advantages):
        torch.testing.assert_close(fn(r, _gid(3)), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"overflows torch\.float64"):
        group_mean_advantages(r, _gid(3))  # −1.7e308 − 3.3e307 is beyond float64


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
magnitudes = st.sampled_from([1e-45, 1e-38, 1e-30, 1e-6, 1.0, 1e6, 1e20, 1e30, 1e37, 3e38])


@st.composite
def extreme_groups(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 rewards anywhere in the finite range (subnormals and values near ±3.4e38
    included), per-group magnitudes mixed, a random valid mask, shuffled integer ids."""
    num_groups = draw(st.integers(1, 4))
    rewards: list[float] = []
    ids: list[int] = []
    for g in range(num_groups):
        size = draw(st.integers(1, 6))
        style = draw(st.sampled_from(["any", "scaled", "constant"]))
        if style == "any":
            values = draw(st.lists(finite32, min_size=size, max_size=size))
        elif style == "scaled":
            scale = draw(magnitudes)
            units = draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=size, max_size=size))
            values = [u * scale for u in units]
        else:
            values = [draw(finite32)] * size
        rewards += values
        ids += [draw(st.integers(-(2**40), 2**40)) * 0 + 7 * g - 3] * size
    r = torch.tensor(rewards, dtype=torch.float32)  # rounds the scaled values to float32
    gid = torch.tensor(ids, dtype=torch.long)
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=len(rewards), max_size=len(rewards))))
    perm = torch.tensor(draw(st.permutations(range(len(rewards)))), dtype=torch.long)
    return r[perm], gid[perm], valid[perm]


def _stdev_and_mean(values: list[float]) -> tuple[float, float]:
    """Exact-rational mean and Bessel std (statistics uses fractions), from float32 values."""
    return statistics.fmean(values), statistics.stdev(values)


@settings(max_examples=200)
@given(batch=extreme_groups(), eps=st.sampled_from([0.0, 1e-6, 1.0]))
def test_extreme_rewards_property(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], eps: float) -> None:
    """For any finite float32 rewards and any valid mask: the normalising estimators are finite
    and equal an exact reference (fractions via ``statistics``, in float64) to within the float32
    rounding of the group's largest reward relative to its std; constant groups and invalid samples
    are exactly 0; group-mean and RLOO either match their reference or raise ValueError exactly
    when the reference is beyond float32's range."""
    rewards, gid, valid = batch
    f32max = float(torch.finfo(torch.float32).max)
    for kind in ("group-normalized", "batch-whitened", "group-mean", "rloo"):
        fn = ESTIMATORS[kind]
        kwargs = {"eps": eps} if kind in ("group-normalized", "batch-whitened") else {}
        want = reference_advantages(kind, rewards.double(), gid, eps=eps, valid=valid)
        if kind in ("group-mean", "rloo") and bool((want.abs() > f32max).any()):
            with pytest.raises(ValueError, match=r"overflows torch\.float32"):
                fn(rewards, gid, valid=valid, **kwargs)
            continue
        got = fn(rewards, gid, valid=valid, **kwargs)
        assert got.dtype == torch.float32 and bool(torch.isfinite(got).all()), (kind, rewards, got)
        assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))
        for idx in _groups(gid):
            members = [int(i) for i in idx if bool(valid[i])]
            values = [float(rewards[i]) for i in members]
            if _is_constant(values):
                assert torch.equal(got[idx], torch.zeros_like(got[idx])), (kind, values)
                continue
            _, std = _stdev_and_mean(values)
            peak = max(abs(v) for v in values)
            # float32 rounding of sums / deviations ~ n·u·peak, relative to the spread std
            unit = 8 * len(values) * 2.0**-24 * peak / std
            if kind == "group-normalized":
                tol = unit * (1.0 + float(want[members].abs().max()))
            elif kind == "batch-whitened":
                continue  # the batch std mixes groups: checked as a whole below
            else:
                tol = unit * std * 2 + 1e-45
            err = (got[members].double() - want[members]).abs().max().item()
            assert err <= tol, (kind, values, got[members], want[members])
        if kind == "batch-whitened":
            live = got != 0
            if bool(live.any()):
                # the result is x / std_batch: its own Bessel std over valid samples is ≈ 1 when eps ≪ std
                assert float(got.abs().max()) <= math.sqrt(max(int(valid.sum()) - 1, 1)) + 1e-3


MALFORMED: dict[str, tuple[Callable[[], tuple[object, object, dict]], str]] = {
    "rewards-2d": (
        lambda: (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), {}),
        r"'rewards' must have shape \[N\]",
    ),
    "rewards-int": (
        lambda: (torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long), {}),
        "'rewards' must be a floating",
    ),
    "rewards-list": (
        lambda: ([1.0, 2.0], torch.zeros(2, dtype=torch.long), {}),
        "'rewards' must be a torch.Tensor",
    ),
    "rewards-empty": (lambda: (torch.zeros(0), torch.zeros(0, dtype=torch.long), {}), "'rewards' is empty"),
    "rewards-nan": (
        lambda: (torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long), {}),
        "NaN or ±inf",
    ),
    "rewards-inf": (
        lambda: (torch.tensor([float("inf"), 1.0]), torch.zeros(2, dtype=torch.long), {}),
        "NaN or ±inf",
    ),
    "ids-float": (lambda: (torch.zeros(2), torch.zeros(2), {}), "'group_ids' must be an integer tensor"),
    "ids-bool": (
        lambda: (torch.zeros(2), torch.zeros(2, dtype=torch.bool), {}),
        "'group_ids' must be an integer",
    ),
    "ids-list": (lambda: (torch.zeros(2), [0, 0], {}), "'group_ids' must be an integer tensor"),
    "ids-shape": (
        lambda: (torch.zeros(2), torch.zeros(3, dtype=torch.long), {}),
        r"'group_ids' must have shape \[N\] = \[2\]",
    ),
    "valid-int": (
        lambda: (
            torch.zeros(2),
            torch.zeros(2, dtype=torch.long),
            {"valid": torch.ones(2, dtype=torch.long)},
        ),
        "'reward_valid' must be a bool tensor",
    ),
    "valid-shape": (
        lambda: (
            torch.zeros(2),
            torch.zeros(2, dtype=torch.long),
            {"valid": torch.ones(3, dtype=torch.bool)},
        ),
        "'reward_valid' must be a bool tensor of shape \\[2\\]",
    ),
    "valid-list": (
        lambda: (torch.zeros(2), torch.zeros(2, dtype=torch.long), {"valid": [True, True]}),
        "'reward_valid' must be a bool tensor",
    ),
}


@settings(max_examples=100)
@given(
    case=st.sampled_from(sorted(MALFORMED)),
    kind=st.sampled_from(sorted(ESTIMATORS)),
    eps=st.one_of(st.just(1e-6), st.sampled_from([-1.0, float("nan"), -1e-300, "abc"])),
)
def test_malformed_inputs_are_value_errors(case: str, kind: str, eps: object) -> None:
    """Any malformed argument, alone or with a bad eps: a ValueError that names it; never a
    crash inside torch, never a silent result."""
    make, message = MALFORMED[case]
    rewards, gid, kwargs = make()
    fn = ESTIMATORS[kind]
    if kind in ("group-normalized", "batch-whitened"):
        kwargs = {**kwargs, "eps": eps}
        if eps != 1e-6:
            message = "eps"
    with pytest.raises(ValueError, match=message):
        fn(rewards, gid, **kwargs)
