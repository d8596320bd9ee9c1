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

Modes (each at any level; ρ the level's ratio):

================  ============================================================  ===================
mode              weight                                                        defaults
================  ============================================================  ===================
``truncate``      TIS: min(ρ, C), C = ``upper``                                 C = 2
``mask``          MIS: ρ · 1[lower ≤ ρ ≤ upper]                                 [0, 2]
``icepop``        IcePop: ρ · 1[α ≤ ρ ≤ β], α = ``lower``, β = ``upper``        [0.5, 5]
``seq-mask-tis``  min(ρ, C) · 1[g_lo ≤ ḡ_i ≤ g_hi]                               C = 2,
                  ḡ_i = exp((1/L_i) Σ_t u_{i,t}) (geometric mean, always        [0.999, 1.001]
                  per sequence), g_lo/g_hi = ``geo_lower``/``geo_upper``
================  ============================================================  ===================

``icepop`` is IcePop (Ling Team, "Every Step Evolves: Scaling Reinforcement Learning for
Trillion-Scale Thinking Model", arXiv 2510.18855): the token's gradient is kept with its ratio ρ
when ρ lies in [α, β] and discarded (weight 0) otherwise, α = 0.5, β = 5; it is ``mask`` with the
paper's band and is verl's ``rollout_is="token"`` with ``rollout_is_threshold="0.5_5.0"``
(preset ``decoupled_token_icepop``). ``seq-mask-tis`` rejects whole sequences whose geometric
mean ratio leaves a band around 1 and keeps the truncated TIS weights of the others: verl's
presets ``decoupled_geo_rs_token_tis`` (level ``token``) and ``decoupled_geo_rs_seq_tis`` (level
``sequence-product``), i.e. ``rollout_rs="seq_mean_k1"`` with ``rollout_is`` TIS
(verl/trainer/ppo/rollout_corr_helper.py). Two differences from verl, both deliberate:

- a rejected sequence gets weight 0 here, like every mode of this module; verl's rejection
  instead clears its ``response_mask`` (it then also leaves the loss's denominators);
- verl's band is on the geometric mean of π_rollout/π_old (its k1 statistic); ``geo_lower`` /
  ``geo_upper`` bound the geometric mean of ρ = π_old/π_rollout, the ratio of this module (verl's
  ``"lo_hi"`` is ``geo_lower = 1/hi``, ``geo_upper = 1/lo``). The mean log-ratio is compared
  with log g_lo and log g_hi without a clamp (verl clamps each token's log-ratio to ±20 first:
  the two differ only when a token's |u| > 20).
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase

from ._checks import DeferredChecks, check_choice, check_mask, check_range, check_token_tensor, compute_dtype
from ._module import KeyedModule, KeyOverrides
from .numerics import Padding

__all__ = ["ROLLOUT_LEVELS", "ROLLOUT_MODES", "RolloutCorrection", "rollout_correction_weights"]

ROLLOUT_LEVELS = ("token", "sequence-product", "sequence-geometric")
ROLLOUT_MODES = ("truncate", "mask", "icepop", "seq-mask-tis")
_MAX_LOG_RHO = 20.0
_ICEPOP_BAND = (0.5, 5.0)  # arXiv 2510.18855: α = 0.5, β = 5
_GEO_BAND = (0.999, 1.001)  # verl's decoupled_geo_rs_* presets ("0.999_1.001")


def _check_params(
    where: str,
    level: str,
    mode: str,
    upper: float | None,
    lower: float | None,
    geo_lower: float | None = None,
    geo_upper: float | None = None,
) -> tuple[float, float, float, float]:
    """(upper, lower, geo_lower, geo_upper) with the mode's defaults filled in, checked."""
    check_choice(where, "level", level, ROLLOUT_LEVELS)
    check_choice(where, "mode", mode, ROLLOUT_MODES)
    if upper is None:
        upper = _ICEPOP_BAND[1] if mode == "icepop" else 2.0
    upper = check_range(where, "upper", upper, 0.0, None, low_inclusive=False)
    if lower is not None and mode not in ("mask", "icepop"):
        raise ValueError(
            f"{where}: lower applies to mode='mask' only (and 'icepop'), got mode={mode!r} with lower={lower}"
        )
    if lower is None:
        low = _ICEPOP_BAND[0] if mode == "icepop" else 0.0
        if low >= upper:
            raise ValueError(
                f"{where}: upper must be > the default lower {low} of mode={mode!r}, got {upper}"
            )
    else:
        low = check_range(where, "lower", lower, 0.0, upper, high_inclusive=False)
    if mode != "seq-mask-tis":
        for name, value in (("geo_lower", geo_lower), ("geo_upper", geo_upper)):
            if value is not None:
                raise ValueError(
                    f"{where}: {name} applies to mode='seq-mask-tis' only, got mode={mode!r} with {name}={value}"
                )
        return upper, low, 0.0, math.inf
    g_hi = check_range(where, "geo_upper", _GEO_BAND[1] if geo_upper is None else geo_upper, 0.0, None,
                       low_inclusive=False)  # fmt: skip
    g_lo = _GEO_BAND[0] if geo_lower is None else geo_lower
    g_lo = check_range(where, "geo_lower", g_lo, 0.0, g_hi, low_inclusive=False, high_inclusive=True)
    return upper, low, g_lo, g_hi


@torch.no_grad()
def rollout_correction_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    upper: float | None = None,
    lower: float | None = None,
    geo_lower: float | None = None,
    geo_upper: float | None = None,
) -> torch.Tensor:
    """Detached weights [N, T]: TIS ``min(ρ, upper)``, MIS / IcePop ``ρ · 1[lower ≤ ρ ≤ upper]``,
    or ``seq-mask-tis`` ``min(ρ, upper) · 1[geo_lower ≤ ḡ_i ≤ geo_upper]`` (module doc).

    ``upper`` defaults to 2 (5 for ``icepop``), ``lower`` to 0 (0.5 for ``icepop``), the
    geometric-mean band to [0.999, 1.001]. Padding positions get weight 0.
    """
    where = "rollout_correction_weights"
    upper, low, g_lo, g_hi = _check_params(where, level, mode, upper, lower, geo_lower, geo_upper)
    mask = check_mask(where, "response_mask", response_mask)
    checks = DeferredChecks(where)
    pad = Padding(mask)
    weights = _weights(
        where, old_log_probs, rollout_log_probs, pad, level, mode, upper, low, checks, g_lo, g_hi
    )
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
    geo_lower: float = 0.0,
    geo_upper: float = math.inf,
) -> torch.Tensor:
    """The weights on a bool mask: [N, T] with 0 at padding for ``token``, one per row ([N]) for
    the sequence levels (constant over the row's valid tokens)."""
    old = check_token_tensor(where, "old_log_probs", old_log_probs, "response_mask", pad.mask)
    rollout = check_token_tensor(where, "rollout_log_probs", rollout_log_probs, "response_mask", pad.mask)
    dtype = compute_dtype(old, rollout)
    u = pad.zero(old.to(dtype) - rollout.to(dtype))
    total = u.sum(-1) if (checks.active or level != "token" or mode == "seq-mask-tis") else u
    checks.finite("'old_log_probs' and 'rollout_log_probs' at valid positions (per-row sums)", total)
    if level == "token":
        log_rho = u
    elif level == "sequence-geometric":
        log_rho = total / pad.lengths.clamp(min=1).to(dtype)
    else:
        log_rho = total
    rho = torch.exp(log_rho.clamp(-_MAX_LOG_RHO, _MAX_LOG_RHO))
    if mode in ("truncate", "seq-mask-tis"):
        weights = rho.clamp(max=upper)
    else:
        weights = rho * ((rho >= low) & (rho <= upper)).view(torch.uint8).to(dtype)  # rho is finite: exact
    if mode == "seq-mask-tis":
        # log ḡ_i = (1/L_i) Σ_t u_{i,t}, compared in log space (no exp, no clamp); an empty row has ḡ = 1.
        log_geo = total / pad.lengths.clamp(min=1).to(dtype)
        keep = (log_geo >= math.log(geo_lower)) & (log_geo <= math.log(geo_upper))
        keep = keep.view(torch.uint8).to(dtype)
        weights = weights * (keep.unsqueeze(-1) if weights.dim() == 2 else keep)
    if level == "token":
        weights = pad.zero(weights)
    return weights


class RolloutCorrection(KeyedModule):
    """Rollout-correction weighter: reads ``old_log_probs``, ``rollout_log_probs``,
    ``response_mask``; writes detached ``is_weights`` (see :func:`rollout_correction_weights`).

    ``RolloutCorrection()`` is token-level TIS with C = 2;
    ``RolloutCorrection(level="sequence-product", mode="mask", upper=2.0, lower=0.5)`` is
    sequence-level MIS; ``RolloutCorrection(mode="icepop")`` is IcePop's token mask with
    [α, β] = [0.5, 5] (arXiv 2510.18855); ``RolloutCorrection(mode="seq-mask-tis", upper=2.0,
    geo_lower=0.999, geo_upper=1.001)`` rejects sequences by their geometric-mean ratio and keeps
    the token TIS weights of the others (verl's ``decoupled_geo_rs_token_tis``).
    """

    def __init__(
        self,
        level: str = "token",
        mode: str = "truncate",
        *,
        upper: float | None = None,
        lower: float | None = None,
        geo_lower: float | None = None,
        geo_upper: float | None = None,
        in_keys: KeyOverrides = None,
        out_keys: KeyOverrides = None,
    ) -> None:
        super().__init__()
        upper, low, g_lo, g_hi = _check_params(
            type(self).__name__, level, mode, upper, lower, geo_lower, geo_upper
        )
        self.level, self.mode, self.upper = level, mode, upper
        self.lower = lower if lower is not None or mode != "icepop" else low
        self.geo_lower, self.geo_upper = (g_lo, g_hi) if mode == "seq-mask-tis" else (None, None)
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
            geo_lower=self.geo_lower,
            geo_upper=self.geo_upper,
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
            0.0 if self.geo_lower is None else self.geo_lower,
            math.inf if self.geo_upper is None else self.geo_upper,
        )

    def extra_repr(self) -> str:
        geo = (
            f", geo_lower={self.geo_lower}, geo_upper={self.geo_upper}" if self.mode == "seq-mask-tis" else ""
        )
        return f"level={self.level!r}, mode={self.mode!r}, upper={self.upper}, lower={self.lower}{geo}"
