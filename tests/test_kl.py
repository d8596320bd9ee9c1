"""KL-penalty tests: property 13 of docs/algorithms.md, and the KL term of the Objective.

Proves:

- k3 = ρ − log ρ − 1 ≥ 0 for log-probs up to ±20 apart, from float64, float32, bf16 and fp16
  inputs (computed in float32 or wider; property 13);
- k1, k2, k3 are exactly 0 when ℓ = ℓ_ref, and so are the gradients of k2 and k3 (property 13);
  k1 = ℓ − ℓ_ref has gradient exactly 1 in ℓ, there as everywhere;
- the three estimators and their gradients equal an independent formula (a series near 0), the
  reference is a constant, and padding gives 0 whatever it holds;
- ``Objective(kl_coef=β)`` returns agg(token_loss) + β·agg(k) under each aggregation, against an
  independent per-row reference, with the gradient of that reference, and reports ``kl`` (the
  token mean of k over valid tokens); ``grpo(kl_coef=β)`` adds exactly that to ``grpo()``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import PolicyBatch, policy_batches
from tensordict import TensorDict

from gspo_components import AGGREGATIONS, Objective, grpo, kl_penalty

ESTIMATORS = ("k1", "k2", "k3")


def _k_reference(x: float, estimator: str) -> float:
    """The estimator at x = ℓ_ref − ℓ = log ρ, in float64; k3 by its Taylor series near 0 (where
    e^x − x − 1 cancels), by its definition ρ − log ρ − 1 elsewhere."""
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if abs(x) < 1e-3:
        return x * x / 2 + x**3 / 6 + x**4 / 24 + x**5 / 120
    rho = math.exp(x)
    return rho - math.log(rho) - 1.0


def _dk_dl_reference(x: float, estimator: str) -> float:
    """∂k/∂ℓ at x = ℓ_ref − ℓ (so ∂x/∂ℓ = −1)."""
    if estimator == "k1":
        return 1.0
    if estimator == "k2":
        return -x
    return 1.0 - math.exp(x)  # −(ρ − 1)


@st.composite
def kl_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_probs, ref_log_probs, mask) in float64, |ℓ_ref − ℓ| ≤ 20, garbage at padding."""
    n = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    width = max(lengths) + draw(st.integers(0, 3))
    scale = draw(st.sampled_from([0.0, 1e-9, 1e-6, 1e-3, 0.1, 1.0, 5.0, 20.0]))
    garbage = draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    lp = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 10
    diff = (torch.rand(n, width, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    ref = lp + diff
    fill = torch.full_like(lp, garbage)
    return torch.where(mask, lp, fill), torch.where(mask, ref, fill), mask


@settings(max_examples=100)
@given(pair=kl_pairs(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_k3_is_nonnegative(pair: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dtype: torch.dtype) -> None:
    lp, ref, mask = pair
    k = kl_penalty(lp.to(dtype), ref.to(dtype), mask, "k3")
    assert k.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # never half
    assert bool((k >= 0).all()), k.min()
    assert torch.equal(k[~mask], torch.zeros_like(k[~mask]))


@settings(max_examples=60)
@given(
    pair=kl_pairs(),
    estimator=st.sampled_from(ESTIMATORS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_values_and_gradients_match_formula(
    pair: tuple[torch.Tensor, torch.Tensor, torch.Tensor], estimator: str, dtype: torch.dtype
) -> None:
    lp, ref, mask = pair
    lp = lp.to(dtype).requires_grad_(True)
    ref = ref.to(dtype).requires_grad_(True)  # must be treated as a constant
    k = kl_penalty(lp, ref, mask, estimator)
    k.sum().backward()
    assert ref.grad is None or torch.equal(ref.grad, torch.zeros_like(ref.grad))
    n, width = mask.shape
    want = torch.zeros(n, width, dtype=torch.float64)
    want_grad = torch.zeros(n, width, dtype=torch.float64)
    size_x = torch.zeros(n, width, dtype=torch.float64)
    lp_list, ref_list = lp.detach().double().tolist(), ref.detach().double().tolist()
    for i in range(n):
        for t in range(width):
            if mask[i, t]:
                x = ref_list[i][t] - lp_list[i][t]  # in float64, from the inputs as given
                want[i, t] = _k_reference(x, estimator)
                want_grad[i, t] = _dk_dl_reference(x, estimator)
                size_x[i, t] = abs(x)
    # k3 = expm1(x) − x and its gradient 1 − e^x are formed from terms of size |x| and 1: their
    # rounding is a few ulps of those terms, which near x = 0 is large relative to k3 ≈ x²/2.
    ulp = torch.finfo(dtype).eps
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    k_err = (k.detach().double() - want).abs()
    assert bool((k_err <= rtol * want.abs() + 4 * ulp * size_x).all()), (k_err.max(), estimator)
    g_err = (lp.grad.double() - want_grad).abs()
    assert bool((g_err <= rtol * want_grad.abs() + 4 * ulp).all()), (g_err.max(), estimator)
    assert torch.equal(k.detach()[~mask], torch.zeros_like(k.detach()[~mask]))
    assert torch.equal(lp.grad[~mask], torch.zeros_like(lp.grad[~mask]))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_exactly_zero_at_the_reference(estimator: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(13)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    lp = (-torch.rand(3, 4, generator=gen, dtype=torch.float64) * 20).to(dtype)
    lp = torch.where(mask, lp, torch.full_like(lp, float("nan"))).requires_grad_(True)
    k = kl_penalty(lp, lp.detach().clone(), mask, estimator)
    assert torch.equal(k, torch.zeros_like(k))
    k.sum().backward()
    grad = lp.grad
    if estimator == "k1":
        # k1 = ℓ − ℓ_ref: its gradient is 1 in ℓ everywhere, at ℓ = ℓ_ref too
        assert torch.equal(grad, mask.to(dtype))
    else:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_unknown_estimator() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"estimator must be one of \['k1', 'k2', 'k3'\], got 'k4'"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), mask, "k4")


# ---------------------------------------------------------------------------------------------
# The KL term in the Objective
# ---------------------------------------------------------------------------------------------


def aggregate_reference(values: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The four aggregations of docs/objective.md, one row at a time; rows with no valid
    token do not count as sequences; L_norm is the padded width."""
    rows = []
    for i in range(mask.shape[0]):
        length = int(mask[i].sum())
        if length:
            rows.append((values[i, :length], length))
    seqs = len(rows)
    tokens = sum(length for _, length in rows)
    if aggregation == "token-mean":
        return sum(v.sum() for v, _ in rows) / tokens
    if aggregation == "seq-mean-token-mean":
        return sum(v.sum() / length for v, length in rows) / seqs
    if aggregation == "seq-mean-token-sum":
        return sum(v.sum() for v, _ in rows) / seqs
    return sum(v.sum() for v, _ in rows) / (seqs * mask.shape[1])


def _k_torch(lp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    x = ref - lp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return x * x / 2
    return torch.exp(x) - x - 1


@settings(max_examples=60)
@given(
    batch=policy_batches(max_n=6, max_len=24, max_log_ratio=5.0),
    aggregation=st.sampled_from(AGGREGATIONS),
    estimator=st.sampled_from(ESTIMATORS),
    beta=st.sampled_from([0.001, 0.04, 1.0]),
    empty_row=st.booleans(),
)
def test_objective_adds_beta_times_aggregated_kl(
    batch: PolicyBatch, aggregation: str, estimator: str, beta: float, empty_row: bool
) -> None:
    mask = batch.mask.clone()
    if empty_row and mask.shape[0] > 1:
        mask[0] = False  # a filtered sample: not a sequence, not a token
    lp = batch.log_probs.clone().requires_grad_(True)
    ref = batch.old_log_probs  # any other log-probs serve as the reference
    token_loss = torch.where(mask, batch.token_advantages, torch.full_like(lp, float("nan")))
    td = TensorDict(
        {"token_loss": token_loss, "response_mask": mask, "log_probs": lp, "ref_log_probs": ref},
        batch_size=[mask.shape[0]],
    )
    out = Objective(aggregation, kl_coef=beta, kl_estimator=estimator)(td)
    out["loss"].backward()

    lp_ref = batch.log_probs.clone().requires_grad_(True)

    def clean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, torch.zeros_like(x))

    k = _k_torch(clean(lp_ref), clean(ref), estimator)
    want = aggregate_reference(clean(token_loss), mask, aggregation) + beta * aggregate_reference(
        clean(k), mask, aggregation
    )
    want.backward()
    torch.testing.assert_close(out["loss"], want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-9, atol=1e-14)
    want_kl = clean(k).sum() / mask.sum()
    torch.testing.assert_close(out["kl"], want_kl.detach().float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        out["policy_loss"],
        aggregate_reference(clean(token_loss), mask, aggregation).float(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_grpo_kl_coef_adds_the_penalty() -> None:
    gen = torch.Generator().manual_seed(3)
    n, width = 4, 6
    mask = torch.arange(width)[None] < torch.tensor([6, 2, 4, 1])[:, None]
    lp = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 3
    old = lp + 0.05 * torch.randn(n, width, generator=gen, dtype=torch.float64)
    ref = lp + 0.5 * torch.randn(n, width, generator=gen, dtype=torch.float64)
    td = TensorDict(
        {
            "log_probs": lp,
            "old_log_probs": old,
            "ref_log_probs": ref,
            "advantages": torch.randn(n, generator=gen, dtype=torch.float64),
            "response_mask": mask,
        },
        batch_size=[n],
    )
    base = grpo()
    with_kl = grpo(kl_coef=0.04)
    k3 = torch.where(mask, torch.exp(ref - lp) - (ref - lp) - 1, torch.zeros_like(lp))
    want = base.loss(td)["loss"] + 0.04 * aggregate_reference(k3, mask, "seq-mean-token-mean")
    got = with_kl.loss(td)
    torch.testing.assert_close(got["loss"], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["kl"], (k3.sum() / mask.sum()).float())
    assert "kl" not in base.loss(td).keys()  # no reference term, no kl metric
