"""Rollout correction: importance weights of π_old against the inference engine (π_rollout).

The engine that sampled (vLLM, SGLang) is not numerically the trainer's π_old: different
kernels, precisions, MoE routing. Truncated importance sampling (TIS; Yao et al., "Your
efficient RL framework secretly brings you off-policy RL training", 2025) multiplies each token's
loss by sg[min(ρ, C)], ρ = π_old / π_rollout; masked importance sampling (MIS) instead zeroes the
weight outside a band [lower, upper] and keeps ρ inside it. These weights are *detached* factors
written to ``is_weights`` and consumed by the Objective; they are a second weighter, beside the
ImportanceWeighter of π_θ against π_old.

Levels (log ρ from u_{i,t} = ℓ^old_{i,t} − ℓ^rollout_{i,t}):

======================  ==========================================  ===============================
level                   log ρ                                       note
======================  ==========================================  ===============================
``token``               u_{i,t}                                      per token
``sequence-product``    Σ_t u_{i,t}  (product of token ratios)       the true sequence likelihood
                                                                     ratio; broadcast over the row
``sequence-geometric``  (1/L_i) Σ_t u_{i,t}  (geometric mean)        GSPO-style length-normalised
======================  ==========================================  ===============================

The product and the geometric mean are different quantities with different names: only the
geometric mean is GSPO's s_i, and only the product is an unbiased sequence-level correction.
log ρ is clamped to ±20 before ``exp``; all arithmetic is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from ._checks import DeferredChecks, check_choice, check_mask, check_range, check_token_tensor, compute_dtype
from ._module import KeyedModule, KeyOverrides
from .numerics import Padding

__all__ = ["ROLLOUT_LEVELS", "ROLLOUT_MODES", "RolloutCorrection", "rollout_correction_weights"]

ROLLOUT_LEVELS = ("token", "sequence-product", "sequence-geometric")
ROLLOUT_MODES = ("truncate", "mask")
_MAX_LOG_RHO = 20.0


def _check_params(where: str, level: str, mode: str, upper: float, lower: float | None) -> float:
    check_choice(where, "level", level, ROLLOUT_LEVELS)
    check_choice(where, "mode", mode, ROLLOUT_MODES)
    check_range(where, "upper", upper, 0.0, None, low_inclusive=False)
    if lower is None:
        return 0.0
    if mode != "mask":
        raise ValueError(f"{where}: lower applies to mode='mask' only, got mode={mode!r} with lower={lower}")
    return check_range(where, "lower", lower, 0.0, upper, high_inclusive=False)


@torch.no_grad()
def rollout_correction_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    upper: float = 2.0,
    lower: float | None = None,
) -> torch.Tensor:
    """Detached weights [N, T]: TIS ``min(ρ, upper)`` or MIS ``ρ · 1[lower ≤ ρ ≤ upper]``.

    Padding positions get weight 0.
    """
    where = "rollout_correction_weights"
    low = _check_params(where, level, mode, upper, lower)
    mask = check_mask(where, "response_mask", response_mask)
    checks = DeferredChecks(where)
    pad = Padding(mask)
    weights = _weights(where, old_log_probs, rollout_log_probs, pad, level, mode, upper, low, checks)
    checks.run()
    if weights.dim() == 1:
        weights = weights.unsqueeze(-1)
    return pad.zero(weights)


@torch.no_grad()
def _weights(
    where: str,
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    pad: Padding,
    level: str,
    mode: str,
    upper: float,
    low: float,
    checks: DeferredChecks,
) -> torch.Tensor:
    """The weights on a bool mask: [N, T] with 0 at padding for ``token``, one per row ([N]) for
    the sequence levels (constant over the row's valid tokens)."""
    old = check_token_tensor(where, "old_log_probs", old_log_probs, "response_mask", pad.mask)
    rollout = check_token_tensor(where, "rollout_log_probs", rollout_log_probs, "response_mask", pad.mask)
    dtype = compute_dtype(old, rollout)
    u = pad.zero(old.to(dtype) - rollout.to(dtype))
    total = u.sum(-1) if (checks.active or level != "token") else u
    checks.finite("'old_log_probs' and 'rollout_log_probs' at valid positions (per-row sums)", total)
    if level == "token":
        log_rho = u
    elif level == "sequence-geometric":
        log_rho = total / pad.lengths.clamp(min=1).to(dtype)
    else:
        log_rho = total
    rho = torch.exp(log_rho.clamp(-_MAX_LOG_RHO, _MAX_LOG_RHO))
    if mode == "truncate":
        weights = rho.clamp(max=upper)
    else:
        weights = rho * ((rho >= low) & (rho <= upper)).view(torch.uint8).to(dtype)  # rho is finite: exact
    if level == "token":
        weights = pad.zero(weights)
    return weights


class RolloutCorrection(KeyedModule):
    """Rollout-correction weighter: reads ``old_log_probs``, ``rollout_log_probs``,
    ``response_mask``; writes detached ``is_weights`` (see :func:`rollout_correction_weights`).

    ``RolloutCorrection()`` is token-level TIS with C = 2;
    ``RolloutCorrection(level="sequence-product", mode="mask", upper=2.0, lower=0.5)`` is
    sequence-level MIS.
    """

    def __init__(
        self,
        level: str = "token",
        mode: str = "truncate",
        *,
        upper: float = 2.0,
        lower: float | None = None,
        in_keys: KeyOverrides = None,
        out_keys: KeyOverrides = None,
    ) -> None:
        super().__init__()
        _check_params(type(self).__name__, level, mode, upper, lower)
        self.level, self.mode, self.upper, self.lower = level, mode, float(upper), lower
        self._setup_keys(
            ("old_log_probs", "rollout_log_probs", "response_mask"), ("is_weights",), in_keys, out_keys
        )

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        weights = rollout_correction_weights(
            self._read(td, "old_log_probs"),
            self._read(td, "rollout_log_probs"),
            self._read(td, "response_mask"),
            level=self.level,
            mode=self.mode,
            upper=self.upper,
            lower=self.lower,
        )
        td.set(self._out_map["is_weights"], weights)
        return td

    def _chain(self, td: TensorDictBase, pad: Padding, checks: DeferredChecks) -> torch.Tensor:
        """PolicyLoss's single pass: [N, T] weights (0 at padding), or one per row ([N])."""
        return _weights(
            "rollout_correction_weights",
            self._read(td, "old_log_probs"),
            self._read(td, "rollout_log_probs"),
            pad,
            self.level,
            self.mode,
            self.upper,
            0.0 if self.lower is None else float(self.lower),
            checks,
        )

    def extra_repr(self) -> str:
        return f"level={self.level!r}, mode={self.mode!r}, upper={self.upper}, lower={self.lower}"
