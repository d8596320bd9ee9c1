"""MathAnswerReward: 1.0 when the response's final answer equals the reference, by math-verify.

math-verify (Hugging Face, ``math-verify`` on PyPI) parses LaTeX and plain expressions into sympy
and compares them symbolically, so ``\\boxed{1/2}`` matches ``0.5`` and ``12+34=46`` matches
``46``. Reads ``response_text`` and ``answer`` (the reference, a string per sample).
"""

from __future__ import annotations

from typing import Any

from .base import RewardFn

__all__ = ["MathAnswerReward"]


class MathAnswerReward(RewardFn):
    """r = correct if verify(parse(answer), parse(response)) else incorrect.

    Args:
        correct, incorrect: the two reward values (default 1.0 / 0.0).
        out_key, in_keys: key overrides (``in_keys={"answer": "gold"}``).
    """

    fields = ("response_text", "answer")

    def __init__(self, *, correct: float = 1.0, incorrect: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from math_verify import parse, verify  # optional dependency: the "rewards" extra

        self._parse, self._verify = parse, verify
        self.correct, self.incorrect = float(correct), float(incorrect)

    def score(self, sample: dict[str, Any]) -> float:
        gold = self._parse(str(sample["answer"]))
        if not gold:
            raise ValueError(f"the reference answer {sample['answer']!r} could not be parsed")
        predicted = self._parse(str(sample["response_text"]))
        return self.correct if predicted and self._verify(gold, predicted) else self.incorrect
