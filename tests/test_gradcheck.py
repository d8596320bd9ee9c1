"""``torch.autograd.gradcheck`` in float64 for every differentiable pure function and every recipe.

Batches come from ``policy_batches`` (small: N ≤ 3, T ≤ 8, |log-ratio| ≤ 3, garbage padding), so
gradcheck also proves that padding positions (NaN, ±inf, huge) have exactly zero derivative.
Ratios are kept 1e-4 (relative) away from every kink (clip edges, the dual-clip bound), since a
finite difference across a kink is not a derivative.

Three functions carry a stop-gradient by design, so their analytic gradient is *not* the
derivative of their value; each is checked where the two must agree, and the rest is proved in
``test_properties_objectives.py`` against the analytic reference:

- ``sequence_token_log_ratio``: its gradient is ∇ℓ_{i,t} (token-wise) while its value is log s_i;
  the two agree on row-constant weights, so gradcheck runs on the row sums Σ_t log s_{i,t}, and
  the Jacobian is checked to be exactly the identity on valid tokens;
- ``cispo_loss``: a truncated token keeps the gradient sg(ŵ)·Â although its value is constant, so
  gradcheck runs with the truncated tokens held constant, and the CISPO recipe with ε_high large
  enough that nothing is truncated;
- GSPO-token with [N, T] advantages: checked with Â_{i,t} = Â_i, where it equals GSPO.

==================================  ==========================================================
function                            test
==================================  ==========================================================
token / sequence / sequence-mean    ``test_gradcheck_log_ratios``
sequence_token_log_ratio            ``test_gradcheck_sequence_token_log_ratio``
ppo_clip_loss (± dual clip)         ``test_gradcheck_ppo_clip_loss``
cispo_loss                          ``test_gradcheck_cispo_loss``
sapo_loss, unclipped_loss           ``test_gradcheck_sapo_and_unclipped_loss``
kl_penalty (k1, k2, k3)             ``test_gradcheck_kl_penalty``
aggregate (all four)                ``test_gradcheck_aggregate``
objective_loss                      ``test_gradcheck_objective_loss``
each recipe's ``.loss``             ``test_gradcheck_recipe_losses``
==================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import GARBAGE, PolicyBatch, policy_batches
from tensordict import TensorDict

from gspo_components import (
    AGGREGATIONS,
    GroupNormalizedAdvantage,
    Objective,
    PolicyLoss,
    Recipe,
    SAPOGate,
    SequenceLogRatio,
    TokenLogRatio,
    aggregate,
    cispo,
    cispo_loss,
    dapo,
    dr_grpo,
    grpo,
    gspo,
    gspo_token,
    kl_penalty,
    local_normalizers,
    objective_loss,
    ppo_clip_loss,
    sapo_loss,
    sequence_log_ratio,
    sequence_mean_log_ratio,
    sequence_token_log_ratio,
    token_log_ratio,
    unclipped_loss,
)

F64 = torch.float64
KINK_MARGIN = 1e-4  # relative; gradcheck's finite-difference step is 1e-6
TOL = {"eps": 1e-6, "atol": 1e-7, "rtol": 1e-5}
EXAMPLES = 60  # gradcheck costs 2·N·T evaluations per example (per case when parametrized: a fraction)

small_batches = policy_batches(max_n=3, max_len=8, max_log_ratio=3.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids a threaded MKL ``exp`` whose barrier is slow under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def check(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
    assert torch.autograd.gradcheck(fn, inputs, **TOL)


def valid_log_ratio(batch: PolicyBatch) -> torch.Tensor:
    """ℓ − ℓ^old on valid tokens, the batch's garbage at padding."""
    garbage = torch.full((), batch.garbage, dtype=F64)
    return torch.where(batch.mask, batch.log_probs - batch.old_log_probs, garbage)


def away_from(ratios: torch.Tensor, kinks: list[float]) -> bool:
    """Every ratio is at least KINK_MARGIN (relative) away from every kink."""
    return all(bool(((ratios - k).abs() > KINK_MARGIN * k).all()) for k in kinks)


def decision_ratios(level: str, batch: PolicyBatch) -> torch.Tensor:
    """The ratios a clipper decides on, over the valid tokens: w, or s_i repeated L_i times."""
    lr = batch.log_probs - batch.old_log_probs
    if level == "token":
        return torch.exp(lr[batch.mask])
    rows = [lr[i][batch.mask[i]] for i in range(batch.n)]
    return torch.cat([torch.exp(r.mean()).expand(r.numel()) for r in rows])


