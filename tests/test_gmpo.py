"""GMPO (Zhao et al., arXiv 2507.20673; docs/algorithms.md) against an independent float64 reference.

The reference is a per-row Python loop written from the paper's formula, one token at a time:

    c_{i,t} = min(δ_{i,t}, ε_high) for Â_i > 0,  max(δ_{i,t}, −ε_low) for Â_i < 0,  0 for Â_i = 0
    g_i     = exp((1/L_i) Σ_t c_{i,t}),   loss = (1/N) Σ_i −Â_i g_i

and its gradient is written in closed form: ∂loss/∂ℓ_{i,t} = −Â_i g_i / (N L_i) for a token the
clip did not cut, 0 for one it cut and at padding. Nothing here calls the code under test to build
an expected value. verl's ``geo_mean`` parity is in tests_verl/test_verl_algorithms.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import GARBAGE, PolicyBatch, policy_batches
from tensordict import TensorDict

from gspo_components.loss.algorithms.gmpo import GMPOClip, gmpo

F64 = torch.float64


def reference(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂log_probs [N, T], cut [N, T]) by plain Python loops in float64 (non-empty rows)."""
    n, t = mask.shape
    grad = torch.zeros(n, t, dtype=F64)
    cut = torch.zeros(n, t, dtype=torch.bool)
    total = 0.0
    for i in range(n):
        a = float(advantages[i])
        cols = [j for j in range(t) if bool(mask[i, j])]
        cs = []
        for j in cols:
            d = float(log_probs[i, j]) - float(old_log_probs[i, j])
            if a > 0 and d > eps_high:
                cs.append(eps_high)
                cut[i, j] = True
            elif a < 0 and d < -eps_low:
                cs.append(-eps_low)
                cut[i, j] = True
            elif a == 0:
                cs.append(0.0)
            else:
                cs.append(d)
        g = math.exp(sum(cs) / len(cols))
        total += -a * g
        for j in cols:
            if not cut[i, j] and a != 0:
                grad[i, j] = -a * g / (n * len(cols))
    return total / n, grad, cut


def loss_and_grad(recipe, log_probs, old_log_probs, advantages, mask):
    x = log_probs.detach().clone().requires_grad_(True)
    td = TensorDict(
        {"log_probs": x, "old_log_probs": old_log_probs, "advantages": advantages, "response_mask": mask},
        batch_size=[mask.shape[0]],
    )
    out = recipe.loss(td)
    (grad,) = torch.autograd.grad(out[recipe.loss.out_key("loss")], x)
    return out[recipe.loss.out_key("loss")].detach(), grad, out


eps_pairs = st.sampled_from([(0.4, 0.4), (0.2, 0.2), (0.1, 0.3), (1.0, 0.05)])


@given(batch=policy_batches(max_log_ratio=5.0), eps=eps_pairs)
def test_gmpo_value_and_gradient_equal_the_reference(batch: PolicyBatch, eps: tuple[float, float]) -> None:
    """Random batches (both advantage signs, zeros, padding NaN/±inf/1e30): loss and gradient equal
    the loop reference; the gradient is finite, exactly 0 at padding and at every cut token."""
    recipe = gmpo(eps_low=eps[0], eps_high=eps[1])
    loss, grad, out = loss_and_grad(
        recipe, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask
    )
    ref_loss, ref_grad, cut = reference(
        batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask, *eps
    )
    assert loss.dtype == F64
    assert math.isclose(loss.item(), ref_loss, rel_tol=1e-11, abs_tol=1e-13), (loss.item(), ref_loss)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert torch.equal(grad[~batch.mask], torch.zeros_like(grad[~batch.mask]))
    assert torch.equal(grad[cut], torch.zeros_like(grad[cut]))
    # clip_fraction counts exactly the cut tokens
    frac = cut.sum().item() / batch.mask.sum().item()
    assert out["clip_fraction"].item() == pytest.approx(frac, abs=1e-7)


