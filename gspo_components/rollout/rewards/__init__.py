"""RewardFns: rollout → ``rewards`` [N] and ``reward_valid`` [N].

- :class:`RewardFn`: the base (per-sample scoring with failure capture and a per-sample timeout).
- :class:`MathAnswerReward`: math-verify equivalence with a reference answer.
- :class:`ReasoningGymReward`: prompts and ``score_answer`` of any reasoning-gym dataset.
- :class:`FormatReward`: a regular expression.
- :class:`OverlongPenalty`: DAPO's soft overlong punishment.
- :class:`WeightedSum`: a weighted sum, each term under ``("reward_terms", name)``.
"""

from .base import RewardFailure, RewardFn, RewardTimeout, as_list
from .format import FormatReward
from .math_answer import MathAnswerReward
from .overlong import OverlongPenalty, overlong_penalty
from .reasoning_gym import ReasoningGymReward, extract_tagged_answer
from .weighted_sum import WeightedSum

__all__ = [
    "FormatReward",
    "MathAnswerReward",
    "OverlongPenalty",
    "ReasoningGymReward",
    "RewardFailure",
    "RewardFn",
    "RewardTimeout",
    "WeightedSum",
    "as_list",
    "extract_tagged_answer",
    "overlong_penalty",
]
