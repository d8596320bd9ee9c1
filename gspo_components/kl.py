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
float64 inputs). Padding positions are 0.
"""

from __future__ import annotations

import torch

from ._checks import check_choice, check_mask, check_token_tensor, compute_dtype

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
    log_probs = check_token_tensor(where, "log_probs", log_probs, "response_mask", mask)
    ref_log_probs = check_token_tensor(where, "ref_log_probs", ref_log_probs, "response_mask", mask)
    dtype = compute_dtype(log_probs, ref_log_probs)
    zero = torch.zeros((), dtype=dtype, device=log_probs.device)
    lp = torch.where(mask, log_probs.to(dtype), zero)
    ref = torch.where(mask, ref_log_probs.detach().to(dtype), zero)
    x = (ref - lp).clamp(-_MAX_LOG_RHO, _MAX_LOG_RHO)
    if estimator == "k1":
        kl = -x
    elif estimator == "k2":
        kl = 0.5 * x * x
    else:
        kl = torch.expm1(x) - x
    return torch.where(mask, kl, zero)
