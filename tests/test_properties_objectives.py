"""Property-based tests of the objectives: properties 1–8, 10, 11 and 14 of docs/algorithms.md.

Every expected value comes from an independent float64 reference written below from the
formulas of docs/algorithms.md (a per-row loop over the valid tokens, exact row sums with
``math.fsum``, min-form surrogates and hand-derived gradients); the code under test is never used
to produce an expected value. Tolerances: float64 rtol 1e-10 (plus 1e-12 of the magnitude of the
summed terms, for values that cancel to near 0).

Categorical choices (recipe, aggregation, dtype, edge side) are ``pytest.mark.parametrize``d
rather than drawn: under ``derandomize=True`` a ``sampled_from`` over ten cases can leave some
cases never drawn. Parametrized tests run 50 examples per case.

==========  ================================================================================
property    test
==========  ================================================================================
(ref)       ``test_recipes_match_reference``: every recipe's loss, gradient and clip mask equal
            the reference off-policy (GRPO ± KL, GSPO, GSPO-token [N] and [N, T], Dr.GRPO,
            DAPO, CISPO, SAPO at token and sequence level)
1           ``test_gspo_token_equals_gspo_recipes``, ``test_gspo_token_equals_gspo_pure_functions``
2           ``test_on_policy_gradient_is_the_policy_gradient``
3           ``test_grpo_equals_gspo_with_constant_ratio_per_sequence``,
            ``test_grpo_equals_gspo_with_length_one_responses``
4           ``test_gspo_clipped_rows_have_exactly_zero_gradient``,
            ``test_gspo_wrong_side_rows_keep_their_gradient``,
            ``test_clip_edges_are_strict`` (GSPO recipe and ``ppo_clip_loss`` at an exact edge)
5           ``test_gspo_unclipped_row_gradient_is_uniform``
6           ``test_gspo_depends_on_old_log_probs_only_through_row_sum``
7           ``test_sequence_ratio_is_a_geometric_mean``
8           ``test_padding_never_matters``
10          ``test_constant_group_rewards_give_exactly_zero_gradient``
11          ``test_gradient_is_linear_in_advantage_scale``
14          ``test_half_precision_inputs_compute_in_float32``,
            ``test_half_precision_clip_decisions_near_the_gspo_band``,
            ``test_bf16_cannot_hold_the_gspo_band_but_the_library_decides_right``
==========  ================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import GARBAGE, PolicyBatch, policy_batches
from tensordict import TensorDict, TensorDictBase

from gspo_components import (
    GroupNormalizedAdvantage,
    Objective,
    PolicyLoss,
    Recipe,
    SAPOGate,
    SequenceLogRatio,
    TokenLogRatio,
    cispo,
    dapo,
    dr_grpo,
    grpo,
    gspo,
    gspo_token,
    objective_loss,
    ppo_clip_loss,
    sequence_log_ratio,
    sequence_mean_log_ratio,
    sequence_token_log_ratio,
    token_log_ratio,
)

F64 = torch.float64
RTOL = 1e-10  # float64
ATOL_REL = 1e-12  # of the magnitude of the summed terms
MAX_LOG_RATIO = 20.0  # the clippers' default clamp of log r (as in verl)
EDGE_MARGIN = 1e-9  # relative distance of a float64 ratio from a clip edge (rounding is ~1e-13)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny; with 2 threads on a loaded 2-core machine, float64 ``exp`` goes
    through a threaded MKL call whose barrier costs up to ~30 ms. One thread is ~10⁴× faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# The independent reference (docs/algorithms.md, "The objective")
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What a recipe computes: ratio level, clipper, its parameters, the aggregation, KL."""

    level: str  # "token" | "sequence" | "sequence-token"
    clipper: str  # "ppo" | "cispo" | "sapo"
    eps_low: float | None
    eps_high: float
    aggregation: str
    kl_coef: float = 0.0
    tau_pos: float = 1.0
    tau_neg: float = 1.05


@dataclass
class Ref:
    loss: float  # the loss −J (plus β·KL)
    loss_scale: float  # Σ |terms| of the loss, for the absolute tolerance
    grad: torch.Tensor  # ∂loss/∂ℓ, [N, T], 0 at padding
    grad_scale: torch.Tensor  # Σ |terms| of each gradient entry
    clipped: torch.Tensor  # [N, T] bool, False at padding
    ratio: torch.Tensor  # [N, T] ratio the clipper decides on (w, or s_i broadcast); 1 at padding
    seq_ratio: torch.Tensor  # [N] s_i


