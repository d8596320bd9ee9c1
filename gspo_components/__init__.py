"""gspo_components: small, swappable parts for RL on language models.

Roles (each a TensorDict module backed by a pure function on plain tensors):

- AdvantageEstimator: :class:`GroupNormalizedAdvantage`, :class:`GroupMeanAdvantage`,
  :class:`LeaveOneOutAdvantage`, :class:`BatchWhitenedAdvantage`, :class:`PerTokenAdvantage`
- ImportanceWeighter: :class:`TokenLogRatio`, :class:`SequenceLogRatio` (GSPO's geometric mean),
  :class:`SequenceTokenLogRatio` (GSPO-token); rollout correction: :class:`RolloutCorrection`
- Clipper: :class:`PPOClip` (asymmetric ε, dual clip), :class:`CISPOClip`, :class:`SAPOGate`,
  :class:`NoClip`
- Objective: :class:`Objective` with four aggregations, KL and entropy terms, exact normalisers

Value checks (host synchronisations) can be switched off: :func:`set_validation`,
:func:`validation`.

Recipes compose one part per role: :func:`grpo`, :func:`gspo`, :func:`gspo_token`,
:func:`dr_grpo`, :func:`dapo`, :func:`cispo`.
"""

from .loss._validation import is_validating, set_validation, validation
from .loss.advantages import (
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
from .loss.aggregation import AGGREGATIONS, LossNormalizers, aggregate, local_normalizers, step_normalizers
from .loss.clipping import (
    CISPOClip,
    NoClip,
    PPOClip,
    SAPOGate,
    cispo_loss,
    ppo_clip_loss,
    sapo_loss,
    unclipped_loss,
)
from .loss.importance import (
    SequenceLogRatio,
    SequenceTokenLogRatio,
    TokenLogRatio,
    sequence_log_ratio,
    sequence_mean_log_ratio,
    sequence_token_log_ratio,
    token_log_ratio,
)
from .loss.kl import kl_penalty
from .loss.objective import Objective, loss_metrics, objective_loss
from .loss.recipes import PolicyLoss, Recipe, cispo, dapo, dr_grpo, grpo, gspo, gspo_token
from .loss.rollout_correction import RolloutCorrection, rollout_correction_weights

__version__ = "0.1.0"

__all__ = [
    "AGGREGATIONS",
    "BatchWhitenedAdvantage",
    "CISPOClip",
    "GroupMeanAdvantage",
    "GroupNormalizedAdvantage",
    "LeaveOneOutAdvantage",
    "LossNormalizers",
    "NoClip",
    "Objective",
    "PPOClip",
    "PerTokenAdvantage",
    "PolicyLoss",
    "Recipe",
    "RolloutCorrection",
    "SAPOGate",
    "SequenceLogRatio",
    "SequenceTokenLogRatio",
    "TokenLogRatio",
    "aggregate",
    "batch_whitened_advantages",
    "cispo",
    "cispo_loss",
    "dapo",
    "dr_grpo",
    "group_mean_advantages",
    "group_normalized_advantages",
    "grpo",
    "gspo",
    "gspo_token",
    "is_validating",
    "kl_penalty",
    "leave_one_out_advantages",
    "local_normalizers",
    "loss_metrics",
    "objective_loss",
    "ppo_clip_loss",
    "rollout_correction_weights",
    "sapo_loss",
    "sequence_log_ratio",
    "sequence_mean_log_ratio",
    "sequence_token_log_ratio",
    "set_validation",
    "step_normalizers",
    "token_log_ratio",
    "unclipped_loss",
    "validation",
]