# ---------------------------------------------------------------------------------------------
# Importance weighters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["token", "sequence", "sequence-mean"])
@settings(max_examples=EXAMPLES // 2)
@given(batch=small_batches)
def test_gradcheck_log_ratios(which: str, batch: PolicyBatch) -> None:
    fn = {"token": token_log_ratio, "sequence": sequence_log_ratio, "sequence-mean": sequence_mean_log_ratio}[
        which
    ]

    def f(x: torch.Tensor) -> torch.Tensor:
        return fn(x, batch.old_log_probs, batch.mask)

    check(f, leaf(batch.log_probs))


@settings(max_examples=EXAMPLES)
@given(batch=small_batches)
def test_gradcheck_sequence_token_log_ratio(batch: PolicyBatch) -> None:
    def row_sums(x: torch.Tensor) -> torch.Tensor:
        return sequence_token_log_ratio(x, batch.old_log_probs, batch.mask).sum(-1)

    check(row_sums, leaf(batch.log_probs))
    x = leaf(batch.log_probs)
    out = sequence_token_log_ratio(x, batch.old_log_probs, batch.mask)
    n, width = batch.mask.shape
    jac = torch.stack(
        [torch.autograd.grad(out.flatten()[k], x, retain_graph=True)[0].flatten() for k in range(n * width)]
    )
    want = torch.diag(batch.mask.flatten().to(F64))
    assert torch.equal(jac, want), "∂ log s_{i,t} / ∂ℓ_{j,u} must be δ_ij δ_tu on valid tokens, 0 elsewhere"


# ---------------------------------------------------------------------------------------------
# Clippers
# ---------------------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES)
@given(
    batch=small_batches,
    eps_low=st.floats(0.0, 0.95),
    eps_high=st.floats(0.0, 5.0),
    dual_clip=st.one_of(st.none(), st.floats(1.1, 10.0)),
    token_adv=st.booleans(),
)
def test_gradcheck_ppo_clip_loss(
    batch: PolicyBatch, eps_low: float, eps_high: float, dual_clip: float | None, token_adv: bool
) -> None:
    kinks = [1 - eps_low, 1 + eps_high] + ([] if dual_clip is None else [dual_clip])
    assume(away_from(decision_ratios("token", batch), kinks))
    adv = batch.token_advantages if token_adv else batch.advantages

    def f(lr: torch.Tensor) -> torch.Tensor:
        return ppo_clip_loss(lr, adv, batch.mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)[0]

    check(f, leaf(valid_log_ratio(batch)))


@settings(max_examples=EXAMPLES)
@given(
    batch=small_batches,
    eps_high=st.floats(0.0, 3.0),
    eps_low=st.one_of(st.none(), st.floats(0.0, 0.95)),
    token_adv=st.booleans(),
)
def test_gradcheck_cispo_loss(
    batch: PolicyBatch, eps_high: float, eps_low: float | None, token_adv: bool
) -> None:
    w = torch.exp(batch.log_probs - batch.old_log_probs)
    kinks = [1 + eps_high] + ([] if eps_low is None else [1 - eps_low])
    assume(away_from(w[batch.mask], kinks))
    truncated = w > 1 + eps_high
    if eps_low is not None:
        truncated |= w < 1 - eps_low
    free = batch.mask & ~truncated
    adv = batch.token_advantages if token_adv else batch.advantages

    def f(lr: torch.Tensor) -> torch.Tensor:  # truncated tokens held constant (see docstring)
        return cispo_loss(
            torch.where(free, lr, lr.detach()), adv, batch.mask, eps_high=eps_high, eps_low=eps_low
        )[0]

    check(f, leaf(valid_log_ratio(batch)))


@settings(max_examples=EXAMPLES)
@given(
    batch=small_batches, tau_pos=st.floats(0.05, 10.0), tau_neg=st.floats(0.05, 10.0), token_adv=st.booleans()
)
def test_gradcheck_sapo_and_unclipped_loss(
    batch: PolicyBatch, tau_pos: float, tau_neg: float, token_adv: bool
) -> None:
    adv = batch.token_advantages if token_adv else batch.advantages

    def sapo(lr: torch.Tensor) -> torch.Tensor:
        return sapo_loss(lr, adv, batch.mask, tau_pos=tau_pos, tau_neg=tau_neg)[0]

    def unclipped(lr: torch.Tensor) -> torch.Tensor:
        return unclipped_loss(lr, adv, batch.mask)[0]

    check(sapo, leaf(valid_log_ratio(batch)))
    check(unclipped, leaf(valid_log_ratio(batch)))


# ---------------------------------------------------------------------------------------------
# KL, aggregation, objective
# ---------------------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES)
@given(batch=small_batches, shift=st.floats(-3.0, 3.0), ref_garbage=st.sampled_from(GARBAGE))
def test_gradcheck_kl_penalty(batch: PolicyBatch, shift: float, ref_garbage: float) -> None:
    noise = torch.sin(13 * torch.arange(batch.mask.numel(), dtype=F64)).reshape(batch.mask.shape)
    ref = torch.where(batch.mask, batch.log_probs + shift * noise, torch.full((), ref_garbage, dtype=F64))
    for estimator in ("k1", "k2", "k3"):

        def f(x: torch.Tensor, est: str = estimator) -> torch.Tensor:
            return kl_penalty(x, ref, batch.mask, est)

        check(f, leaf(batch.log_probs))


@settings(max_examples=EXAMPLES)
@given(batch=small_batches, max_length=st.one_of(st.none(), st.integers(1, 100)))
def test_gradcheck_aggregate(batch: PolicyBatch, max_length: int | None) -> None:
    norm = local_normalizers(batch.mask, max_length=max_length)
    for aggregation in AGGREGATIONS:

        def f(v: torch.Tensor, agg: str = aggregation) -> torch.Tensor:
            return aggregate(v, batch.mask, agg, norm)

        check(f, leaf(batch.token_advantages))


@settings(max_examples=EXAMPLES)
@given(
    batch=small_batches,
    aggregation=st.sampled_from(AGGREGATIONS),
    kl_coef=st.floats(0.0, 2.0),
    entropy_coef=st.floats(-1.0, 1.0),
    with_is=st.booleans(),
)
def test_gradcheck_objective_loss(
    batch: PolicyBatch, aggregation: str, kl_coef: float, entropy_coef: float, with_is: bool
) -> None:
    is_weights = torch.where(
        batch.mask, torch.exp(-batch.old_log_probs.abs() / 10), torch.full((), batch.garbage, dtype=F64)
    )

    def f(token_loss: torch.Tensor, kl: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return objective_loss(
            token_loss,
            batch.mask,
            aggregation=aggregation,
            is_weights=is_weights if with_is else None,
            kl=kl,
            kl_coef=kl_coef,
            entropy=entropy,
            entropy_coef=entropy_coef,
        )[0]

    check(f, leaf(batch.token_advantages), leaf(batch.log_probs), leaf(batch.old_log_probs))


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------

RECIPES: dict[str, tuple[str, list[float], Callable[[], Recipe]]] = {
    # name: (ratio level, kinks, factory)
    "grpo": ("token", [0.8, 1.2], grpo),
    "grpo+kl": ("token", [0.8, 1.2], lambda: grpo(kl_coef=0.3)),
    "gspo": ("sequence", [1 - 3e-4, 1 + 4e-4], gspo),
    "gspo_token": ("sequence", [1 - 3e-4, 1 + 4e-4], gspo_token),
    "gspo_token[N,T]": ("sequence", [1 - 3e-4, 1 + 4e-4], gspo_token),
    "dr_grpo": ("token", [0.8, 1.2], dr_grpo),
    "dapo": ("token", [0.8, 1.28], dapo),
    # ε_high = 30 > e^3 − 1: no token is truncated, so the gradient is the value's derivative
    "cispo": ("token", [31.0], lambda: cispo(eps_high=30.0)),
    "sapo": (
        "token",
        [],
        lambda: Recipe(
            "sapo", GroupNormalizedAdvantage(), PolicyLoss(TokenLogRatio(), SAPOGate(), Objective())
        ),
    ),
    "sapo_seq": (
        "sequence",
        [],
        lambda: Recipe(
            "sapo_seq", GroupNormalizedAdvantage(), PolicyLoss(SequenceLogRatio(), SAPOGate(), Objective())
        ),
    ),
}


@pytest.mark.parametrize("name", list(RECIPES))
@settings(max_examples=EXAMPLES // 3)
@given(batch=small_batches)
def test_gradcheck_recipe_losses(name: str, batch: PolicyBatch) -> None:
    level, kinks, factory = RECIPES[name]
    assume(away_from(decision_ratios(level, batch), kinks))
    recipe = factory()
    adv = batch.advantages
    if name == "gspo_token[N,T]":
        adv = torch.where(batch.mask, adv.unsqueeze(-1).expand_as(batch.mask).to(F64), batch.token_advantages)
    noise = torch.cos(7 * torch.arange(batch.mask.numel(), dtype=F64)).reshape(batch.mask.shape)
    ref = torch.where(batch.mask, batch.log_probs + noise, batch.old_log_probs)

    def f(x: torch.Tensor) -> torch.Tensor:
        td = TensorDict(
            {
                "log_probs": x,
                "old_log_probs": batch.old_log_probs,
                "advantages": adv,
                "response_mask": batch.mask,
                "ref_log_probs": ref,
            },
            batch_size=[batch.n],
        )
        return recipe.loss(td)["loss"]

    check(f, leaf(batch.log_probs))