def _surrogate(
    spec: Spec, r: torch.Tensor, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token J_t, ∂J_t/∂log r_t, and the clip flag, from the formulas."""
    if spec.clipper == "ppo":
        assert spec.eps_low is not None
        hi, lo = 1.0 + spec.eps_high, 1.0 - spec.eps_low
        value = torch.minimum(r * a, r.clamp(lo, hi) * a)
        clipped = ((a > 0) & (r > hi)) | ((a < 0) & (r < lo))
        slope = torch.where(clipped, torch.zeros_like(r), r * a)
        return value, slope, clipped
    if spec.clipper == "cispo":  # J = sg(ŵ)·Â·ℓ in gradient, ŵ·Â in value
        hi = 1.0 + spec.eps_high
        w_hat = torch.minimum(r, torch.full_like(r, hi))
        clipped = r > hi
        if spec.eps_low is not None:
            lo = 1.0 - spec.eps_low
            w_hat = torch.maximum(w_hat, torch.full_like(r, lo))
            clipped = clipped | (r < lo)
        return w_hat * a, w_hat * a, clipped
    # SAPO: f(w) = (4/τ) σ(τ(w−1)), f'(w) = 4 σ (1 − σ)
    tau = torch.where(a > 0, torch.full_like(r, spec.tau_pos), torch.full_like(r, spec.tau_neg))
    sig = 1.0 / (1.0 + torch.exp(-tau * (r - 1.0)))
    return (4.0 / tau) * sig * a, 4.0 * sig * (1.0 - sig) * r * a, torch.zeros_like(r, dtype=torch.bool)


def _k3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k3 = e^x − x − 1 (by its series near 0) and dk3/dℓ = 1 − e^x, for x = ℓ_ref − ℓ, with the
    magnitudes of what cancels in each: (e^x − 1) − x in the value, 1 − e^x in the gradient (the
    autograd derivative of expm1 is e^x, so 1 − e^x is formed from operands of size 1 and e^x)."""
    series = x * x / 2 + x**3 / 6 + x**4 / 24 + x**5 / 120
    value = torch.where(x.abs() < 1e-3, series, torch.exp(x) - x - 1.0)
    return value, -torch.expm1(x), torch.expm1(x).abs() + x.abs(), torch.exp(x) + 1.0


def reference(
    spec: Spec,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_log_probs: torch.Tensor | None = None,
) -> Ref:
    """The loss, its gradient in ℓ and the clip mask, row by row over the valid tokens only."""
    n, width = mask.shape
    lengths = [int(v) for v in mask.sum(-1)]
    seqs = sum(1 for v in lengths if v > 0)
    tokens = sum(lengths)
    terms: list[float] = []
    extra_scale: list[float] = []  # magnitudes that cancel inside a term
    grad = torch.zeros(n, width, dtype=F64)
    grad_scale = torch.zeros(n, width, dtype=F64)
    clipped = torch.zeros(n, width, dtype=torch.bool)
    ratio = torch.ones(n, width, dtype=F64)
    seq_ratio = torch.ones(n, dtype=F64)
    for i in range(n):
        m, length = mask[i], lengths[i]
        if length == 0:
            continue
        lr = log_probs[i][m].to(F64) - old_log_probs[i][m].to(F64)
        a = advantages[i].to(F64).expand(length) if advantages.dim() == 1 else advantages[i][m].to(F64)
        log_s = math.fsum(lr.tolist()) / length  # GSPO eq. 7: s_i is the geometric mean
        seq_ratio[i] = math.exp(log_s)
        log_r = lr if spec.level == "token" else torch.full((length,), log_s, dtype=F64)
        # The documented guard (clipping.py): log r is clamped to ±20 before exp, and a ratio
        # beyond e^±20 gets no gradient through the clamp.
        r = torch.exp(log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
        value, slope, flags = _surrogate(spec, r, a)
        slope = torch.where(log_r.abs() <= MAX_LOG_RATIO, slope, torch.zeros_like(slope))
        if spec.level == "sequence":  # every token's value depends on the row through log s_i
            slope = torch.full_like(slope, math.fsum(slope.tolist()) / length)
        weight = {
            "token-mean": 1.0 / tokens,
            "seq-mean-token-mean": 1.0 / (seqs * length),
            "seq-mean-token-sum": 1.0 / seqs,
            "seq-mean-token-sum-norm": 1.0 / (seqs * width),
        }[spec.aggregation]
        terms.extend((-weight * value).tolist())
        g, gs = -weight * slope, (weight * slope).abs()
        if spec.kl_coef:
            assert ref_log_probs is not None
            k3, dk3, k3_scale, dk3_scale = _k3(ref_log_probs[i][m].to(F64) - log_probs[i][m].to(F64))
            beta = spec.kl_coef * weight
            terms.extend((beta * k3).tolist())
            extra_scale.extend((beta * k3_scale).tolist())
            g, gs = g + beta * dk3, gs + beta * dk3_scale
        grad[i, m], grad_scale[i, m], clipped[i, m], ratio[i, m] = g, gs, flags, r
    loss_scale = math.fsum(abs(t) for t in terms) + math.fsum(extra_scale)
    return Ref(math.fsum(terms), loss_scale, grad, grad_scale, clipped, ratio, seq_ratio)


def far_from_edges(ref: Ref, spec: Spec, mask: torch.Tensor, margin: float = EDGE_MARGIN) -> bool:
    """Every ratio the clipper decides on is at least ``margin`` (relative) away from each edge."""
    if spec.clipper == "sapo":
        return True
    r = ref.ratio[mask]
    edges = [1.0 + spec.eps_high] + ([] if spec.eps_low is None else [1.0 - spec.eps_low])
    return all(bool(((r - e).abs() > margin * e).all()) for e in edges)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor | float,
    scale: torch.Tensor | float,
    what: str,
    rtol: float = RTOL,
    atol_rel: float = ATOL_REL,
) -> None:
    """|actual − expected| ≤ rtol·|expected| + atol_rel·scale, elementwise (scale = Σ|terms|)."""
    actual = torch.as_tensor(actual).detach().to(F64)
    expected = torch.as_tensor(expected, dtype=F64)
    scale = torch.as_tensor(scale, dtype=F64)
    err = (actual - expected).abs()
    tol = rtol * expected.abs() + atol_rel * scale
    bad = ~(err <= tol)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} entries off; worst actual={actual[bad].flatten()[:4].tolist()} "
        f"expected={expected.expand_as(actual)[bad].flatten()[:4].tolist()}"
    )


# ---------------------------------------------------------------------------------------------
# Recipes under test, with the Spec the reference needs
# ---------------------------------------------------------------------------------------------

