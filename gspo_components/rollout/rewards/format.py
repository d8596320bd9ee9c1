"""FormatReward: a regular expression on the response text.

r = ``reward`` if the pattern matches (``re.search``, or ``re.fullmatch`` with ``full_match``),
else ``penalty``. E.g. ``FormatReward(r"<think>.*</think>\\s*<answer>.*</answer>", flags=re.S)``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ...loss._checks import check_range
from .base import RewardFn

__all__ = ["FormatReward"]


class FormatReward(RewardFn):
    fields = ("response_text",)

    def __init__(
        self,
        pattern: str,
        *,
        full_match: bool = False,
        flags: int = 0,
        reward: float = 1.0,
        penalty: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        try:
            self.pattern = re.compile(pattern, flags)
        except (re.error, TypeError) as error:
            raise ValueError(f"FormatReward: pattern {pattern!r} is not a valid regex: {error}") from None
        self.full_match = full_match
        self.reward = check_range("FormatReward", "reward", reward, -math.inf, None)
        self.penalty = check_range("FormatReward", "penalty", penalty, -math.inf, None)

    def score(self, sample: dict[str, Any]) -> float:
        text = str(sample["response_text"])
        hit = self.pattern.fullmatch(text) if self.full_match else self.pattern.search(text)
        return self.reward if hit else self.penalty
