"""Clip-Cov, KL-Cov (arXiv 2505.22617), VESPO (arXiv 2602.10693) and LUSPO (arXiv 2602.05261)
against independent float64 references: plain per-token Python loops written from the formulas
in docs/algorithms.md and the parts' docstrings, with gradients in closed form. The code under
test is never called to build an expected value. Trainer parity: tests_verl/test_verl_algorithms.py
(Clip-Cov, KL-Cov vs verl) and tests/integrations/test_trl_algorithms.py (VESPO, LUSPO vs TRL).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import GARBAGE, PolicyBatch, policy_batches
from tensordict import TensorDict

from gspo_components.loss.algorithms.cov import ClipCovClip, KLCovPenalty, clip_cov, kl_cov
from gspo_components.loss.algorithms.luspo import luspo
from gspo_components.loss.algorithms.vespo import VESPOWeight, vespo

F64 = torch.float64


def loss_and_grad(recipe, log_probs, old_log_probs, advantages, mask):
    x = log_probs.detach().clone().requires_grad_(True)
    td = TensorDict(
        {"log_probs": x, "old_log_probs": old_log_probs, "advantages": advantages, "response_mask": mask},
        batch_size=[mask.shape[0]],
    )
    out = recipe.loss(td)
    loss = out[recipe.loss.out_key("loss")]
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, out


def valid_tokens(mask: torch.Tensor) -> list[tuple[int, int]]:
    """The valid positions, row-major (the order torch.nonzero lists them in)."""
    return [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1]) if bool(mask[i, j])]


def covariances(batch: PolicyBatch, toks: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    n = len(toks)
    mean_a = sum(float(batch.advantages[i]) for i, _ in toks) / n
    mean_l = sum(float(batch.log_probs[i, j]) for i, j in toks) / n
    return {
        (i, j): (float(batch.advantages[i]) - mean_a) * (float(batch.log_probs[i, j]) - mean_l)
        for i, j in toks
    }


def delta(batch: PolicyBatch, i: int, j: int) -> float:
    return float(batch.log_probs[i, j]) - float(batch.old_log_probs[i, j])


def assert_matches(loss, grad, ref_loss, ref_grad, mask):
    assert math.isclose(loss.item(), ref_loss, rel_tol=1e-10, abs_tol=1e-12), (loss.item(), ref_loss)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-13)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


# ---------------------------------------------------------------------------------------------
# Clip-Cov


def clip_cov_reference(batch, eps_low, eps_high, ratio, lb, ub, seed):
    """token-mean of: 0 at the drawn tokens; −Â·(1±ε) where PPO clips; −Â·w otherwise."""
    toks = valid_tokens(batch.mask)
    n = len(toks)
    cov = covariances(batch, toks)
    cut, candidates = set(), []
    for i, j in toks:
        a, w = float(batch.advantages[i]), math.exp(delta(batch, i, j))
        if (a > 0 and w > 1 + eps_high) or (a < 0 and w < 1 - eps_low):
            cut.add((i, j))
        elif lb < cov[(i, j)] < ub:
            candidates.append((i, j))
    drawn = set()
    if candidates:
        perm = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
        drawn = {candidates[p] for p in perm[: max(int(ratio * n), 1)]}
    grad = torch.zeros(batch.mask.shape, dtype=F64)
    total = 0.0
    for i, j in toks:
        a, w = float(batch.advantages[i]), math.exp(delta(batch, i, j))
        if (i, j) in drawn:
            continue
        if (i, j) in cut:
            total += -a * ((1 + eps_high) if a > 0 else (1 - eps_low))
        else:
            total += -a * w
            grad[i, j] = -a * w / n
    return total / n, grad, len(drawn), len(cut)


@given(
    batch=policy_batches(max_log_ratio=3.0),
    ratio=st.sampled_from([2e-4, 0.05, 0.3, 1.0]),
    bounds=st.sampled_from([(1.0, 5.0), (0.25, 2.0), (-1.0, 10.0)]),  # not 0: Cov = ±1 ulp when Â is constant
    seed=st.integers(0, 2**31 - 1),
)
def test_clip_cov_matches_reference(batch: PolicyBatch, ratio: float, bounds: tuple, seed: int) -> None:
    recipe = clip_cov(
        clip_ratio=ratio, lb=bounds[0], ub=bounds[1], generator=torch.Generator().manual_seed(seed)
    )
    loss, grad, out = loss_and_grad(
        recipe, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask
    )
    ref_loss, ref_grad, drawn, cut = clip_cov_reference(batch, 0.2, 0.2, ratio, *bounds, seed)
    assert_matches(loss, grad, ref_loss, ref_grad, batch.mask)
    assert out["clip_fraction"].item() == pytest.approx((drawn + cut) / batch.mask.sum().item(), abs=1e-7)


def test_clip_cov_draws_the_stated_number_of_tokens() -> None:
    """max(⌊r·N_v⌋, 1) tokens among the candidates: with every valid token a candidate (no PPO
    clip on-policy, bounds (−1e9, 1e9)), exactly that many get zero gradient."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(10).unsqueeze(0) < torch.tensor([[10], [7], [3]])
    lp = -torch.rand(3, 10, generator=gen, dtype=F64) * 4
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    for ratio, expected in ((1e-4, 1), (0.1, 2), (0.5, 10), (1.0, 20)):
        recipe = clip_cov(clip_ratio=ratio, lb=-1e9, ub=1e9, generator=torch.Generator().manual_seed(1))
        _, grad, _ = loss_and_grad(recipe, lp, lp, adv, mask)
        assert int(((grad == 0) & mask).sum()) == expected, ratio