# name: (level, clipper, default eps_low, default eps_high, default aggregation) from docs/recipes.md
DEFAULTS: dict[str, tuple[str, str, float | None, float, str]] = {
    "grpo": ("token", "ppo", 0.2, 0.2, "seq-mean-token-mean"),
    "gspo": ("sequence", "ppo", 3e-4, 4e-4, "seq-mean-token-mean"),
    "gspo_token": ("sequence-token", "ppo", 3e-4, 4e-4, "seq-mean-token-mean"),
    "dr_grpo": ("token", "ppo", 0.2, 0.2, "seq-mean-token-sum-norm"),
    "dapo": ("token", "ppo", 0.2, 0.28, "token-mean"),
    "cispo": ("token", "cispo", None, 0.28, "token-mean"),
    "sapo": ("token", "sapo", None, 0.0, "seq-mean-token-mean"),
    "sapo_seq": ("sequence", "sapo", None, 0.0, "seq-mean-token-mean"),
}
FACTORIES = {
    "grpo": grpo,
    "gspo": gspo,
    "gspo_token": gspo_token,
    "dr_grpo": dr_grpo,
    "dapo": dapo,
    "cispo": cispo,
}
ALL_RECIPES = tuple(DEFAULTS)
PER_CASE = settings(max_examples=50)  # for tests parametrized over cases: 50 examples per case
AGGREGATION_NAMES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@lru_cache(maxsize=512)
def build(
    name: str,
    *,
    eps: tuple[float | None, float] | None = None,
    aggregation: str | None = None,
    kl_coef: float = 0.0,
    taus: tuple[float, float] = (1.0, 1.05),
) -> tuple[Recipe, Spec]:
    """The recipe (with its defaults unless overridden) and the Spec of what it should compute."""
    level, clipper, eps_low, eps_high, agg = DEFAULTS[name]
    kwargs: dict[str, object] = {}
    if eps is not None:
        eps_low, eps_high = eps
        kwargs.update(eps_low=eps_low, eps_high=eps_high)
    if aggregation is not None:
        agg = aggregation
        kwargs["aggregation"] = aggregation
    if kl_coef:
        kwargs["kl_coef"] = kl_coef
    spec = Spec(level, clipper, eps_low, eps_high, agg, kl_coef, *taus)
    if name in FACTORIES:
        return FACTORIES[name](**kwargs), spec
    weighter = SequenceLogRatio() if level == "sequence" else TokenLogRatio()
    loss = PolicyLoss(weighter, SAPOGate(*taus), Objective(agg, kl_coef=kl_coef))
    return Recipe(name, GroupNormalizedAdvantage(), loss), spec


def make_td(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_log_probs: torch.Tensor | None = None,
) -> TensorDict:
    entries = {
        "log_probs": log_probs,
        "old_log_probs": old_log_probs,
        "advantages": advantages,
        "response_mask": mask,
    }
    if ref_log_probs is not None:
        entries["ref_log_probs"] = ref_log_probs
    return TensorDict(entries, batch_size=[mask.shape[0]])


def run(
    recipe: Recipe,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, TensorDictBase]:
    """(loss, ∂loss/∂log_probs, output TensorDict); ``old_log_probs=None`` means log_probs.detach()."""
    x = log_probs.detach().clone().requires_grad_(True)
    old = x.detach() if old_log_probs is None else old_log_probs
    out = recipe.loss(make_td(x, old, advantages, mask, ref_log_probs))
    (grad,) = torch.autograd.grad(out["loss"], x)
    return out["loss"].detach(), grad, out


def clip_mask(recipe: Recipe, batch: PolicyBatch, advantages: torch.Tensor | None = None) -> torch.Tensor:
    """The ``clipped`` mask the recipe's own weighter and clipper write."""
    adv = batch.advantages if advantages is None else advantages
    with torch.no_grad():
        td = make_td(batch.log_probs, batch.old_log_probs, adv, batch.mask)
        return recipe.loss.clipper(recipe.loss.weighter(td))["clipped"]


def row_advantages(batch: PolicyBatch) -> torch.Tensor:
    """Â_{i,t} = Â_i on valid tokens, the batch's garbage at padding."""
    fill = torch.full_like(batch.log_probs, batch.garbage)
    return torch.where(batch.mask, batch.advantages.unsqueeze(-1).expand_as(batch.log_probs), fill)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

eps_lows = st.one_of(st.sampled_from([0.0, 3e-4, 0.2]), st.floats(0.0, 0.99))
eps_highs = st.one_of(st.sampled_from([0.0, 4e-4, 0.2, 0.28]), st.floats(0.0, 10.0))
eps_pairs = st.tuples(eps_lows, eps_highs)
taus = st.tuples(st.floats(0.05, 10.0), st.floats(0.05, 10.0))


# ---------------------------------------------------------------------------------------------
# Reference agreement for every recipe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [*ALL_RECIPES, "gspo_token[N,T]", "grpo+kl", "gspo+kl"])
@PER_CASE
@given(
    batch=policy_batches(),
    eps=st.one_of(st.none(), eps_pairs),
    kl_coef=st.floats(0.01, 2.0),
    ref_shift=st.floats(-3.0, 3.0),
    taus=taus,
)
def test_recipes_match_reference(
    case: str,
    batch: PolicyBatch,
    eps: tuple[float, float] | None,
    kl_coef: float,
    ref_shift: float,
    taus: tuple[float, float],
) -> None:
    name, _, variant = case.partition("+")
    name = name.removesuffix("[N,T]")
    kl_coef = kl_coef if variant == "kl" else 0.0
    if name == "cispo" and eps is not None and eps[0] > 0.5:
        eps = (None, eps[1])  # CISPO's paper form: no lower bound
    if name.startswith("sapo"):
        eps = None
    recipe, spec = build(name, eps=eps, kl_coef=kl_coef, taus=taus)
    adv = batch.token_advantages if case.endswith("[N,T]") else batch.advantages
    ref_lp = torch.where(
        batch.mask, batch.log_probs + ref_shift * torch.sin(batch.log_probs), batch.log_probs
    )
    expected = reference(spec, batch.log_probs, batch.old_log_probs, adv, batch.mask, ref_lp)
    assume(far_from_edges(expected, spec, batch.mask))
    loss, grad, _ = run(
        recipe, batch.log_probs, batch.old_log_probs, adv, batch.mask, ref_lp if kl_coef else None
    )
    assert loss.dtype == F64
    assert_close(loss, expected.loss, expected.loss_scale, f"{name} loss")
    assert_close(grad, expected.grad, expected.grad_scale, f"{name} grad")
    assert torch.equal(grad[~batch.mask], torch.zeros_like(grad[~batch.mask]))
    assert torch.equal(clip_mask(recipe, batch, adv), expected.clipped)