@given(batch=policy_batches(max_log_ratio=20.0))
def test_gmpo_default_eps_and_large_ratios(batch: PolicyBatch) -> None:
    """The paper's (e^−0.4, e^0.4) by default, log-ratios up to ±20 (the clamp of exp never binds:
    a clipped mean is bounded by ±20 here)."""
    loss, grad, _ = loss_and_grad(gmpo(), batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    ref_loss, ref_grad, _ = reference(batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    assert math.isclose(loss.item(), ref_loss, rel_tol=1e-11, abs_tol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("garbage", GARBAGE)
def test_padding_is_inert(garbage: float) -> None:
    """Whatever padding holds (NaN, ±inf, 1e30, ...) in log_probs and old_log_probs, value and
    gradient are those of the same batch with 0 there."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([[6], [2], [4]])
    lp = -torch.rand(3, 6, generator=gen, dtype=F64) * 3
    old = lp - (torch.rand(3, 6, generator=gen, dtype=F64) - 0.5)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    clean = loss_and_grad(gmpo(), torch.where(mask, lp, 0.0), torch.where(mask, old, 0.0), adv, mask)
    dirty = loss_and_grad(gmpo(), torch.where(mask, lp, garbage), torch.where(mask, old, -garbage), adv, mask)
    assert torch.equal(clean[0], dirty[0])
    assert torch.equal(clean[1], dirty[1])
    assert torch.equal(dirty[1][~mask], torch.zeros(int((~mask).sum()), dtype=F64))


def test_clipped_tokens_get_exactly_zero_gradient() -> None:
    """Â > 0: δ > ε_high is cut; Â < 0: δ < −ε_low is cut; the other side of the band is kept (the
    clip is pessimistic, one-sided)."""
    mask = torch.ones(2, 4, dtype=torch.bool)
    delta = torch.tensor([[0.5, -0.9, 0.1, 0.41], [-0.5, 0.9, -0.1, -0.41]], dtype=F64)
    lp = torch.full((2, 4), -1.0, dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    _, grad, _ = loss_and_grad(gmpo(), lp, lp - delta, adv, mask)
    cut = torch.tensor([[True, False, False, True], [True, False, False, True]])
    assert torch.equal(grad[cut], torch.zeros(4, dtype=F64))
    assert (grad[~cut] != 0).all()
    # value: g_0 = exp(mean(0.4, -0.9, 0.1, 0.4)), g_1 = exp(mean(-0.4, 0.9, -0.1, -0.4))
    g0, g1 = math.exp((0.4 - 0.9 + 0.1 + 0.4) / 4), math.exp((-0.4 + 0.9 - 0.1 - 0.4) / 4)
    loss, _, _ = loss_and_grad(gmpo(), lp, lp - delta, adv, mask)
    assert loss.item() == pytest.approx((-g0 + g1) / 2, rel=1e-12)


@given(batch=policy_batches())
def test_on_policy_gradient_is_the_policy_gradient(batch: PolicyBatch) -> None:
    """π_old = π: g_i = 1, nothing is cut, and ∇loss = ∇ mean_i(−Â_i mean_t ℓ_{i,t})."""
    x = batch.log_probs.detach().clone().requires_grad_(True)
    td = TensorDict(
        {
            "log_probs": x,
            "old_log_probs": x.detach(),
            "advantages": batch.advantages,
            "response_mask": batch.mask,
        },
        batch_size=[batch.n],
    )
    out = gmpo().loss(td)
    (grad,) = torch.autograd.grad(out["loss"], x)
    assert out["loss"].item() == pytest.approx(-batch.advantages.mean().item(), rel=1e-12, abs=1e-15)
    y = torch.where(batch.mask, batch.log_probs, 0.0).detach().requires_grad_(True)
    pg = (-batch.advantages * (y * batch.mask).sum(-1) / batch.lengths).mean()
    (expected,) = torch.autograd.grad(pg, y)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_float32_inputs_compute_in_float32_and_match() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(7).unsqueeze(0) < torch.tensor([[7], [3], [5], [1]])
    lp = -torch.rand(4, 7, generator=gen, dtype=F64) * 3
    old = lp - (torch.rand(4, 7, generator=gen, dtype=F64) - 0.5)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=F64)
    loss32, grad32, _ = loss_and_grad(gmpo(), lp.float(), old.float(), adv.float(), mask)
    ref_loss, ref_grad, _ = reference(lp.float().double(), old.float().double(), adv, mask)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(ref_loss, rel=1e-6)
    torch.testing.assert_close(grad32.double(), ref_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps_low": 0.0}, "'eps_low' must be a number > 0"),
        ({"eps_high": -0.1}, "'eps_high' must be a number > 0"),
        ({"eps_low": "0.4"}, "'eps_low' must be a number > 0"),
        ({"eps_high": float("nan")}, "'eps_high' must be a number > 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GMPOClip(**kwargs)
    with pytest.raises(ValueError, match=match):
        gmpo(**kwargs)


def test_per_token_advantages_are_refused() -> None:
    mask = torch.ones(2, 3, dtype=torch.bool)
    lp = torch.zeros(2, 3, dtype=F64)
    td = TensorDict(
        {
            "log_probs": lp,
            "old_log_probs": lp,
            "advantages": torch.ones(2, 3, dtype=F64),
            "response_mask": mask,
        },
        batch_size=[2],
    )
    with pytest.raises(ValueError, match=r"'advantages' must be one per response, shape \[N\] = \[2\]"):
        gmpo().loss(td)
