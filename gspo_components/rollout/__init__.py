"""The rollout side: sampling, rewards, scoring and the reference loop.

- :mod:`.sampling`: :class:`~.sampling.VLLMSampler` and :class:`~.sampling.TransformersSampler`
  (the Sampler role);
- :mod:`.rewards`: verifiable rewards (the RewardFn role);
- :mod:`.scoring`: :class:`~.scoring.Scorer`, the trainer-side log-probs π_θ, π_old, π_ref;
- :mod:`.loop`: :func:`~.loop.train` and :class:`~.loop.RLConfig`, the reference loop;
- :mod:`.checkpoint`, :mod:`.metrics_log`: what the loop saves and logs.

These modules may import the loss side (:mod:`gspo_components.loss`); the loss side never imports
them.
"""

from .loop import PromptBatch, RLConfig, Sampler, train
from .scoring import Scorer, response_log_probs

__all__ = ["PromptBatch", "RLConfig", "Sampler", "Scorer", "response_log_probs", "train"]
