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
"""

from __future__ import annotations

import math
import re
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import NonTensorStack, TensorDict

from gspo_components import GroupNormalizedAdvantage, group_normalized_advantages
from gspo_components.rewards import (
    FormatReward,
    MathAnswerReward,
    OverlongPenalty,
    ReasoningGymReward,
    RewardFailure,
    RewardFn,
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
