"""AdvantageEstimator tests: property 9 of ALGORITHMS.md, and the estimators' exact values.

Proves, for the group-normalised (GRPO), group-mean (Dr.GRPO), leave-one-out (RLOO) and
batch-whitened (REINFORCE++-baseline) estimators:

- Σ_g Â = 0 in every group (for batch-whitened, the group-centred values x_i sum to 0, and so
  does Â = x / const);
- invariance under r → a·r + b, a > 0 (eps = 0) of the group-normalised and batch-whitened
  advantages; the group-mean and RLOO advantages scale by a;
- group locality: changing group k's rewards leaves every other group's advantages bit-identical;
- permuting the samples permutes the advantages;
- zero-variance groups, single-sample groups included, give exactly 0;
- values equal an independent per-group reference written from ALGORITHMS.md (Bessel std, eps,
  RLOO computed literally as leave-one-out, batch whitening per its docstring);
- ``reward_valid``: invalid samples get 0 and take no part in their group's statistics;
- non-finite rewards on valid samples raise ``ValueError``;
- the TensorDict modules (incl. the per-token pass-through) write ``advantages`` and honour
  ``in_keys`` / ``out_keys`` overrides in mapping and sequence form.
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
# Independent references, written from ALGORITHMS.md with Python floats and a loop over groups.
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
    """The advantage of ALGORITHMS.md, computed one group at a time."""
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
