"""ReasoningGymReward: prompts and scores from any reasoning-gym dataset.

reasoning-gym (``reasoning-gym`` on PyPI) generates procedural reasoning tasks; each dataset
scores an answer with its own ``score_answer(answer, entry)``. This reward wraps one dataset:
:meth:`ReasoningGymReward.prompts` gives the questions to sample from, and scoring reads
``response_text`` and ``data_index`` [N] (which dataset entry each sample answers), extracts the
answer (by default the last ``<answer>…</answer>`` span, else the whole stripped response) and
returns the dataset's score.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

from .base import RewardFn

__all__ = ["ReasoningGymReward", "extract_tagged_answer"]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_tagged_answer(text: str) -> str:
    """The last ``<answer>…</answer>`` span, else the stripped text."""
    if not isinstance(text, str):
        raise ValueError(f"extract_tagged_answer: 'text' must be a str, got {type(text).__name__}")
    found = _ANSWER.findall(text)
    return (found[-1] if found else text).strip()


class ReasoningGymReward(RewardFn):
    """Args:
    dataset: a reasoning-gym dataset name (``"basic_arithmetic"``) or a dataset object.
    size, seed, **config: passed to ``reasoning_gym.create_dataset`` for a name.
    extract: response text → answer string.
    warn, timeout: see :class:`~gspo_components.rollout.rewards.RewardFn`.
    """

    fields = ("response_text", "data_index")

    def __init__(
        self,
        dataset: str | Any,
        *,
        size: int = 500,
        seed: int = 0,
        extract: Callable[[str], str | None] = extract_tagged_answer,
        out_key: str | tuple[str, ...] = "rewards",
        in_keys: Any = None,
        warn: bool = True,
        timeout: float | None = 10.0,
        **config: Any,
    ) -> None:
        super().__init__(out_key=out_key, in_keys=in_keys, warn=warn, timeout=timeout)
        if isinstance(dataset, str):
            import reasoning_gym  # optional dependency: the "rewards" extra

            dataset = reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config)
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "score_answer")):
            raise ValueError(
                "ReasoningGymReward: 'dataset' must be a reasoning-gym dataset name or a dataset object "
                f"(with __getitem__ and score_answer), got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self.extract = extract

    def __len__(self) -> int:
        return len(self.dataset)

    def entry(self, index: int) -> dict[str, Any]:
        # an integer (or an integral float, as a float column arrives); 1.5 would silently be entry 1
        if isinstance(index, bool) or not isinstance(index, numbers.Real) or not float(index).is_integer():
            raise ValueError(
                f"ReasoningGymReward: 'data_index' must hold integer dataset indices, got {index!r}"
            )
        return self.dataset[int(index)]

    def prompts(self, indices: Sequence[int]) -> list[str]:
        """The questions of the given dataset entries, in order."""
        return [self.entry(i)["question"] for i in indices]

    def answers(self, indices: Sequence[int]) -> list[str]:
        return [str(self.entry(i)["answer"]) for i in indices]

    def score(self, sample: dict[str, Any]) -> float:
        entry = self.entry(sample["data_index"])
        return float(self.dataset.score_answer(self.extract(str(sample["response_text"])), entry))
