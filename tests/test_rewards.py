"""RewardFn tests, on the real verifiers (math-verify 0.9.0, reasoning-gym 0.1.25; nothing mocked).

What is checked:

- :class:`MathAnswerReward`: equivalent forms score ``correct`` (``\\boxed{1/2}`` against ``0.5``,
  ``12+34=46`` against ``46``, ``\\frac{1}{2}`` against ``0.5``, plain integers), wrong answers and
  empty responses score ``incorrect`` and stay valid, custom reward values, ``in_keys`` renaming;
  a reference that math-verify cannot parse fails *that* sample only: ``reward_valid`` False,
  reward 0, the others scored, the failure kept in ``last_failures`` (reset per call), counted in
  ``failures_total`` across calls, and a ``RuntimeWarning`` (none with ``warn=False``).
- The failure capture of the :class:`RewardFn` base, on a subclass whose ``score`` raises,
  returns NaN / ±inf or a non-number on chosen samples: the batch goes on, ``reward_valid`` marks
  exactly those samples, the other rewards are exact (also as a hypothesis property).
- :class:`ReasoningGymReward` on the real ``basic_arithmetic`` dataset: ``prompts`` are the
  dataset's questions in the order asked, the dataset's own answers (tagged and bare) score 1.0,
  wrong ones less, and the entry scored is the one ``data_index`` names.
- :class:`FormatReward`: ``re.search`` against ``full_match``, flags, reward / penalty values,
  an invalid pattern → ``ValueError``.
- :class:`OverlongPenalty`: DAPO eq. 13 (arXiv 2503.14476), written here independently, at the
  band edges and under hypothesis over lengths and budgets.
- :class:`WeightedSum`: each term under ``("reward_terms", name)``, the weighted sum, and a failure
  in one term invalidating that sample only.
- End to end: a failed sample is left out of its group's statistics by
  :class:`GroupNormalizedAdvantage` (same advantages as the group without it) and gets Â = 0.
- Hardening (issue 13): a sample whose ``score`` sleeps or spins forever, and ``FormatReward``'s
  catastrophic ``(a+)+$``, are cut off by the per-sample timeout in the main thread (SIGALRM, an
  outer timer restored) and in another thread (a forked worker), and fail alone;
  ``MathAnswerReward`` works in a non-main thread; a math-verify parse that runs over
  (``9^{9^{9^{9}}}``) is a *failed* sample, and no output, log or warning holds the input whole;
  a 1 MB response is parsed from its tail and a 1 MB reference fails with a short message
  (tracemalloc peak under 64 MiB); ``"0.75"``, ``True``, tensors, arrays, ``None`` are refused
  (also as a hypothesis property over mixed return values); a TensorDict of batch size ``[]`` or
  ``[2, 3]`` is a ValueError; ``WeightedSum`` counts a failing sample once and refuses NaN / inf /
  non-numeric weights; bad ``timeout`` and length bounds are ValueErrors.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import statistics
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import NonTensorStack, TensorDict

from gspo_components import GroupNormalizedAdvantage, group_normalized_advantages
from gspo_components.rollout.rewards import (
    FormatReward,
    MathAnswerReward,
    OverlongPenalty,
    ReasoningGymReward,
    RewardFailure,
    RewardFn,
    RewardTimeout,
    WeightedSum,
    overlong_penalty,
)

# --------------------------------------------------------------------------------------------
# helpers


def text_batch(**columns: Sequence[str]) -> TensorDict:
    """A TensorDict of batch size [N] holding string columns as NonTensorStacks."""
    n = len(next(iter(columns.values())))
    td = TensorDict({}, batch_size=[n])
    for name, values in columns.items():
        assert len(values) == n
        td.set(name, NonTensorStack(*values))
    return td


def prefix_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    """A right-padded [N, width] response mask with the given row lengths."""
    return torch.arange(width).unsqueeze(0) < torch.tensor(list(lengths)).unsqueeze(1)


def run_quiet(fn: RewardFn, td: TensorDict) -> TensorDict:
    """Call a reward function, ignoring its failure warning (tests that check it use pytest.warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(td)


# --------------------------------------------------------------------------------------------
# MathAnswerReward

EQUIVALENT = [
    (r"\boxed{1/2}", "0.5"),
    ("12+34=46", "46"),
    ("46", "46"),
    ("0.5", r"\frac{1}{2}"),
    (r"The answer is \boxed{46}.", "46"),
    ("-7", "-7"),
]
WRONG = [
    ("47", "46"),
    ("12+34=47", "46"),
    (r"\boxed{1/3}", "0.5"),
    ("", "46"),
    ("=+", "46"),
]


@pytest.fixture(scope="module")
def math_reward_results() -> tuple[torch.Tensor, torch.Tensor]:
    """One batch through the real math-verify: the equivalent pairs, then the wrong ones."""
    pairs = EQUIVALENT + WRONG
    td = text_batch(response_text=[r for r, _ in pairs], answer=[a for _, a in pairs])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing here may fail
        out = MathAnswerReward()(td)
    return out["rewards"], out["reward_valid"]


def test_math_answer_equivalent_forms_score_correct(
    math_reward_results: tuple[torch.Tensor, torch.Tensor],
) -> None:
    rewards, valid = math_reward_results
    assert rewards.dtype == torch.float32 and valid.dtype == torch.bool
    got = rewards[: len(EQUIVALENT)].tolist()
    assert got == [1.0] * len(EQUIVALENT), list(zip(EQUIVALENT, got, strict=True))
    assert bool(valid[: len(EQUIVALENT)].all())


def test_math_answer_wrong_answers_score_zero_and_stay_valid(
    math_reward_results: tuple[torch.Tensor, torch.Tensor],
) -> None:
    rewards, valid = math_reward_results
    got = rewards[len(EQUIVALENT) :].tolist()
    assert got == [0.0] * len(WRONG), list(zip(WRONG, got, strict=True))
    # A wrong or unparseable *response* is an incorrect answer, not a verifier failure.
    assert bool(valid[len(EQUIVALENT) :].all())


def test_math_answer_custom_values_and_renamed_keys() -> None:
    td = text_batch(response_text=[r"\boxed{1/2}", "0.4", "46"], gold=["0.5", "0.5", "46"])
    reward = MathAnswerReward(correct=2.5, incorrect=-1.0, in_keys={"answer": "gold"}, out_key="r_math")
    out = reward(td)
    assert out["r_math"].tolist() == [2.5, -1.0, 2.5]
    assert out["reward_valid"].tolist() == [True, True, True]
    assert "rewards" not in out.keys()
    assert reward.in_keys == ["response_text", "gold"]


def test_math_answer_unparseable_reference_fails_only_that_sample() -> None:
    td = text_batch(response_text=["46", "46", "0.5", "3"], answer=["46", "hello", r"\frac{1}{2}", "4"])
    reward = MathAnswerReward(correct=1.0, incorrect=-0.5)
    with pytest.warns(RuntimeWarning, match=r"MathAnswerReward: 1 of 4 samples failed"):
        out = reward(td)
    assert out["reward_valid"].tolist() == [True, False, True, True]
    assert out["rewards"].tolist() == [1.0, 0.0, 1.0, -0.5]
    assert len(reward.last_failures) == 1
    failure = reward.last_failures[0]
    assert isinstance(failure, RewardFailure)
    assert failure.index == 1
    assert isinstance(failure.error, ValueError) and "hello" in str(failure.error)
    assert "index=1" in repr(failure)
    assert reward.failures_total == 1


def test_math_answer_failures_counted_across_calls() -> None:
    reward = MathAnswerReward()
    bad = text_batch(response_text=["1", "2", "3"], answer=["", "2", "not a number"])
    good = text_batch(response_text=["1", "2"], answer=["1", "5"])
    with pytest.warns(RuntimeWarning, match="2 of 3 samples failed"):
        out = reward(bad)
    assert out["reward_valid"].tolist() == [False, True, False]
    assert [f.index for f in reward.last_failures] == [0, 2]
    assert reward.failures_total == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a clean batch does not warn
        out = reward(good)
    assert out["reward_valid"].tolist() == [True, True]
    assert out["rewards"].tolist() == [1.0, 0.0]
    assert reward.last_failures == []  # reset per call
    assert reward.failures_total == 2  # ... but the total is kept
    with pytest.warns(RuntimeWarning):
        reward(bad)
    assert len(reward.last_failures) == 2
    assert reward.failures_total == 4


def test_math_answer_warn_false_is_silent_but_still_counts() -> None:
    reward = MathAnswerReward(warn=False)
    td = text_batch(response_text=["1", "2"], answer=["1", "hello"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = reward(td)
    assert out["reward_valid"].tolist() == [True, False]
    assert reward.failures_total == 1


# --------------------------------------------------------------------------------------------
# The RewardFn base: failure capture


class RaiseOn(Exception):
    """Raised by :class:`ScriptedReward` for the samples told to fail."""


class ScriptedReward(RewardFn):
    """score(sample) looks the response text up in ``script``: a float is returned as is, an
    exception instance is raised, anything else (None, a string) is returned as is."""

    fields = ("response_text", "scale")

    def __init__(self, script: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = script
        self.calls = 0

    def score(self, sample: dict[str, Any]) -> float:
        self.calls += 1
        assert isinstance(sample["scale"], float)  # a tensor field arrives as a Python scalar
        value = self.script[sample["response_text"]]
        if isinstance(value, BaseException):
            raise value
        return value if not isinstance(value, float) else value * sample["scale"]


def test_reward_fn_failures_leave_the_batch_going() -> None:
    script: dict[str, Any] = {
        "a": 1.5,
        "boom": RaiseOn("verifier crashed"),
        "b": -2.0,
        "nan": float("nan"),
        "inf": float("inf"),
        "c": 0.25,
        "-inf": float("-inf"),
        "key": KeyError("missing"),
        "none": None,
        "str": "not a number",
    }
    texts = list(script)
    td = text_batch(response_text=texts)
    td.set("scale", torch.full((len(texts),), 2.0))
    reward = ScriptedReward(script)
    with pytest.warns(RuntimeWarning, match=rf"ScriptedReward: 7 of {len(texts)} samples failed"):
        out = reward(td)
    assert reward.calls == len(texts)  # every sample was scored despite the failures
    expected_valid = [t in ("a", "b", "c") for t in texts]
    assert out["reward_valid"].tolist() == expected_valid
    assert out["rewards"].tolist() == [3.0, 0.0, -4.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    failed = {texts[f.index]: f.error for f in reward.last_failures}
    assert sorted(failed) == sorted(t for t, ok in zip(texts, expected_valid, strict=True) if not ok)
    assert isinstance(failed["boom"], RaiseOn)
    assert isinstance(failed["key"], KeyError)
    for name in ("nan", "inf", "-inf"):
        assert isinstance(failed[name], ValueError) and "not finite" in str(failed[name])
    assert reward.failures_total == 7


SENTINELS = ("raise", "nan", "inf", "-inf")


@given(
    outcomes=st.lists(
        st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.sampled_from(SENTINELS)),
        min_size=1,
        max_size=24,
    )
)
def test_reward_fn_valid_marks_exactly_the_failures(outcomes: list[float | str]) -> None:
    """Any pattern of failures: valid ⇔ score returned a finite number; those rewards are exact."""
    texts = [f"s{i}" for i in range(len(outcomes))]
    script: dict[str, Any] = {}
    for text, outcome in zip(texts, outcomes, strict=True):
        if outcome == "raise":
            script[text] = RaiseOn(text)
        elif isinstance(outcome, str):
            script[text] = float(outcome)
        else:
            script[text] = outcome
    td = text_batch(response_text=texts)
    td.set("scale", torch.ones(len(texts)))
    reward = ScriptedReward(script, warn=False)
    out = reward(td)
    expected_valid = [not isinstance(o, str) for o in outcomes]
    assert out["reward_valid"].tolist() == expected_valid
    expected_rewards = [o if not isinstance(o, str) else 0.0 for o in outcomes]
    assert out["rewards"].tolist() == expected_rewards  # float32 values round-trip exactly
    assert [f.index for f in reward.last_failures] == [i for i, ok in enumerate(expected_valid) if not ok]
    assert reward.failures_total == expected_valid.count(False)


def test_reward_fn_without_score_fails_every_sample() -> None:
    """The base class has no score(): every sample fails with NotImplementedError, no crash."""
    td = text_batch(response_text=["x", "y"])
    reward = RewardFn(warn=False)
    out = reward(td)
    assert out["reward_valid"].tolist() == [False, False]
    assert all(isinstance(f.error, NotImplementedError) for f in reward.last_failures)


def test_reward_fn_missing_field_is_a_value_error_naming_it() -> None:
    td = text_batch(response_text=["1"])
    with pytest.raises(ValueError, match="answer"):
        MathAnswerReward()(td)


# --------------------------------------------------------------------------------------------
# ReasoningGymReward on a real dataset

RG_SIZE = 8
RG_SEED = 1234


@pytest.fixture(scope="module")
def rg_reward() -> ReasoningGymReward:
    return ReasoningGymReward("basic_arithmetic", size=RG_SIZE, seed=RG_SEED)


@pytest.fixture(scope="module")
def rg_entries() -> list[dict[str, Any]]:
    """The same dataset, built here directly from reasoning-gym."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=RG_SIZE, seed=RG_SEED)
    return [dataset[i] for i in range(RG_SIZE)]


def rg_batch(texts: Sequence[str], indices: Sequence[int]) -> TensorDict:
    td = text_batch(response_text=list(texts))
    td.set("data_index", torch.tensor(list(indices), dtype=torch.long))
    return td


def test_reasoning_gym_prompts_are_the_dataset_questions(
    rg_reward: ReasoningGymReward, rg_entries: list[dict[str, Any]]
) -> None:
    assert len(rg_reward) == RG_SIZE
    order = [5, 0, 7, 2]
    assert rg_reward.prompts(order) == [rg_entries[i]["question"] for i in order]
    assert rg_reward.answers(order) == [str(rg_entries[i]["answer"]) for i in order]
    assert all(q.strip() for q in rg_reward.prompts(range(RG_SIZE)))


def test_reasoning_gym_own_answers_score_one(
    rg_reward: ReasoningGymReward, rg_entries: list[dict[str, Any]]
) -> None:
    answers = [str(e["answer"]) for e in rg_entries]
    indices = list(range(RG_SIZE))
    tagged = [f"Let me think. <answer>{a}</answer>" for a in answers]
    bare = [f"  {a}\n" for a in answers]
    last_tag_wins = [f"<answer>{a}9</answer> on reflection <answer>{a}</answer>" for a in answers]
    td = rg_batch(tagged + bare + last_tag_wins, indices * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = rg_reward(td)
    assert out["reward_valid"].all()
    assert out["rewards"].tolist() == [1.0] * (3 * RG_SIZE)


def test_reasoning_gym_wrong_answers_score_less(
    rg_reward: ReasoningGymReward, rg_entries: list[dict[str, Any]]
) -> None:
    answers = [str(e["answer"]) for e in rg_entries]
    wrong = [f"<answer>{a}7</answer>" for a in answers] + ["no idea"] * RG_SIZE
    td = rg_batch(wrong, list(range(RG_SIZE)) * 2)
    out = run_quiet(rg_reward, td)
    assert bool(out["reward_valid"].all())
    assert bool((out["rewards"] < 1.0).all()), out["rewards"]


def test_reasoning_gym_scores_the_entry_data_index_names(
    rg_reward: ReasoningGymReward, rg_entries: list[dict[str, Any]]
) -> None:
    answers = [str(e["answer"]) for e in rg_entries]
    assert answers[0] != answers[1]  # so that scoring the wrong entry shows
    # Reversed rows, with data_index reversed too: still each its own entry.
    order = list(reversed(range(RG_SIZE)))
    out = rg_reward(rg_batch([f"<answer>{answers[i]}</answer>" for i in order], order))
    assert out["rewards"].tolist() == [1.0] * RG_SIZE
    # Entry 0's answer under data_index 1 (and vice versa) is wrong for the entry named.
    out = run_quiet(rg_reward, rg_batch([answers[0], answers[1]], [1, 0]))
    assert bool((out["rewards"] < 1.0).all())


def test_reasoning_gym_dataset_object_and_custom_extract(rg_entries: list[dict[str, Any]]) -> None:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=RG_SIZE, seed=RG_SEED)
    reward = ReasoningGymReward(dataset, extract=lambda text: text.rsplit("ANSWER:", 1)[-1].strip())
    answer = str(rg_entries[3]["answer"])
    out = reward(rg_batch([f"work... ANSWER: {answer}", f"<answer>{answer}</answer>"], [3, 3]))
    # The custom extractor does not understand tags: the second row is scored on the raw text.
    assert out["rewards"][0].item() == 1.0
    assert out["rewards"][1].item() < 1.0


# --------------------------------------------------------------------------------------------
# FormatReward


def test_format_search_against_full_match() -> None:
    texts = ["the answer is 12 ok", "12", "", "x"]
    td = text_batch(response_text=texts)
    searched = FormatReward(r"\d+")(td.clone())
    full = FormatReward(r"\d+", full_match=True)(td.clone())
    assert searched["rewards"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert full["rewards"].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert searched["reward_valid"].all() and full["reward_valid"].all()


def test_format_flags_and_values() -> None:
    texts = ["<think>a\nb</think> <answer>3</answer>", "<THINK>x</THINK><answer>3</answer>", "3"]
    td = text_batch(response_text=texts)
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    plain = FormatReward(pattern, reward=2.0, penalty=-1.0)(td.clone())
    dotall = FormatReward(pattern, flags=re.S, reward=2.0, penalty=-1.0)(td.clone())
    both = FormatReward(pattern, flags=re.S | re.I, full_match=True)(td.clone())
    assert plain["rewards"].tolist() == [-1.0, -1.0, -1.0]  # "." does not cross the newline
    assert dotall["rewards"].tolist() == [2.0, -1.0, -1.0]
    assert both["rewards"].tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x", "(?P<x>a)(?P<x>b)"])
def test_format_invalid_regex_is_a_value_error(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"FormatReward: pattern .* is not a valid regex"):
        FormatReward(pattern)


# --------------------------------------------------------------------------------------------
# OverlongPenalty: DAPO eq. 13


def dapo_eq13(length: int, max_length: int, cache_length: int) -> float:
    """DAPO (arXiv 2503.14476) eq. 13, R_length(y) for |y| = length, as printed in the paper."""
    if length <= max_length - cache_length:
        return 0.0
    if length <= max_length:
        return ((max_length - cache_length) - length) / cache_length
    return -1.0


def overlong_rewards(lengths: Sequence[int], max_length: int, cache_length: int, width: int) -> torch.Tensor:
    td = TensorDict({"response_mask": prefix_mask(lengths, width)}, batch_size=[len(lengths)])
    out = OverlongPenalty(max_length, cache_length)(td)
    assert out["reward_valid"].all()
    assert out["rewards"].dtype == torch.float32
    return out["rewards"]


@pytest.mark.parametrize(("max_length", "cache_length"), [(20, 4), (8, 8), (5, 1), (1, 1)])
def test_overlong_band_edges(max_length: int, cache_length: int) -> None:
    start = max_length - cache_length
    lengths = [
        0,
        max(start - 1, 0),
        start,
        start + 1,
        max_length - 1,
        max_length,
        max_length + 1,
        max_length + 7,
    ]
    got = overlong_rewards(lengths, max_length, cache_length, width=max_length + 8)
    expected = [dapo_eq13(n, max_length, cache_length) for n in lengths]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[lengths.index(start)].item() == 0.0  # the last length without penalty
    assert got[lengths.index(start + 1)].item() == pytest.approx(-1.0 / cache_length)  # first penalised
    assert got[lengths.index(max_length)].item() == pytest.approx(-1.0)  # the ramp ends at -1
    assert got[lengths.index(max_length + 1)].item() == -1.0


@st.composite
def overlong_case(draw: st.DrawFn) -> tuple[list[int], int, int]:
    max_length = draw(st.integers(1, 64))
    cache_length = draw(st.integers(1, max_length))
    start = max_length - cache_length
    edges = sorted({0, start, start + 1, max_length - 1, max_length, max_length + 1} - {-1})
    near_edge = st.sampled_from(edges)
    anywhere = st.integers(0, max_length + 10)
    lengths = draw(st.lists(st.one_of(near_edge, anywhere), min_size=1, max_size=16))
    return lengths, max_length, cache_length


@given(case=overlong_case())
def test_overlong_matches_dapo_eq13(case: tuple[list[int], int, int]) -> None:
    lengths, max_length, cache_length = case
    got = overlong_rewards(lengths, max_length, cache_length, width=max_length + 10)
    expected = [dapo_eq13(n, max_length, cache_length) for n in lengths]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert bool(((got >= -1.0) & (got <= 0.0)).all())
    pure = overlong_penalty(torch.tensor(lengths), max_length, cache_length)
    assert torch.equal(pure, got)


def test_overlong_counts_mask_tokens_not_positions() -> None:
    """|y| is the number of valid tokens: a cleared row has length 0, a gap-free prefix its length."""
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[1, :10] = True
    mask[2, ::2] = True  # 6 tokens spread over the row
    td = TensorDict({"response_mask": mask}, batch_size=[3])
    got = OverlongPenalty(10, 4)(td)["rewards"].tolist()
    assert got == pytest.approx([0.0, -1.0, 0.0])


@pytest.mark.parametrize(("max_length", "cache_length"), [(0, 1), (4, 5), (4, 0), (4, -1)])
def test_overlong_bad_hyper_parameters(max_length: int, cache_length: int) -> None:
    with pytest.raises(ValueError, match="OverlongPenalty"):
        OverlongPenalty(max_length, cache_length)


# --------------------------------------------------------------------------------------------
# WeightedSum


def weighted_batch(answers: Sequence[str]) -> TensorDict:
    texts = ["12", "the sum is 12", "7", "123456"]
    td = text_batch(response_text=texts, answer=list(answers))
    td.set("response_mask", prefix_mask([3, 14, 2, 7], 16))
    return td


def weighted_terms() -> dict[str, tuple[RewardFn, float]]:
    return {
        "math": (MathAnswerReward(), 1.0),
        "format": (FormatReward(r"\d+", full_match=True), 0.5),
        "overlong": (OverlongPenalty(8, 4), 2.0),
    }


def test_weighted_sum_writes_each_term_and_the_sum() -> None:
    answers = ["12", "12", "8", "123456"]
    terms = weighted_terms()
    reward = WeightedSum(terms)
    assert reward.out_keys == ["rewards", "reward_valid", *[("reward_terms", n) for n in terms]]
    assert set(reward.in_keys) == {"response_text", "answer", "response_mask"}
    out = reward(weighted_batch(answers))
    alone = {name: fn(weighted_batch(answers))["rewards"] for name, (fn, _) in terms.items()}
    assert alone["math"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert alone["format"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert alone["overlong"].tolist() == pytest.approx([0.0, -1.0, 0.0, -0.75])
    expected = torch.zeros(4)
    for name, (_, weight) in terms.items():
        assert torch.equal(out["reward_terms", name], alone[name]), name
        expected += weight * alone[name]
    assert torch.allclose(out["rewards"], expected)
    assert out["rewards"].tolist() == pytest.approx([1.5, -1.0, 0.5, 0.0])
    assert out["reward_valid"].all()


def test_weighted_sum_failure_in_one_term_invalidates_that_sample() -> None:
    answers = ["12", "not a number", "8", "123456"]
    terms = weighted_terms()
    reward = WeightedSum(terms)
    with pytest.warns(RuntimeWarning):
        out = reward(weighted_batch(answers))
    assert out["reward_valid"].tolist() == [True, False, True, True]
    # The other terms still scored (and logged) the failed sample.
    assert out["reward_terms", "format"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert out["reward_terms", "overlong"].tolist() == pytest.approx([0.0, -1.0, 0.0, -0.75])
    valid_rewards = out["rewards"][out["reward_valid"]].tolist()
    assert valid_rewards == pytest.approx([1.5, 0.5, 0.0])
    assert [f.index for f in reward.last_failures] == [1]
    assert isinstance(reward.last_failures[0].error, ValueError)
    assert reward.failures_total == 1
    math_term = terms["math"][0]
    assert math_term.failures_total == 1


def test_weighted_sum_rejects_bad_terms() -> None:
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum({})
    with pytest.raises(ValueError, match="'oops' must be a RewardFn"):
        WeightedSum({"oops": (lambda td: td, 1.0)})  # type: ignore[dict-item]


# --------------------------------------------------------------------------------------------
# End to end: a failed sample and the group statistics


class FlakyMathReward(MathAnswerReward):
    """math-verify, except that the verifier "crashes" on responses containing ``boom``."""

    def score(self, sample: dict[str, Any]) -> float:
        if "boom" in str(sample["response_text"]):
            raise RuntimeError("verifier crashed")
        return super().score(sample)


def reference_group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """GRPO's (r − mean) / (std + eps), Bessel std, for one group; 0 for a constant group."""
    if len(rewards) < 2 or max(rewards) == min(rewards):
        return [0.0] * len(rewards)
    mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
    return [(r - mean) / (std + eps) for r in rewards]


def test_failed_sample_leaves_its_group_statistics_and_gets_zero_advantage() -> None:
    # Group 0: answers 46; rows 0-3 score 1, 1, 0, and row 3 fails.
    # Group 1: answer 0.5; rows 4-7 score 1, 0, 0, 1; all valid.
    texts = ["46", "12+34=46", "45", "boom 46", r"\boxed{1/2}", "2", "3", "0.5"]
    answers = ["46"] * 4 + ["0.5"] * 4
    td = text_batch(response_text=texts, answer=answers)
    td.set("group_ids", torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    with pytest.warns(RuntimeWarning):
        td = FlakyMathReward()(td)
    assert td["reward_valid"].tolist() == [True, True, True, False, True, True, True, True]
    assert td["rewards"].tolist() == [1, 1, 0, 0, 1, 0, 0, 1]
    td = GroupNormalizedAdvantage()(td)
    adv = td["advantages"]
    assert adv[3].item() == 0.0

    # The same batch without the failed row gives the same advantages to every other row.
    keep = td["reward_valid"]
    without = TensorDict(
        {"rewards": td["rewards"][keep].clone(), "group_ids": td["group_ids"][keep].clone()},
        batch_size=[int(keep.sum())],
    )
    without = GroupNormalizedAdvantage()(without)
    assert torch.equal(adv[keep], without["advantages"])

    # ... and they equal the formula on the valid rewards alone, group by group.
    expected = [*reference_group_advantages([1.0, 1.0, 0.0]), 0.0, *reference_group_advantages([1, 0, 0, 1])]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # Counting the failed row's reward of 0 would have changed group 0's statistics.
    assert not math.isclose(adv[0].item(), reference_group_advantages([1.0, 1.0, 0.0, 0.0])[0], rel_tol=1e-3)
    # The pure function with the mask agrees with the module.
    pure = group_normalized_advantages(td["rewards"], td["group_ids"], valid=td["reward_valid"])
    assert torch.equal(pure, adv)


def test_unparseable_reference_zeroes_its_whole_group_only() -> None:
    """Real math-verify: a group whose reference cannot be parsed is all invalid, Â = 0 there,
    and the other group is normalised as if it were alone."""
    texts = ["1", "2", "3", "46", "45", "46"]
    answers = ["hello"] * 3 + ["46"] * 3
    td = text_batch(response_text=texts, answer=answers)
    td.set("group_ids", torch.tensor([7, 7, 7, 3, 3, 3]))
    td = run_quiet(MathAnswerReward(), td)
    assert td["reward_valid"].tolist() == [False] * 3 + [True] * 3
    td = GroupNormalizedAdvantage()(td)
    expected = [0.0] * 3 + reference_group_advantages([1.0, 0.0, 1.0])
    assert td["advantages"].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


# --------------------------------------------------------------------------------------------
# Hardening (issue 13): timeouts, threads, bounded inputs and logs, strict values


class HangOn(RewardFn):
    """score: "sleep" sleeps forever, "spin" busy-loops forever in Python, "<x>" returns float(x)."""

    fields = ("response_text",)

    def score(self, sample: dict[str, Any]) -> float:
        text = sample["response_text"]
        if text == "sleep":
            while True:
                time.sleep(0.01)
        if text == "spin":
            n = 0
            while True:
                n += 1
        return float(text)


def in_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a non-main thread; its result (or its exception, re-raised here)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = fn()
        except BaseException as error:  # re-raised in the caller
            box["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the reward call did not return"
    if "error" in box:
        raise box["error"]
    return box["out"]


@pytest.mark.parametrize("where", ["main-thread", "other-thread"])
def test_hanging_reward_is_cut_off_and_counts_as_failed(where: str) -> None:
    """A sample whose score never returns (sleeping, or spinning in Python) is cut off after the
    timeout, fails with RewardTimeout, and every other sample is scored exactly."""
    texts = ["1.5", "sleep", "-2", "spin", "0.25"]
    reward = HangOn(timeout=0.3, warn=False)

    def call() -> TensorDict:
        return reward(text_batch(response_text=texts))

    out = call() if where == "main-thread" else in_thread(call)
    assert out["reward_valid"].tolist() == [True, False, True, False, True]
    assert out["rewards"].tolist() == [1.5, 0.0, -2.0, 0.0, 0.25]
    assert [f.index for f in reward.last_failures] == [1, 3]
    assert all(isinstance(f.error, RewardTimeout) for f in reward.last_failures)
    assert "timeout of 0.3 s" in str(reward.last_failures[0].error)
    assert reward.failures_total == 2


def test_timeout_restores_an_outer_interval_timer() -> None:
    """The SIGALRM timer of the main-thread timeout gives back a timer the caller had running."""
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        HangOn(timeout=0.2, warn=False)(text_batch(response_text=["1", "sleep"]))
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < left <= 30.0, left
        assert signal.getsignal(signal.SIGALRM) is not None and fired == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_timeout_must_be_a_positive_number(bad: object) -> None:
    with pytest.raises(ValueError, match="HangOn: timeout must be a positive"):
        HangOn(timeout=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["main-thread", "other-thread"])
def test_format_catastrophic_regex_is_cut_off(where: str) -> None:
    """``(a+)+$`` backtracks exponentially on a's followed by a b (13.6 s at 27 characters before
    this fix, doubling with each a): the timeout cuts it off and the sample fails; the others
    match as usual."""
    texts = ["a" * 30 + "b", "aaa", "b"]
    reward = FormatReward(r"(a+)+$", timeout=0.5, warn=False)

    def call() -> TensorDict:
        return reward(text_batch(response_text=texts))

    out = call() if where == "main-thread" else in_thread(call)
    assert out["reward_valid"].tolist() == [False, True, True]
    assert out["rewards"].tolist() == [0.0, 1.0, 0.0]
    assert isinstance(reward.last_failures[0].error, RewardTimeout)


def test_math_answer_in_a_non_main_thread() -> None:
    """math-verify's own timeout uses signal.alarm, which only works in the main thread; every
    sample failed in a worker thread before. Here the equivalent forms score correct, the wrong
    ones incorrect, all valid."""
    pairs = EQUIVALENT + WRONG
    td = text_batch(response_text=[r for r, _ in pairs], answer=[a for _, a in pairs])
    reward = MathAnswerReward(warn=False)
    out = in_thread(lambda: reward(td))
    assert reward.last_failures == []
    assert out["reward_valid"].all()
    assert out["rewards"].tolist() == [1.0] * len(EQUIVALENT) + [0.0] * len(WRONG)


@pytest.mark.parametrize("where", ["main-thread", "other-thread"])
def test_math_verify_parse_timeout_is_a_failed_reward_and_is_not_printed(
    where: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``9^{9^{9^{9}}}`` keeps sympy busy for good. Before, math-verify's own 5 s timeout returned
    [] (reward 0, counted *valid*, 0 failures) and logged the whole input. Now the sample fails
    with RewardTimeout; nothing written to stdout, stderr, the log or the warning holds the input
    (4 000+ characters) whole."""
    long_prefix = "Let me think. " * 300
    response = long_prefix + r"so the answer is $9^{9^{9^{9}}}$"
    td = text_batch(response_text=[response, "46"], answer=["46", "46"])
    reward = MathAnswerReward(timeout=1.0)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = reward(td) if where == "main-thread" else in_thread(lambda: reward(td))
    assert out["reward_valid"].tolist() == [False, True]
    assert out["rewards"].tolist() == [0.0, 1.0]
    assert reward.failures_total == 1 and isinstance(reward.last_failures[0].error, RewardTimeout)
    printed = capfd.readouterr()
    texts = [printed.out, printed.err, caplog.text, *[str(w.message) for w in caught]]
    assert any("1 of 2 samples failed" in str(w.message) for w in caught)
    for text in texts:
        assert long_prefix not in text
        assert len(text) < 2000, text[:300]


def test_long_inputs_are_bounded() -> None:
    """A 1 MB response is parsed from its last max_response_chars characters (before: 5.2 s and
    733 MB in math-verify, and the whole string logged); a 1 MB reference fails its sample with a
    message that shows 120 characters and the length. Memory is measured with tracemalloc."""
    big_response = "x" * 1_000_000 + r" so the answer is \boxed{46}"
    big_answer = "1" * 1_000_000
    td = text_batch(response_text=[big_response, "1" * 1_000_000, "46"], answer=["46", "46", big_answer])
    reward = MathAnswerReward()
    tracemalloc.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = reward(td)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert out["reward_valid"].tolist() == [True, True, False]
    assert out["rewards"].tolist() == [1.0, 0.0, 0.0]
    message = str(reward.last_failures[0].error)
    assert "1000000 characters, more than max_answer_chars=1024" in message and len(message) < 400
    assert len(repr(reward.last_failures[0])) < 600
    assert all(len(str(w.message)) < 1000 for w in caught)


def test_math_answer_bounds_must_be_positive_integers() -> None:
    for name in ("max_response_chars", "max_answer_chars"):
        for bad in (0, -5, 2.5, "10", True):
            with pytest.raises(ValueError, match=f"MathAnswerReward: {name} must be an integer >= 1"):
                MathAnswerReward(**{name: bad})


LENIENT = {
    "str": "0.75",
    "true": True,
    "false": False,
    "np-bool": np.bool_(True),
    "tensor": torch.tensor(0.5),
    "tensor-1": torch.tensor([0.5]),
    "ndarray": np.array(0.5),
    "list": [0.5],
    "none": None,
    "complex": 0.5 + 0j,
}


@pytest.mark.parametrize("name", sorted(LENIENT))
def test_lenient_reward_values_are_refused(name: str) -> None:
    """A score of "0.75", True, a tensor, ... is not converted: that sample fails with a TypeError
    that names the type; ints and numpy floats are real numbers and pass."""
    script: dict[str, Any] = {"bad": LENIENT[name], "int": 2, "np": np.float32(0.5), "f": 1.25}
    texts = ["int", "bad", "np", "f"]
    td = text_batch(response_text=texts)
    td.set("scale", torch.ones(4))
    reward = ScriptedReward(script, warn=False)
    out = reward(td)
    assert out["reward_valid"].tolist() == [True, False, True, True]
    assert out["rewards"].tolist() == [2.0, 0.0, 0.5, 1.25]
    (failure,) = reward.last_failures
    assert isinstance(failure.error, TypeError)
    assert "score() must return a real number (int or float), got " in str(failure.error)
    assert type(LENIENT[name]).__name__ in str(failure.error)


@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.integers(-(2**20), 2**20),
            st.booleans(),
            st.text(max_size=5),
            st.none(),
            st.builds(torch.tensor, st.floats(-10, 10)),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_only_finite_real_numbers_are_valid_rewards(values: list[Any]) -> None:
    """Any mix of return values: valid exactly where score returned a finite int or float (not a
    bool), and those rewards are the values themselves."""
    texts = [f"s{i}" for i in range(len(values))]
    td = text_batch(response_text=texts)
    td.set("scale", torch.ones(len(values)))

    class Raw(ScriptedReward):
        def score(self, sample: dict[str, Any]) -> float:
            return self.script[sample["response_text"]]

    reward = Raw(dict(zip(texts, values, strict=True)), warn=False)
    out = reward(td)

    def ok(v: Any) -> bool:
        return type(v) in (int, float) and math.isfinite(v)

    assert out["reward_valid"].tolist() == [ok(v) for v in values]
    assert out["rewards"].tolist() == [float(v) if ok(v) else 0.0 for v in values]


@pytest.mark.parametrize("batch_size", [[], [2, 3]], ids=["scalar", "2d"])
def test_reward_on_a_tensordict_without_one_batch_dim(batch_size: list[int]) -> None:
    td = TensorDict({}, batch_size=batch_size)
    td.set("response_text", "46" if not batch_size else NonTensorStack(*[NonTensorStack("1", "2", "3")] * 2))
    for reward in (FormatReward(r"\d"), OverlongPenalty(4, 2), WeightedSum({"f": FormatReward(r"\d")})):
        with pytest.raises(ValueError, match=r"must have batch size \[N\] \(one row per response\), got \["):
            reward(td)


def test_weighted_sum_counts_a_failing_sample_once() -> None:
    """Two terms fail on the same two samples: 2 failures (not 4), each naming its first failing
    term; the warning says 2 of 3."""
    td = text_batch(response_text=["1", "x", "y"], answer=["1", "not a number", "nor this"])
    reward = WeightedSum({"math": MathAnswerReward(warn=False), "again": (MathAnswerReward(warn=False), 0.5)})
    with pytest.warns(RuntimeWarning, match="WeightedSum: 2 of 3 samples failed"):
        out = reward(td)
    assert out["reward_valid"].tolist() == [True, False, False]
    assert [f.index for f in reward.last_failures] == [1, 2]
    assert [f.term for f in reward.last_failures] == ["math", "math"]
    assert "term='math'" in repr(reward.last_failures[0])
    assert reward.failures_total == 2
    with pytest.warns(RuntimeWarning):
        reward(td)
    assert reward.failures_total == 4


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf"), "0.5", True, None])
def test_weighted_sum_refuses_non_finite_or_non_numeric_weights(weight: object) -> None:
    with pytest.raises(
        ValueError, match="WeightedSum: the weight of term 'fmt' must be a finite real number"
    ):
        WeightedSum({"ok": (FormatReward("a"), 1.0), "fmt": (FormatReward("b"), weight)})  # type: ignore[dict-item]


def test_reasoning_gym_in_a_non_main_thread_matches_the_main_thread(
    rg_reward: ReasoningGymReward, rg_entries: list[dict[str, Any]]
) -> None:
    """Real reasoning-gym scoring through the forked timeout worker (non-main thread) gives the
    main thread's rewards bit for bit; ``timeout`` and ``warn`` reach the base class."""
    answers = [str(e["answer"]) for e in rg_entries]
    texts = [f"<answer>{a}</answer>" for a in answers] + [f"<answer>{a}1</answer>" for a in answers]
    td = rg_batch(texts, list(range(RG_SIZE)) * 2)
    here = rg_reward(td.clone())
    there = in_thread(lambda: rg_reward(td.clone()))
    assert torch.equal(here["rewards"], there["rewards"])
    assert torch.equal(here["reward_valid"], there["reward_valid"])
    assert here["rewards"][:RG_SIZE].tolist() == [1.0] * RG_SIZE
    quiet = ReasoningGymReward("basic_arithmetic", size=RG_SIZE, seed=RG_SEED, timeout=2.5, warn=False)
    assert quiet.timeout == 2.5 and quiet.warn is False