# ---------------------------------------------------------------------------------------------
# KL-Cov


def kl_cov_reference(batch, ratio, coef):
    """token-mean of −Â·w, plus coef·|δ| on the top max(⌊k·N_v⌋, 1) tokens by Cov."""
    toks = valid_tokens(batch.mask)
    n = len(toks)
    cov = covariances(batch, toks)
    k = max(1, int(n * ratio))
    ranked = sorted(toks, key=lambda p: -cov[p])
    gap = cov[ranked[k - 1]] - cov[ranked[k]] if k < n else math.inf
    top = set(ranked[:k])
    grad = torch.zeros(batch.mask.shape, dtype=F64)
    total = 0.0
    for i, j in toks:
        a, d = float(batch.advantages[i]), delta(batch, i, j)
        total += -a * math.exp(d)
        g = -a * math.exp(d)
        if (i, j) in top:
            total += coef * abs(d)
            g += coef * (1.0 if d > 0 else -1.0 if d < 0 else 0.0)
        grad[i, j] = g / n
    return total / n, grad, gap


@given(
    batch=policy_batches(max_log_ratio=3.0),
    ratio=st.sampled_from([2e-4, 0.05, 0.3, 1.0]),
    coef=st.sampled_from([0.1, 1.0]),
)
def test_kl_cov_matches_reference(batch: PolicyBatch, ratio: float, coef: float) -> None:
    ref_loss, ref_grad, gap = kl_cov_reference(batch, ratio, coef)
    assume(gap > 1e-9)  # a tie at the k-th place has no single answer
    recipe = kl_cov(kl_ratio=ratio, kl_coef=coef)
    loss, grad, _ = loss_and_grad(recipe, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    assert_matches(loss, grad, ref_loss, ref_grad, batch.mask)


# ---------------------------------------------------------------------------------------------
# VESPO


def vespo_reference(batch, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0):
    """token-mean of −φ(w_i)·Â_i·ℓ_{i,t}, w_i = Π_t w_{i,t} (log-sum clamped as in TRL)."""
    toks = valid_tokens(batch.mask)
    n = len(toks)
    grad = torch.zeros(batch.mask.shape, dtype=F64)
    total = 0.0
    for i in range(batch.n):
        row = [j for (r, j) in toks if r == i]
        log_w = sum(min(max(delta(batch, i, j), -20.0), 20.0) for j in row)
        log_w = min(max(log_w, math.log(1e-8)), 20.0)
        a = float(batch.advantages[i])
        k, lam = (k_pos, lam_pos) if a >= 0 else (k_neg, lam_neg)
        phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
        for j in row:
            total += -phi * a * float(batch.log_probs[i, j])
            grad[i, j] = -phi * a / n
    return total / n, grad


@given(
    batch=policy_batches(max_log_ratio=1.0),
    params=st.sampled_from([(2.0, 3.0, 3.0, 2.0), (1.0, 0.5, 4.0, 1.5)]),
)
def test_vespo_matches_reference(batch: PolicyBatch, params: tuple) -> None:
    loss, grad, _ = loss_and_grad(
        vespo(**dict(zip(("k_pos", "lambda_pos", "k_neg", "lambda_neg"), params, strict=True))),
        batch.log_probs,
        batch.old_log_probs,
        batch.advantages,
        batch.mask,
    )
    ref_loss, ref_grad = vespo_reference(batch, *params)
    assert_matches(loss, grad, ref_loss, ref_grad, batch.mask)


def test_vespo_weight_is_one_on_policy_and_uses_the_product_ratio() -> None:
    """φ(1) = 1 on-policy (gradient −Â ∇ℓ / N_v); off-policy, a response of 4 tokens each with
    δ = 0.1 has w = e^{0.4} (product, not e^{0.1}): φ = e^3 w^2 e^{−3w} for Â > 0."""
    mask = torch.ones(2, 4, dtype=torch.bool)
    lp = torch.full((2, 4), -1.0, dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    _, grad, _ = loss_and_grad(vespo(), lp, lp, adv, mask)
    torch.testing.assert_close(grad, -adv.unsqueeze(-1).expand(2, 4) / 8, rtol=1e-14, atol=0)
    _, grad, _ = loss_and_grad(vespo(), lp, lp - 0.1, adv, mask)
    w = math.exp(0.4)
    assert grad[0, 0].item() == pytest.approx(-math.exp(3) * w**2 * math.exp(-3 * w) / 8, rel=1e-12)
    assert grad[1, 0].item() == pytest.approx(math.exp(2) * w**3 * math.exp(-2 * w) / 8, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# LUSPO


def luspo_reference(batch, eps_low, eps_high):
    """mean over responses of L_i · GSPO's −min(s Â, clip(s) Â)."""
    grad = torch.zeros(batch.mask.shape, dtype=F64)
    total = 0.0
    for i in range(batch.n):
        row = [j for j in range(batch.mask.shape[1]) if bool(batch.mask[i, j])]
        s = math.exp(sum(delta(batch, i, j) for j in row) / len(row))
        a = float(batch.advantages[i])
        clipped = (a > 0 and s > 1 + eps_high) or (a < 0 and s < 1 - eps_low)
        value = a * ((1 + eps_high) if a > 0 else (1 - eps_low)) if clipped else a * s
        total += -value * len(row)
        for j in row:
            grad[i, j] = 0.0 if clipped else -a * s / batch.n
    return total / batch.n, grad


@given(batch=policy_batches(max_log_ratio=5.0), eps=st.sampled_from([(3e-4, 4e-4), (0.2, 0.2), (0.1, 0.3)]))
def test_luspo_matches_reference(batch: PolicyBatch, eps: tuple[float, float]) -> None:
    loss, grad, _ = loss_and_grad(
        luspo(eps_low=eps[0], eps_high=eps[1]),
        batch.log_probs,
        batch.old_log_probs,
        batch.advantages,
        batch.mask,
    )
    ref_loss, ref_grad = luspo_reference(batch, *eps)
    assert_matches(loss, grad, ref_loss, ref_grad, batch.mask)


# ---------------------------------------------------------------------------------------------
# Padding and bad input, every part


RECIPES = {
    "clip_cov": lambda: clip_cov(
        clip_ratio=0.3, lb=-1.0, ub=10.0, generator=torch.Generator().manual_seed(4)
    ),
    "kl_cov": lambda: kl_cov(kl_ratio=0.3, kl_coef=1.0),
    "vespo": vespo,
    "luspo": lambda: luspo(eps_low=0.2, eps_high=0.2),
}


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("garbage", GARBAGE)
def test_padding_is_inert(name: str, garbage: float) -> None:
    gen = torch.Generator().manual_seed(3)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([[6], [2], [4], [5]])
    lp = -torch.rand(4, 6, generator=gen, dtype=F64) * 3
    old = lp - (torch.rand(4, 6, generator=gen, dtype=F64) - 0.5)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=F64)
    clean = loss_and_grad(RECIPES[name](), torch.where(mask, lp, 0.0), torch.where(mask, old, 0.0), adv, mask)
    dirty = loss_and_grad(
        RECIPES[name](), torch.where(mask, lp, garbage), torch.where(mask, old, -garbage), adv, mask
    )
    assert torch.isfinite(dirty[0])
    assert torch.equal(clean[0], dirty[0])
    assert torch.equal(clean[1], dirty[1])
    assert torch.equal(dirty[1][~mask], torch.zeros(int((~mask).sum()), dtype=F64))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: ClipCovClip(clip_ratio=0.0),
            r"'clip_ratio' must be a finite number in \(0.0, 1.0\], got 0.0",
        ),
        (lambda: ClipCovClip(clip_ratio=1.5), "'clip_ratio' must be a finite number in"),
        (lambda: ClipCovClip(eps_low=1.5), r"'eps_low' must be a finite number in \[0.0, 1.0\], got 1.5"),
        (lambda: ClipCovClip(lb=5.0, ub=1.0), "'lb' must be < 'ub', got lb=5.0, ub=1.0"),
        (lambda: ClipCovClip(ub=float("nan")), "'ub' must be a finite number"),
        (lambda: ClipCovClip(generator=3), "'generator' must be a torch.Generator or None, got int"),
        (lambda: KLCovPenalty(kl_ratio=0.0), "'kl_ratio' must be a finite number in"),
        (lambda: KLCovPenalty(kl_coef=-1.0), r"'kl_coef' must be a finite number in \[0.0, inf\), got -1.0"),
        (lambda: VESPOWeight(lambda_pos=0.0), "'lambda_pos' must be a finite number > 0, got 0.0"),
        (lambda: VESPOWeight(k_neg=-1.0), "'k_neg' must be a finite number >= 0, got -1.0"),
        (lambda: VESPOWeight(k_pos=float("inf")), "'k_pos' must be a finite number >= 0, got inf"),
        (lambda: luspo(eps_low=-0.1), "eps_low"),
    ],
)
def test_bad_arguments_are_refused(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_vespo_refuses_per_token_advantages() -> None:
    mask = torch.ones(2, 3, dtype=torch.bool)
    lp = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(
        ValueError, match=r"'advantages' must be one per response, shape \[N\] = \[2\], got \[2, 3\]"
    ):
        loss_and_grad(vespo(), lp, lp, torch.ones(2, 3, dtype=F64), mask)


def test_cov_parts_need_log_probs() -> None:
    """The Cov selection reads log-probabilities: a batch without them is refused by name."""
    mask = torch.ones(2, 3, dtype=torch.bool)
    td = TensorDict(
        {
            "log_ratio": torch.zeros(2, 3, dtype=F64),
            "advantages": torch.ones(2, dtype=F64),
            "response_mask": mask,
        },
        batch_size=[2],
    )
    for part in (ClipCovClip(), KLCovPenalty(), VESPOWeight()):
        with pytest.raises((KeyError, ValueError), match="log_probs"):
            part(td)
