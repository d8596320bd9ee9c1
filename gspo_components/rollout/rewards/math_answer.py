"""MathAnswerReward: 1.0 when the response's final answer equals the reference, by math-verify.

math-verify (Hugging Face, ``math-verify`` on PyPI) parses LaTeX and plain expressions into sympy
and compares them symbolically, so ``\\boxed{1/2}`` matches ``0.5`` and ``12+34=46`` matches
``46``. Reads ``response_text`` and ``answer`` (the reference, a string per sample).

math-verify's own timeouts use ``signal.alarm``: they fail in any thread but the main one, and a
parse that times out returns ``[]``, which would score as a *valid* wrong answer. So its timeouts
are switched off here (``parsing_timeout=None``, ``timeout_seconds=None``) and the per-sample
timeout of :class:`~gspo_components.rollout.rewards.RewardFn` bounds parse and verify together: a sample
that runs over fails (``reward_valid = False``), in the main thread or any other.

Input length is bounded before math-verify sees it. Of a response longer than
``max_response_chars`` only the last ``max_response_chars`` characters are parsed (the final
answer comes last); a reference longer than ``max_answer_chars`` fails the sample. Nothing logs
an input whole: messages show at most 120 characters and the length.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ...loss._checks import check_range
from .base import RewardFn, preview

__all__ = ["MathAnswerReward"]


class _DropTimeoutDisabledNotice(logging.Filter):
    """math-verify logs "Timeout is disabled ... you must provide the logic for timeout
    interruption yourself" when its timeouts are off; RewardFn's timeout provides it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_NOTICE_FILTER = _DropTimeoutDisabledNotice()


class MathAnswerReward(RewardFn):
    """r = correct if verify(parse(answer), parse(response)) else incorrect.

    Args:
        correct, incorrect: the two reward values (default 1.0 / 0.0).
        max_response_chars: only the last this many characters of a response are parsed
            (default 4096).
        max_answer_chars: a longer reference answer fails the sample (default 1024).
        out_key, in_keys: key overrides (``in_keys={"answer": "gold"}``).
        timeout, warn: see :class:`~gspo_components.rollout.rewards.RewardFn` (the timeout bounds parse
            and verify together, per sample).
    """

    fields = ("response_text", "answer")

    def __init__(
        self,
        *,
        correct: float = 1.0,
        incorrect: float = 0.0,
        max_response_chars: int = 4096,
        max_answer_chars: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from math_verify import parse, verify  # optional dependency: the "rewards" extra

        for name in ("math_verify.parser", "math_verify.grader"):
            log = logging.getLogger(name)
            if _NOTICE_FILTER not in log.filters:
                log.addFilter(_NOTICE_FILTER)
        self._parse, self._verify = parse, verify
        self.correct = check_range("MathAnswerReward", "correct", correct, -math.inf, None)
        self.incorrect = check_range("MathAnswerReward", "incorrect", incorrect, -math.inf, None)
        for name, value in (
            ("max_response_chars", max_response_chars),
            ("max_answer_chars", max_answer_chars),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MathAnswerReward: {name} must be an integer >= 1, got {value!r}")
        self.max_response_chars = max_response_chars
        self.max_answer_chars = max_answer_chars

    def score(self, sample: dict[str, Any]) -> float:
        answer = str(sample["answer"])
        if len(answer) > self.max_answer_chars:
            raise ValueError(
                f"the reference answer has {len(answer)} characters, more than max_answer_chars="
                f"{self.max_answer_chars}: {preview(answer)}"
            )
        gold = self._parse(answer, parsing_timeout=None)
        if not gold:
            raise ValueError(f"the reference answer {preview(answer)} could not be parsed")
        response = str(sample["response_text"])[-self.max_response_chars :]
        predicted = self._parse(response, parsing_timeout=None)
        if not predicted:
            return self.incorrect
        return self.correct if self._verify(gold, predicted, timeout_seconds=None) else self.incorrect
