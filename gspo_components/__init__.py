"""gspo_components: small, swappable parts for RL on language models.

Roles (each a TensorDict module backed by a pure function on plain tensors; the role bases are
public, so a new part subclasses one and implements one method, see docs/extending.md):

- :class:`AdvantageEstimator`: :class:`GroupNormalizedAdvantage`, :class:`GroupMeanAdvantage`,
  :class:`LeaveOneOutAdvantage`, :class:`BatchWhitenedAdvantage`, :class:`PerTokenAdvantage`
- :class:`ImportanceWeighter`: :class:`TokenLogRatio`, :class:`SequenceLogRatio` (GSPO's
  geometric mean), :class:`SequenceTokenLogRatio` (GSPO-token); rollout correction:
  :class:`RolloutCorrection`
- :class:`Clipper`: :class:`PPOClip` (asymmetric ε, dual clip), :class:`CISPOClip`,
  :class:`SAPOGate`, :class:`NoClip`, GMPO's ``GMPOClip``
- :class:`TokenFilter`: optional parts that take tokens or responses out of the loss
- :class:`Objective`: four aggregations, KL and entropy terms, exact normalisers

Numeric helpers for new parts: :mod:`gspo_components.loss.numerics`. Value checks (host
synchronisations) can be switched off: :func:`set_validation`, :func:`validation`.

Recipes compose one part per role (:func:`compose`); :data:`RECIPES` maps every stock recipe's
name to its factory, and each is importable from here by that name (``gspo_components.gmpo``).
"""

from .loss._validation import is_validating, set_validation, validation
from .loss.advantages import (
    AdvantageEstimator,
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
from .loss.algorithms.dppo import DPPOFilter
from .loss.algorithms.gmpo import GMPOClip
from .loss.algorithms.m2po import M2POFilter
from .loss.algorithms.opsm import OPSMFilter
from .loss.algorithms.top_entropy import TopEntropyFilter
from .loss.clipping import (
    CISPOClip,
    Clipper,
    NoClip,
    PPOClip,
    SAPOGate,
    cispo_loss,
    ppo_clip_loss,
    sapo_loss,
    unclipped_loss,
)
from .loss.filters import TokenFilter
from .loss.importance import (
    ImportanceWeighter,
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
from .loss.recipes import PolicyLoss, Recipe, compose
from .loss.registry import RECIPES
from .loss.rollout_correction import RolloutCorrection, rollout_correction_weights

__version__ = "0.1.0"

globals().update(RECIPES)  # every stock recipe by its name: gspo_components.grpo, .gmpo, ...

__all__ = [
    "AGGREGATIONS",
    "AdvantageEstimator",
    "Clipper",
    "DPPOFilter",
    "GMPOClip",
    "M2POFilter",
    "OPSMFilter",
    "TopEntropyFilter",
    "ImportanceWeighter",
    "RECIPES",
    "TokenFilter",
    "compose",
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
    "cispo_loss",
    "group_mean_advantages",
    "group_normalized_advantages",
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
    *RECIPES,
]
