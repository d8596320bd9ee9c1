"""Per-token estimators of KL(π_θ ‖ π_ref) from sampled tokens (Schulman, "Approximating KL
Divergence", 2020; GRPO, arXiv 2402.03300 eq. 4).

With x_{i,t} = log ρ_{i,t} = ℓ^ref_{i,t} − ℓ_{i,t}:

====  =======================  ==============================================================
name  value                    notes
====  =======================  ==============================================================
k1    −x = ℓ − ℓ^ref            unbiased, can be negative
k2    ½ x²                     biased, ≥ 0
k3    ρ − log ρ − 1 = e^x − x − 1  unbiased, ≥ 0 (GRPO's choice); computed as expm1(x) − x
====  =======================  ==============================================================

All three are exactly 0 when ℓ = ℓ^ref; so are the gradients of k2 and k3 (k1's gradient is
1 everywhere: it is unbiased only as a value, and as a loss it pushes every sampled token down). ``ref_log_probs`` is a constant
(detached); x is clamped to ±20 before ``exp``, and the arithmetic runs in float32 (float64 for
float64 inputs). Padding positions are 0. With validation on, a NaN or ±inf log-prob at a valid
position is a ``ValueError``.
"""

from __future__ import annotations

import torch

from ._checks import DeferredChecks, check_choice, check_mask, check_token_tensor, compute_dtype
from .numerics import Padding

__all__ = ["KL_ESTIMATORS", "kl_penalty"]

KL_ESTIMATORS = ("k1", "k2", "k3")
_MAX_LOG_RHO = 20.0


def kl_penalty(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "k3",
) -> torch.Tensor:
    """Per-token KL estimate [N, T] of π_θ against π_ref (see the module table)."""
    where = "kl_penalty"
    check_choice(where, "estimator", estimator, KL_ESTIMATORS)
    mask = check_mask(where, "response_mask", response_mask)
    checks = DeferredChecks(where)
    kl = _kl(where, log_probs, ref_log_probs, Padding(mask), estimator, checks)
    checks.run()
    return kl


def _kl(
    where: str,
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    pad: Padding,
    estimator: str,
    checks: DeferredChecks,
) -> torch.Tensor:
    """The estimator on a bool mask; x = where(m, sg[ℓ^ref] − ℓ, 0) is masked once, before the
    clamp (a subtraction's backward never multiplies by an input, so padding stays inert). With
    validation on, the valid ℓ^ref and ℓ must be finite."""
    log_probs = check_token_tensor(where, "log_probs", log_probs, "response_mask", pad.mask)
    ref_log_probs = check_token_tensor(where, "ref_log_probs", ref_log_probs, "response_mask", pad.mask)
    dtype = compute_dtype(log_probs, ref_log_probs)
    x = pad.zero(ref_log_probs.detach().to(dtype) - log_probs.to(dtype))
    if checks.active:
        checks.finite("'ref_log_probs' and 'log_probs' at valid positions (per-row sums)", x.detach().sum(-1))
    x = x.clamp(-_MAX_LOG_RHO, _MAX_LOG_RHO)  # autograd's clamp: KL is an opt-in term
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    return torch.expm1(x) - x