# ---------------------------------------------------------------------------------------------
# Property 1: GSPO-token ≡ GSPO when Â_{i,t} = Â_i
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
@PER_CASE
@given(batch=policy_batches(), eps=st.one_of(st.none(), eps_pairs))
def test_gspo_token_equals_gspo_recipes(
    aggregation: str, batch: PolicyBatch, eps: tuple[float, float] | None
) -> None:
    seq, spec = build("gspo", eps=eps, aggregation=aggregation)
    tok, _ = build("gspo_token", eps=eps, aggregation=aggregation)
    expected = reference(spec, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    assume(far_from_edges(expected, spec, batch.mask))
    loss_s, grad_s, out_s = run(seq, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    clipped_s = clip_mask(seq, batch)
    for adv in (batch.advantages, row_advantages(batch)):  # [N], and [N, T] equal along each row
        loss_t, grad_t, out_t = run(tok, batch.log_probs, batch.old_log_probs, adv, batch.mask)
        assert torch.equal(loss_t, loss_s), "GSPO-token's value must equal GSPO's bit for bit"
        assert torch.equal(clip_mask(tok, batch, adv), clipped_s)
        assert torch.equal(out_t["clip_fraction"], out_s["clip_fraction"])
        assert_close(grad_t, grad_s, grad_s.abs(), "GSPO-token grad vs GSPO grad")
        assert_close(grad_t, expected.grad, expected.grad_scale, "GSPO-token grad vs reference")
    assert_close(loss_s, expected.loss, expected.loss_scale, "GSPO loss vs reference")
    assert_close(grad_s, expected.grad, expected.grad_scale, "GSPO grad vs reference")
    assert torch.equal(clipped_s, expected.clipped)


@given(batch=policy_batches(), eps=eps_pairs)
def test_gspo_token_equals_gspo_pure_functions(batch: PolicyBatch, eps: tuple[float, float]) -> None:
    eps_low, eps_high = eps
    spec = Spec("sequence", "ppo", eps_low, eps_high, "seq-mean-token-mean")
    expected = reference(spec, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    assume(far_from_edges(expected, spec, batch.mask))
    results = []
    for ratio_fn, adv in (
        (sequence_log_ratio, batch.advantages),
        (sequence_token_log_ratio, row_advantages(batch)),
    ):
        x = batch.log_probs.clone().requires_grad_(True)
        log_ratio = ratio_fn(x, batch.old_log_probs, batch.mask)
        token_loss, clipped = ppo_clip_loss(log_ratio, adv, batch.mask, eps_low=eps_low, eps_high=eps_high)
        loss, _ = objective_loss(token_loss, batch.mask)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((log_ratio.detach(), token_loss.detach(), clipped, loss.detach(), grad))
    (lr_s, tl_s, c_s, loss_s, grad_s), (lr_t, tl_t, c_t, loss_t, grad_t) = results
    assert torch.equal(lr_t, lr_s), "log s_{i,t} must equal log s_i bit for bit"
    assert torch.equal(tl_t, tl_s)
    assert torch.equal(c_t, c_s)
    assert torch.equal(c_s, expected.clipped)
    assert torch.equal(loss_t, loss_s)
    assert_close(loss_s, expected.loss, expected.loss_scale, "loss vs reference")
    assert_close(grad_t, grad_s, grad_s.abs(), "GSPO-token grad vs GSPO grad")
    assert_close(grad_s, expected.grad, expected.grad_scale, "GSPO grad vs reference")
    assert_close(grad_t, expected.grad, expected.grad_scale, "GSPO-token grad vs reference")


# ---------------------------------------------------------------------------------------------
# Property 2: on-policy, every objective's gradient is (1/G) Σ_i Â_i (1/L_i) Σ_t ∇ℓ_{i,t}
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*ALL_RECIPES, "gspo_token[N,T]"])
@PER_CASE
@given(batch=policy_batches(), eps=eps_pairs, cispo_low=st.booleans(), taus=taus)
def test_on_policy_gradient_is_the_policy_gradient(
    name: str, batch: PolicyBatch, eps: tuple[float, float], cispo_low: bool, taus: tuple[float, float]
) -> None:
    adv = batch.advantages
    if name == "gspo_token[N,T]":
        name, adv = "gspo_token", batch.token_advantages
    if name == "cispo" and not cispo_low:
        eps = (None, eps[1])
    recipe, _ = build(
        name, eps=None if name.startswith("sapo") else eps, aggregation="seq-mean-token-mean", taus=taus
    )
    loss, grad, out = run(recipe, batch.log_probs, None, adv, batch.mask)
    g = batch.n
    lengths = batch.lengths.to(F64).unsqueeze(-1)
    adv_t = adv.unsqueeze(-1).expand_as(grad) if adv.dim() == 1 else adv
    expected = torch.where(batch.mask, -adv_t.to(F64) / (g * lengths), torch.zeros((), dtype=F64))
    assert_close(grad, expected, expected.abs(), f"on-policy {name} grad")
    assert torch.equal(grad[~batch.mask], torch.zeros_like(grad[~batch.mask]))
    assert float(out["clip_fraction"]) == 0.0, "nothing is clipped on-policy, whatever the clip range"
    if not name.startswith("sapo"):  # on-policy J_t = Â (SAPO's gate value is (2/τ)·Â instead)
        terms = [
            -float(a) / (g * int(n))
            for row, n in zip(adv_t, batch.lengths, strict=True)
            for a in row[: int(n)]
        ]
        assert_close(loss, math.fsum(terms), math.fsum(abs(t) for t in terms), f"on-policy {name} loss")


# ---------------------------------------------------------------------------------------------
# Property 3: constant ratio per sequence, or every L_i = 1: GRPO ≡ GSPO
# ---------------------------------------------------------------------------------------------


def _check_grpo_equals_gspo(batch: PolicyBatch, eps: tuple[float, float]) -> None:
    r_grpo, spec_grpo = build("grpo", eps=eps)
    r_gspo, spec_gspo = build("gspo", eps=eps)
    ref_grpo = reference(spec_grpo, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    ref_gspo = reference(spec_gspo, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    assume(
        far_from_edges(ref_grpo, spec_grpo, batch.mask) and far_from_edges(ref_gspo, spec_gspo, batch.mask)
    )
    loss_a, grad_a, _ = run(r_grpo, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    loss_b, grad_b, _ = run(r_gspo, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    assert_close(loss_a, loss_b, ref_gspo.loss_scale, "GRPO loss vs GSPO loss")
    assert_close(grad_a, grad_b, grad_b.abs(), "GRPO grad vs GSPO grad")
    assert_close(loss_b, ref_gspo.loss, ref_gspo.loss_scale, "GSPO loss vs reference")
    assert_close(grad_a, ref_gspo.grad, ref_gspo.grad_scale, "GRPO grad vs GSPO reference")
    assert torch.equal(clip_mask(r_grpo, batch), clip_mask(r_gspo, batch))


@given(batch=policy_batches(per_sequence_shift=True), eps=eps_pairs)
def test_grpo_equals_gspo_with_constant_ratio_per_sequence(
    batch: PolicyBatch, eps: tuple[float, float]
) -> None:
    _check_grpo_equals_gspo(batch, eps)


@given(batch=policy_batches(all_length_one=True), eps=eps_pairs)
def test_grpo_equals_gspo_with_length_one_responses(batch: PolicyBatch, eps: tuple[float, float]) -> None:
    _check_grpo_equals_gspo(batch, eps)


# ---------------------------------------------------------------------------------------------
# Properties 4 and 5: GSPO's clipped rows, unclipped rows, strict edges
# ---------------------------------------------------------------------------------------------


@given(batch=policy_batches(), eps=st.one_of(st.none(), eps_pairs))
def test_gspo_clipped_rows_have_exactly_zero_gradient(
    batch: PolicyBatch, eps: tuple[float, float] | None
) -> None:
    recipe, spec = build("gspo", eps=eps)
    expected = reference(spec, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    assume(far_from_edges(expected, spec, batch.mask))
    _, grad, _ = run(recipe, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    clipped = clip_mask(recipe, batch)
    for i in range(batch.n):
        m = batch.mask[i]
        row_clipped = bool(expected.clipped[i, 0])  # C_i, the reference's decision
        assert bool((clipped[i][m] == row_clipped).all()), (
            f"row {i}: a sequence is clipped whole or not at all"
        )
        if row_clipped or float(batch.advantages[i]) == 0.0:
            assert torch.equal(grad[i], torch.zeros_like(grad[i])), (
                f"row {i}: clipped, gradient must be exactly 0"
            )
        else:
            assert bool((grad[i][m] != 0).all()), (
                f"row {i}: unclipped with Â≠0 needs a gradient on every token"
            )
    assert_close(grad, expected.grad, expected.grad_scale, "GSPO grad vs reference")


@given(batch=policy_batches(), eps=st.one_of(st.none(), eps_pairs))
def test_gspo_wrong_side_rows_keep_their_gradient(
    batch: PolicyBatch, eps: tuple[float, float] | None
) -> None:
    """Give each row the advantage sign that makes its ratio 'wrong side' (Â>0 with s<1, Â<0 with
    s>1): min(sÂ, clip(s)Â) then picks sÂ, so no row is clipped, even far outside the band."""
    recipe, spec = build("gspo", eps=eps)
    s = reference(spec, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask).seq_ratio
    adv = torch.where(s < 1, batch.advantages.abs() + 0.5, -batch.advantages.abs() - 0.5)
    expected = reference(spec, batch.log_probs, batch.old_log_probs, adv, batch.mask)
    assume(far_from_edges(expected, spec, batch.mask))
    assert not bool(expected.clipped.any())
    _, grad, _ = run(recipe, batch.log_probs, batch.old_log_probs, adv, batch.mask)
    assert not bool(clip_mask(recipe, batch, adv).any())
    assert bool((grad[batch.mask] != 0).all())
    assert_close(grad, expected.grad, expected.grad_scale, "wrong-side GSPO grad vs reference")


def _exact_log(target: float, shape: tuple[int, int]) -> float:
    """A float64 x whose torch.exp is exactly ``target`` at every position of a tensor of this
    shape (the clipper's exp runs on the whole [N, T] log-ratio), searched among log(target)'s
    neighbours."""
    x0 = math.log(target)
    candidates = [x0]
    up = down = x0
    for _ in range(256):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    for x in candidates:
        if bool((torch.exp(torch.full(shape, x, dtype=F64)) == target).all()):
            return x
    raise AssertionError(f"no float64 x with exp(x) == {target!r} exactly near log(target)")


@pytest.mark.parametrize("side", ["high", "low"])
@pytest.mark.parametrize("beyond", [False, True])
@PER_CASE
@given(
    batch=policy_batches(max_n=4, max_len=16),
    eps_low=st.one_of(st.sampled_from([0.0, 3e-4, 0.2]), st.floats(0.0, 0.45)),
    eps_high=st.one_of(st.sampled_from([0.0, 4e-4, 0.2, 0.28]), st.floats(0.0, 0.5)),
    log2_len=st.integers(0, 6),
    adv_mag=st.floats(0.01, 10.0),
)
def test_clip_edges_are_strict(
    side: str,
    beyond: bool,
    batch: PolicyBatch,
    eps_low: float,
    eps_high: float,
    log2_len: int,
    adv_mag: float,
) -> None:
    """A ratio exactly at 1+ε_high with Â>0 (or at 1−ε_low with Â<0) is NOT clipped; the next float
    beyond the edge is. Row 0 is built so that its geometric mean is the edge exactly: its token
    log-ratios are [L·x, 0, …, 0] with L a power of two, so the row sum and the mean are exact."""
    length = 2**log2_len
    width = max(length, batch.mask.shape[1])
    n = batch.n + 1
    edge = 1.0 + eps_high if side == "high" else 1.0 - eps_low
    target = math.nextafter(edge, math.inf if side == "high" else 0.0) if beyond else edge
    x = _exact_log(target, (n, width))
    sign = 1.0 if side == "high" else -1.0

    def widen(t: torch.Tensor, row: list[float], fill: float) -> torch.Tensor:
        t = torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype)], dim=1)
        return torch.cat([torch.tensor([row], dtype=t.dtype), t])

    pad = [batch.garbage] * (width - length)
    lp = widen(batch.log_probs, [length * x] + [0.0] * (length - 1) + pad, batch.garbage)
    old = widen(batch.old_log_probs, [0.0] * length + pad, batch.garbage)
    mask = torch.cat(
        [
            (torch.arange(width) < length).unsqueeze(0),
            torch.cat([batch.mask, torch.zeros(batch.n, width - batch.mask.shape[1], dtype=torch.bool)], 1),
        ]
    )
    adv = torch.cat([torch.tensor([sign * adv_mag], dtype=F64), batch.advantages])
    recipe, _ = build("gspo", eps=(eps_low, eps_high))
    assert float(sequence_mean_log_ratio(lp, old, mask)[0]) == x, "row 0's mean log-ratio must be x exactly"
    _, grad, _ = run(recipe, lp, old, adv, mask)
    with torch.no_grad():
        clipped = recipe.loss.clipper(recipe.loss.weighter(make_td(lp, old, adv, mask)))["clipped"]
    assert bool((clipped[0, :length] == beyond).all()), (
        f"s = {target!r} at edge {edge!r}: clipped must be {beyond}"
    )
    if beyond:
        assert torch.equal(grad[0], torch.zeros_like(grad[0]))
    else:  # ∂loss/∂ℓ_{0,t} = −Â s / (G L), not 0
        want = torch.full((length,), -sign * adv_mag * target / (n * length), dtype=F64)
        assert_close(grad[0, :length], want, want.abs(), "gradient at the edge")
        assert bool((grad[0, :length] != 0).all())
    # The token-level pure function at the same exact edge, w = exp(x) at row 0's first token.
    log_ratio = torch.where(mask, torch.zeros((), dtype=F64), torch.full((), batch.garbage, dtype=F64))
    log_ratio[0, 0] = x
    log_ratio.requires_grad_(True)
    token_loss, token_clipped = ppo_clip_loss(log_ratio, adv, mask, eps_low=eps_low, eps_high=eps_high)
    assert bool(token_clipped[0, 0]) == beyond
    (g,) = torch.autograd.grad(token_loss[0, 0], log_ratio)
    assert float(g[0, 0]) == (0.0 if beyond else -sign * adv_mag * target)


@given(batch=policy_batches(), eps=st.one_of(st.none(), eps_pairs))
def test_gspo_unclipped_row_gradient_is_uniform(batch: PolicyBatch, eps: tuple[float, float] | None) -> None:
    """∂J/∂ℓ_{i,t} = Â_i s_i / (G L_i), the same float for every valid t of an unclipped row."""
    recipe, spec = build("gspo", eps=eps)
    expected = reference(spec, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    assume(far_from_edges(expected, spec, batch.mask))
    _, grad, _ = run(recipe, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    for i in range(batch.n):
        if bool(expected.clipped[i, 0]):
            continue
        m, length = batch.mask[i], int(batch.lengths[i])
        row = grad[i][m]
        assert torch.equal(row, row[:1].expand_as(row)), f"row {i}: every token must get the same weight"
        want = -float(batch.advantages[i]) * float(expected.seq_ratio[i]) / (batch.n * length)
        assert_close(row[0], want, abs(want), f"row {i}: Â s / (G L)")


# ---------------------------------------------------------------------------------------------
# Property 6: GSPO sees ℓ^old only through Σ_t ℓ^old_{i,t}
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
@pytest.mark.parametrize("how", ["permute", "zero-sum"])
@PER_CASE
@given(
    batch=policy_batches(),
    eps=st.one_of(st.none(), eps_pairs),
    seed=st.integers(0, 2**31 - 1),
    size=st.sampled_from([1e-3, 1.0, 10.0]),
)
def test_gspo_depends_on_old_log_probs_only_through_row_sum(
    name: str, how: str, batch: PolicyBatch, eps: tuple[float, float] | None, seed: int, size: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    moved = batch.old_log_probs.clone()
    for i in range(batch.n):
        m = batch.mask[i]
        vals = batch.old_log_probs[i][m]
        if how == "permute":
            moved[i, m] = vals[torch.randperm(vals.numel(), generator=gen)]
        else:
            d = torch.randn(vals.numel(), generator=gen, dtype=F64) * size
            moved[i, m] = vals + (d - d.mean())
    recipe, spec = build(name, eps=eps)
    expected = reference(spec, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    assume(far_from_edges(expected, spec, batch.mask))
    loss_a, grad_a, _ = run(recipe, batch.log_probs, batch.old_log_probs, batch.advantages, batch.mask)
    loss_b, grad_b, _ = run(recipe, batch.log_probs, moved, batch.advantages, batch.mask)
    assert_close(loss_b, loss_a, expected.loss_scale, "loss after moving ℓ^old within rows")
    assert_close(grad_b, grad_a, grad_a.abs(), "grad after moving ℓ^old within rows")
    assert torch.equal(clip_mask(recipe, batch), expected.clipped)


# ---------------------------------------------------------------------------------------------
# Property 7: min_t w ≤ s_i ≤ max_t w and s_i ≤ mean_t w
# ---------------------------------------------------------------------------------------------


@given(batch=policy_batches())
def test_sequence_ratio_is_a_geometric_mean(batch: PolicyBatch) -> None:
    log_s = sequence_mean_log_ratio(batch.log_probs, batch.old_log_probs, batch.mask)
    broadcast = sequence_log_ratio(batch.log_probs, batch.old_log_probs, batch.mask)
    slack = 1e-12  # a few ulps of rounding in the mean (L equal ratios)
    for i in range(batch.n):
        m = batch.mask[i]
        w = torch.exp(batch.log_probs[i][m] - batch.old_log_probs[i][m])
        s = math.exp(float(log_s[i]))
        assert float(w.min()) * (1 - slack) <= s <= float(w.max()) * (1 + slack)
        assert s <= math.fsum(w.tolist()) / w.numel() * (1 + slack), "AM–GM"
        want = math.fsum((batch.log_probs[i][m] - batch.old_log_probs[i][m]).tolist()) / w.numel()
        assert abs(float(log_s[i]) - want) <= 1e-13 * (1 + abs(want))
        assert torch.equal(broadcast[i][m], log_s[i].expand(int(m.sum())))
    assert torch.equal(broadcast[~batch.mask], torch.zeros_like(broadcast[~batch.mask]))


# ---------------------------------------------------------------------------------------------
# Property 8: padding holds anything
# ---------------------------------------------------------------------------------------------

PADDING_CASES = (*ALL_RECIPES, "gspo_token[N,T]", "grpo+kl")


@pytest.mark.parametrize("name", PADDING_CASES)
@PER_CASE
@given(batch=policy_batches(), garbage=st.tuples(*[st.sampled_from(GARBAGE)] * 4))
def test_padding_never_matters(name: str, batch: PolicyBatch, garbage: tuple[float, ...]) -> None:
    m = batch.mask
    zero = torch.zeros((), dtype=F64)

    def fill(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.where(m, t, torch.full((), value, dtype=t.dtype))

    ref_lp = torch.where(m, batch.log_probs + 0.3 * torch.cos(batch.log_probs * 7), zero)
    adv = batch.advantages
    kl_coef = 0.0
    if name == "gspo_token[N,T]":
        name, adv = "gspo_token", fill(batch.token_advantages, 0.0)
    if name == "grpo+kl":
        name, kl_coef = "grpo", 0.1
    recipe, _ = build(name, kl_coef=kl_coef)
    lp, old = fill(batch.log_probs, 0.0), fill(batch.old_log_probs, 0.0)
    clean = run(recipe, lp, old, adv, m, ref_lp if kl_coef else None)
    dirty_adv = fill(adv, garbage[3]) if adv.dim() == 2 else adv
    dirty = run(
        recipe,
        fill(lp, garbage[0]),
        fill(old, garbage[1]),
        dirty_adv,
        m,
        fill(ref_lp, garbage[2]) if kl_coef else None,
    )
    for out in (clean, dirty):
        assert bool(torch.isfinite(out[0])) and bool(torch.isfinite(out[1]).all())
        assert torch.equal(out[1][~m], torch.zeros_like(out[1][~m])), "gradient at padding must be exactly 0"
    assert torch.equal(dirty[0], clean[0]), "loss changed with padding content"
    assert torch.equal(dirty[1], clean[1]), "gradient changed with padding content"
    for key in clean[2].keys():
        assert torch.equal(dirty[2][key], clean[2][key]), f"metric {key} changed with padding content"


# ---------------------------------------------------------------------------------------------
# Property 10: identical rewards in a group give exactly zero policy gradient
# ---------------------------------------------------------------------------------------------

REWARD_VALUES = (0.0, 1.0, 0.1, -2.5, 1.0 / 3.0, 1e6, -7.3e-5, 123456.789)


@pytest.mark.parametrize("name", ALL_RECIPES)
@PER_CASE
@given(batch=policy_batches(), data=st.data())
def test_constant_group_rewards_give_exactly_zero_gradient(
    name: str, batch: PolicyBatch, data: st.DataObject
) -> None:
    ids = data.draw(
        st.lists(st.integers(-1000, 1000), min_size=1, max_size=batch.n, unique=True), label="ids"
    )
    group_ids = torch.tensor(
        data.draw(st.lists(st.sampled_from(ids), min_size=batch.n, max_size=batch.n), label="groups")
    )
    values = {
        g: data.draw(st.one_of(st.sampled_from(REWARD_VALUES), st.floats(-1e6, 1e6)), label=f"r{g}")
        for g in ids
    }
    rewards = torch.tensor([values[int(g)] for g in group_ids], dtype=F64)
    recipe, _ = build(name)
    td = recipe.advantage(TensorDict({"rewards": rewards, "group_ids": group_ids}, batch_size=[batch.n]))
    adv = td["advantages"]
    assert torch.equal(adv, torch.zeros_like(adv)), "a constant group's advantage must be exactly 0"
    loss, grad, _ = run(recipe, batch.log_probs, batch.old_log_probs, adv, batch.mask)
    assert torch.equal(grad, torch.zeros_like(grad)), (
        f"{name}: constant groups must give exactly zero gradient"
    )
    assert float(loss) == 0.0


# ---------------------------------------------------------------------------------------------
# Property 11: ∇J(cÂ) = c·∇J(Â), c > 0
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*ALL_RECIPES, "gspo_token[N,T]"])
@PER_CASE
@given(
    batch=policy_batches(),
    c=st.one_of(st.sampled_from([0.5, 2.0, 1e-3, 1e3]), st.floats(1e-4, 1e4)),
    eps=st.one_of(st.none(), eps_pairs),
)
def test_gradient_is_linear_in_advantage_scale(
    name: str, batch: PolicyBatch, c: float, eps: tuple[float, float] | None
) -> None:
    adv = batch.advantages
    if name == "gspo_token[N,T]":
        name, adv = "gspo_token", batch.token_advantages
    if name.startswith("sapo"):
        eps = None
    if name == "cispo" and eps is not None:
        eps = (None, eps[1])
    recipe, spec = build(name, eps=eps)
    expected = reference(spec, batch.log_probs, batch.old_log_probs, adv, batch.mask)
    assume(far_from_edges(expected, spec, batch.mask))
    loss_1, grad_1, _ = run(recipe, batch.log_probs, batch.old_log_probs, adv, batch.mask)
    loss_c, grad_c, _ = run(recipe, batch.log_probs, batch.old_log_probs, c * adv, batch.mask)
    assert_close(grad_c, c * grad_1, c * expected.grad_scale, f"{name}: ∇J(cÂ) vs c∇J(Â)")
    assert_close(loss_c, c * loss_1, c * expected.loss_scale, f"{name}: J(cÂ) vs cJ(Â)")
    assert torch.equal(clip_mask(recipe, batch, c * adv), clip_mask(recipe, batch, adv))


# ---------------------------------------------------------------------------------------------
# Property 14: half-precision inputs
# ---------------------------------------------------------------------------------------------

HALF = (torch.bfloat16, torch.float16)
HALF_MARGIN = 1e-5  # float32 ratios: a 64-token fp32 row sum of log-ratios up to ~25 is off by ≲1e-6


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["grpo", "gspo", "gspo_token", "dapo", "cispo"])
@PER_CASE
@given(data=st.data(), adv_dtype=st.sampled_from(["same", "float32"]), eps=st.one_of(st.none(), eps_pairs))
def test_half_precision_inputs_compute_in_float32(
    dtype: torch.dtype, name: str, data: st.DataObject, adv_dtype: str, eps: tuple[float, float] | None
) -> None:
    batch = data.draw(policy_batches(dtype=dtype), label="batch")
    adv = batch.advantages if adv_dtype == "same" else batch.advantages.float()
    lp, old, m = batch.log_probs, batch.old_log_probs, batch.mask
    for fn in (token_log_ratio, sequence_log_ratio, sequence_token_log_ratio):
        log_ratio = fn(lp, old, m)
        assert log_ratio.dtype == torch.float32, f"{fn.__name__} returned {log_ratio.dtype}"
        token_loss, _ = ppo_clip_loss(log_ratio, adv, m)
        assert token_loss.dtype == torch.float32
        loss, _ = objective_loss(token_loss, m)
        assert loss.dtype == torch.float32
    if name == "cispo" and eps is not None:
        eps = (None, eps[1])
    recipe, spec = build(name, eps=eps)
    expected = reference(spec, lp.to(F64), old.to(F64), adv.to(F64), m)  # same inputs, upcast
    assume(far_from_edges(expected, spec, m, HALF_MARGIN))
    loss, grad, out = run(recipe, lp, old, adv, m)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and bool(torch.isfinite(loss))
    # The gradient lands in the leaf's half type: float32 accuracy, then one rounding (overflow to
    # ±inf where the true value is beyond the type's range, e.g. Â·e^20/(G L) in float16).
    info = torch.finfo(dtype)
    want = expected.grad.to(dtype).to(F64)
    got = grad.to(F64)
    overflow = (want.abs() >= info.max) & (got.abs() >= info.max) & (torch.sign(got) == torch.sign(want))
    near = (got - want).abs() <= 2 * info.eps * want.abs() + info.tiny * info.eps
    assert bool((overflow | near).all()), "half-input gradient vs float64 reference"
    assert torch.equal(clip_mask(recipe, batch, adv), expected.clipped), "clip decisions differ from float64"
    assert_close(
        loss, expected.loss, expected.loss_scale, "half-input loss vs float64", rtol=1e-5, atol_rel=1e-6
    )
    assert out["clip_fraction"].dtype == torch.float32


def _binade_values(units: list[int], dtype: torch.dtype) -> torch.Tensor:
    """−(2^-5 + k·u) for integers k, with u the spacing of ``dtype`` in [2^-5, 2^-4): exact."""
    u = 2.0**-5 * torch.finfo(dtype).eps
    return torch.tensor([-(2.0**-5 + k * u) for k in units], dtype=dtype)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@settings(max_examples=100)
@given(data=st.data(), positive=st.booleans(), n=st.integers(1, 4))
def test_half_precision_clip_decisions_near_the_gspo_band(
    dtype: torch.dtype, data: st.DataObject, positive: bool, n: int
) -> None:
    """Half-precision log-probs whose exact ratios sit just inside and outside [1−3e-4, 1+4e-4]:
    the library's GSPO decisions equal float64's on the same values, although a half-precision
    ratio could not land inside the band at all."""
    steps = round(1 / torch.finfo(dtype).eps)  # the binade [2^-5, 2^-4) holds this many values
    reach = {torch.bfloat16: 4, torch.float16: 30}[dtype]  # ±2·band in units of the spacing
    rows_lp, rows_old, lengths = [], [], []
    for _ in range(n):
        length = data.draw(st.integers(1, 8))
        a = data.draw(st.lists(st.integers(reach, steps - reach - 1), min_size=length, max_size=length))
        d = data.draw(st.lists(st.integers(-reach, reach), min_size=length, max_size=length))
        rows_lp.append([*a, *([0] * (8 - length))])
        rows_old.append([*(ai + di for ai, di in zip(a, d, strict=True)), *([0] * (8 - length))])
        lengths.append(length)
    lp = torch.stack([_binade_values(r, dtype) for r in rows_lp])
    old = torch.stack([_binade_values(r, dtype) for r in rows_old])
    mask = torch.arange(8).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    adv = torch.full((n,), 1.0 if positive else -1.0, dtype=torch.float32)
    recipe, spec = build("gspo")
    expected = reference(spec, lp.to(F64), old.to(F64), adv.to(F64), mask)
    assume(far_from_edges(expected, spec, mask, 1e-6))
    with torch.no_grad():
        clipped = recipe.loss.clipper(recipe.loss.weighter(make_td(lp, old, adv, mask)))["clipped"]
    assert torch.equal(clipped, expected.clipped)
    # The motivation: a ratio formed in the half type is 1.0 or outside the band, never inside it.
    naive = torch.exp((lp - old).to(dtype))
    inside = (naive > 1 - 3e-4) & (naive < 1 + 4e-4)
    assert torch.equal(naive[inside], torch.ones_like(naive[inside]))


def test_bf16_cannot_hold_the_gspo_band_but_the_library_decides_right() -> None:
    """In bf16, 1 + 2e-4 is 1.0 and the GSPO band [1−3e-4, 1+4e-4] holds only 1.0; a ratio of
    1+2·2^-12 ≈ 1.000488 formed in bf16 reads 1.0 (not clipped), yet it is above 1+4e-4. The
    library computes in float32 and clips it; it leaves 1+2^-12 ≈ 1.000244 (inside) unclipped."""
    bf16 = torch.bfloat16
    assert torch.tensor(1 + 2e-4, dtype=bf16).item() == 1.0
    one = torch.tensor(1.0, dtype=bf16)
    above = torch.nextafter(one, torch.tensor(2.0, dtype=bf16)).item()
    below = torch.nextafter(one, torch.tensor(0.0, dtype=bf16)).item()
    assert above > 1 + 4e-4 and below < 1 - 3e-4, "bf16 holds no value of the band but 1.0"
    lp = _binade_values([100, 100], bf16).unsqueeze(-1)  # two rows, one token each
    old = _binade_values([102, 101], bf16).unsqueeze(-1)  # ℓ − ℓ^old = 2·2^-12, 1·2^-12
    mask = torch.ones(2, 1, dtype=torch.bool)
    adv = torch.ones(2)
    naive = torch.exp(lp - old)
    assert naive[0].item() == 1.0 and naive[1].item() == 1.0, "in bf16 both ratios round to 1.0"
    exact = torch.exp(lp.double() - old.double())
    assert exact[0].item() > 1 + 4e-4 > exact[1].item() > 1.0
    recipe = gspo()
    clipped = recipe.loss.clipper(recipe.loss.weighter(make_td(lp, old, adv, mask)))["clipped"]
    assert clipped[:, 0].tolist() == [True, False]
    _, grad, _ = run(recipe, lp, old, adv, mask)
    assert grad[0, 0].item() == 0.0 and grad[1, 0].item() != 0.0
