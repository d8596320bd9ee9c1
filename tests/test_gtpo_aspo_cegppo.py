"""GTPO (arXiv 2508.03772), ASPO (arXiv 2510.06062) and CE-GPPO (arXiv 2509.20712) against
independent float64 references written from the formulas in their module docstrings
(gspo_components/loss/algorithms/{gtpo,aspo,ce_gppo}.py, themselves from the official code: no
trainer implements them, so there is no parity target).

For each: loss value and gradient w.r.t. ℓ equal a plain-loop reference (per-token value and
analytic per-token gradient, then the recipe's aggregation); garbage (NaN, ±inf) at padding is
inert; bad hyper-parameters and inputs are ValueErrors naming the argument. Besides:

- CE-GPPO with β₁ = β₂ = 1 (GPPO) has the value of PPO's clip with the dual clip, and gradients
  where PPO has none;
- ASPO's positive tokens are weighted by 1/r (the flipped ratio), cut at r ≥ 1 + ε;
- GTPO's conflict weights on a hand-made group (shared prefix and suffix of positive and negative
  completions).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import PolicyBatch, policy_batches
from tensordict import TensorDict

from gspo_components.loss.algorithms.aspo import ASPOClip, aspo
from gspo_components.loss.algorithms.ce_gppo import CEGPPOClip, ce_gppo
from gspo_components.loss.algorithms.gtpo import GTPOConflictFilter, GTPOEntropyShaping, gtpo
from gspo_components.loss.recipes import grpo

SMALL = {"max_n": 6, "max_len": 12, "max_log_ratio": 2.0}


def loss_and_grad(recipe, batch: PolicyBatch, **extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = batch.log_probs.clone().requires_grad_(True)
    td = TensorDict(
        {"log_probs": lp, "old_log_probs": batch.old_log_probs, "response_mask": batch.mask, **extra},
        batch_size=[batch.n],
    )
    if "advantages" not in extra:
        td["advantages"] = batch.advantages
    out = recipe.loss(td)
    loss = out[recipe.loss.out_key("loss")]
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def token_mean(values: list[list[float]], grads: list[list[float]], batch: PolicyBatch):
    """Σ L / Σ m and its gradient, in float64, as [N, T] (0 at padding)."""
    total = sum(int(x) for x in batch.lengths)
    grad = torch.zeros(batch.mask.shape, dtype=torch.float64)
    for i, row in enumerate(grads):
        for t, g in enumerate(row):
            grad[i, t] = g / total
    return torch.tensor(math.fsum(v for row in values for v in row) / total, dtype=torch.float64), grad


def assert_close(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    assert bool(torch.isfinite(got[1]).all())  # nothing leaks from the padding


# ---------------------------------------------------------------------------------------------
# CE-GPPO


def ce_gppo_reference(batch: PolicyBatch, adv_of, eps_low, eps_high, beta1, beta2, c):
    values, grads = [], []
    for i in range(batch.n):
        vrow, grow = [], []
        for t in range(int(batch.lengths[i])):
            rho = float(batch.log_probs[i, t]) - float(batch.old_log_probs[i, t])
            r, a = math.exp(rho), adv_of(i, t)
            if r < 1 - eps_low and a < 0:
                v, g = -beta1 * (1 - eps_low) * a, -beta1 * (1 - eps_low) * a
            elif r > 1 + eps_high and a > 0:
                v, g = -beta2 * (1 + eps_high) * a, -beta2 * (1 + eps_high) * a
            else:
                v, g = -r * a, -r * a
            if c is not None and a < 0 and v > -c * a:
                v, g = -c * a, 0.0
            vrow.append(v)
            grow.append(g)
        values.append(vrow)
        grads.append(grow)
    return token_mean(values, grads, batch)


@settings(max_examples=60)
@given(
    batch=policy_batches(**SMALL),
    per_token=st.booleans(),
    params=st.sampled_from(
        [(0.2, 0.28, 0.75, 1.0, 3.0), (0.1, 0.1, 0.5, 2.0, None), (0.3, 0.2, 1.0, 1.0, 1.5)]
    ),
)
def test_ce_gppo_matches_reference(batch: PolicyBatch, per_token: bool, params: tuple) -> None:
    eps_low, eps_high, beta1, beta2, c = params
    recipe = ce_gppo(eps_low=eps_low, eps_high=eps_high, beta1=beta1, beta2=beta2, dual_clip=c)
    if per_token:
        got = loss_and_grad(recipe, batch, advantages=batch.token_advantages)
        want = ce_gppo_reference(batch, lambda i, t: float(batch.token_advantages[i, t]), *params)
    else:
        got = loss_and_grad(recipe, batch)
        want = ce_gppo_reference(batch, lambda i, t: float(batch.advantages[i]), *params)
    assert_close(got, want)


@settings(max_examples=40)
@given(batch=policy_batches(**SMALL))
def test_gppo_has_ppo_value_with_gradients(batch: PolicyBatch) -> None:
    """β₁ = β₂ = 1: the value of PPO's clip (dual clip 3); the gradient differs exactly at clipped tokens."""
    loss, grad = loss_and_grad(ce_gppo(eps_low=0.2, eps_high=0.2, beta1=1.0, beta2=1.0), batch)
    ppo_loss, ppo_grad = loss_and_grad(
        grpo(eps_low=0.2, eps_high=0.2, dual_clip=3.0, aggregation="token-mean"), batch
    )
    torch.testing.assert_close(loss, ppo_loss, rtol=1e-12, atol=1e-14)
    r = torch.exp(batch.log_probs - batch.old_log_probs)
    a = batch.advantages[:, None]
    clipped = batch.mask & (((r < 0.8) & (a < 0)) | ((r > 1.2) & (a > 0)))
    assert bool((ppo_grad[clipped] == 0).all())
    torch.testing.assert_close(grad[~clipped], ppo_grad[~clipped], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps_low": 1.0}, "'eps_low' must be a finite number > 0.0 and < 1.0"),
        ({"eps_high": 0.0}, "'eps_high'"),
        ({"beta1": -0.1}, "'beta1'"),
        ({"beta2": float("nan")}, "'beta2'"),
        ({"dual_clip": 1.0}, "'dual_clip'"),
    ],
)
def test_ce_gppo_bad_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CEGPPOClip(**kwargs)


# ---------------------------------------------------------------------------------------------
# ASPO


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def aspo_reference(batch: PolicyBatch, entropy: torch.Tensor, eps, eps_h, c, q):
    values, grads = [], []
    for i in range(batch.n):
        length = int(batch.lengths[i])
        h = [float(entropy[i, t]) for t in range(length)]
        threshold = quantile(h, q)
        a = float(batch.advantages[i])
        vrow, grow = [], []
        for t in range(length):
            ell = float(batch.log_probs[i, t])
            r = math.exp(ell - float(batch.old_log_probs[i, t]))
            e = eps if h[t] <= threshold else eps_h
            if a < 0:
                cm = max(r, 1 - e)
                if cm > c:
                    v, g = -a * c * ell, -a * c
                else:
                    v, g = -a * cm, (-a * r if r > 1 - e else 0.0)
            else:
                cp = min(r, 1 + e)
                if 1 / cp > c:
                    v, g = -a * c * ell, -a * c
                else:
                    v, g = -a / cp, (-a / r if r < 1 + e else 0.0)
            vrow.append(v)
            grow.append(g)
        values.append(vrow)
        grads.append(grow)
    return token_mean(values, grads, batch)


@settings(max_examples=60)
@given(
    batch=policy_batches(**SMALL),
    seed=st.integers(0, 2**31 - 1),
    params=st.sampled_from([(0.2, 0.4, 3.0, 0.8), (0.1, 0.3, 2.0, 0.5), (0.2, 0.2, 1.5, 1.0)]),
)
def test_aspo_matches_reference(batch: PolicyBatch, seed: int, params: tuple) -> None:
    eps, eps_h, c, q = params
    gen = torch.Generator().manual_seed(seed)
    entropy = torch.rand(batch.mask.shape, generator=gen, dtype=torch.float64) * 3
    entropy = torch.where(batch.mask, entropy, batch.garbage)
    recipe = aspo(eps=eps, eps_high_entropy=eps_h, dual_clip=c, entropy_quantile=q)
    got = loss_and_grad(recipe, batch, entropy=entropy)
    assert_close(got, aspo_reference(batch, entropy, eps, eps_h, c, q))


def test_aspo_flips_the_positive_ratio() -> None:
    """One positive token at r = e^{0.1} (inside the band): loss −Â/r, gradient −Â/r; at r = e^{0.5}
    (beyond 1 + 0.4): value −Â/1.4, no gradient; a negative token keeps PPO's r."""
    mask = torch.ones(3, 1, dtype=torch.bool)
    old = torch.zeros(3, 1, dtype=torch.float64)
    lp = torch.tensor([[0.1], [0.5], [0.1]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([2.0, 2.0, -1.0], dtype=torch.float64)
    td = TensorDict({"log_probs": lp, "old_log_probs": old, "response_mask": mask, "advantages": adv,
                     "entropy": torch.ones(3, 1, dtype=torch.float64)}, batch_size=[3])  # fmt: skip
    loss = aspo(eps=0.4, eps_high_entropy=0.4).loss(td)["loss"]
    loss.backward()
    r = math.exp(0.1)
    want = (-2 / r - 2 / 1.4 + r) / 3
    torch.testing.assert_close(loss.detach(), torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(
        lp.grad.squeeze(-1), torch.tensor([-2 / r / 3, 0.0, r / 3], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": 0.0}, "'eps' must be a finite number in"),
        ({"eps_high_entropy": 1.0}, "'eps_high_entropy'"),
        ({"dual_clip": 1.0}, "'dual_clip'"),
        ({"entropy_quantile": 1.5}, "'entropy_quantile'"),
    ],
)
def test_aspo_bad_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ASPOClip(**kwargs)


def test_aspo_needs_finite_entropy() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    td = TensorDict({"log_probs": torch.zeros(1, 2), "old_log_probs": torch.zeros(1, 2), "response_mask": mask,
                     "advantages": torch.ones(1), "entropy": torch.tensor([[0.1, float("nan")]])},
                    batch_size=[1])  # fmt: skip
    with pytest.raises(ValueError, match="'entropy' must be finite"):
        aspo().loss(td)


# ---------------------------------------------------------------------------------------------
# GTPO


def conflict_reference(ids, lengths, adv, groups):
    """Plain-loop δ/n per row (list of lists), following the module doc."""
    n = len(ids)
    out = [[1.0] * lengths[i] for i in range(n)]
    for g in set(groups):
        rows = [i for i in range(n) if groups[i] == g]
        pos = [i for i in rows if adv[i] > 0]
        neg = [i for i in rows if adv[i] < 0]
        if not pos or not neg:
            continue

        def run(token_at, rows=rows, pos=pos, neg=neg):  # token_at(i, k): the token at aligned position k
            result = {}
            for i in rows:
                flags, going = [], True
                for k in range(lengths[i]):
                    tok = token_at(i, k)
                    hit = any(token_at(j, k) == tok for j in pos) and any(token_at(j, k) == tok for j in neg)
                    going = going and hit
                    flags.append(going)
                result[i] = flags
            return result

        fwd = run(lambda i, k: ids[i][k] if k < lengths[i] else None)
        bwd_rev = run(lambda i, k: ids[i][lengths[i] - 1 - k] if k < lengths[i] else None)
        for i in pos + neg:
            w = 2.0 if adv[i] > 0 else 0.0
            length = lengths[i]
            bwd = [bwd_rev[i][length - 1 - t] for t in range(length)]
            count = max(1, sum(1 for t in range(length) if fwd[i][t] or bwd[t]))
            out[i] = [(w if fwd[i][t] else 1.0) * (w if bwd[t] else 1.0) / count for t in range(length)]
    return out


def test_gtpo_conflict_hand_case() -> None:
    """Group of 3: + [5 6 7 9], − [5 6 8 9], + [5 4 7]. Forward conflicts: position 0 (5 in + and −),
    position 1 (6 in + and −) for rows 0, 1; row 2: position 0 only (4 ≠ 6). Backward: last tokens 9 (rows 0,
    1) and 7 vs 8 → only the last token of rows 0 and 1; row 2's last token 7 is in no negative."""
    ids = torch.tensor([[5, 6, 7, 9], [5, 6, 8, 9], [5, 4, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    td = TensorDict({"response_ids": ids, "group_ids": torch.zeros(3, dtype=torch.long),
                     "advantages": torch.tensor([1.0, -1.0, 0.5]), "response_mask": mask}, batch_size=[3])  # fmt: skip
    w = GTPOConflictFilter()(td)["loss_weights"]
    want = torch.tensor([[2 / 3, 2 / 3, 1 / 3, 2 / 3], [0.0, 0.0, 1 / 3, 0.0], [2.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(w.float(), want)


@st.composite
def gtpo_batches(draw: st.DrawFn):
    batch = draw(policy_batches(max_n=8, max_len=6, max_log_ratio=1.0))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = torch.randint(0, draw(st.sampled_from([2, 3, 5])), batch.mask.shape, generator=gen)
    ids = torch.where(batch.mask, ids, draw(st.sampled_from([0, 1, 10**6])))
    groups = torch.randint(0, 2, (batch.n,), generator=gen)
    entropy = torch.rand(batch.mask.shape, generator=gen, dtype=torch.float64) * 1.4
    entropy = torch.where(batch.mask, entropy, batch.garbage)
    return batch, ids, groups, entropy


@settings(max_examples=80)
@given(data=gtpo_batches())
def test_gtpo_matches_reference(data) -> None:
    batch, ids, groups, entropy = data
    lengths = [int(x) for x in batch.lengths]
    adv = [float(a) for a in batch.advantages]
    delta = conflict_reference(ids.tolist(), lengths, adv, groups.tolist())
    values, grads = [], []
    for i in range(batch.n):
        mean_h = math.fsum(float(entropy[i, t]) for t in range(lengths[i])) / lengths[i]
        shaped = adv[i] - 0.1 * mean_h if mean_h <= 0.7 else 0.0
        values.append(-shaped * math.fsum(delta[i]) / lengths[i])
        grads.append([-shaped * d / lengths[i] / batch.n for d in delta[i]])
    want_grad = torch.zeros(batch.mask.shape, dtype=torch.float64)
    for i, row in enumerate(grads):
        want_grad[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    want = torch.tensor(math.fsum(values) / batch.n, dtype=torch.float64)
    got = loss_and_grad(gtpo(), batch, response_ids=ids, group_ids=groups, entropy=entropy)
    assert_close(got, (want, want_grad))


def test_gtpo_bad_inputs() -> None:
    with pytest.raises(ValueError, match="'conflict_weight' must be a finite number >= 0"):
        GTPOConflictFilter(-1.0)
    with pytest.raises(ValueError, match="'entropy_threshold'"):
        GTPOEntropyShaping(entropy_threshold=float("inf"))
    mask = torch.ones(2, 2, dtype=torch.bool)
    base = {"response_mask": mask, "group_ids": torch.zeros(2, dtype=torch.long), "advantages": torch.ones(2)}
    with pytest.raises(ValueError, match=r"'response_ids' must be an integer tensor of shape \[2, 2\]"):
        GTPOConflictFilter()(TensorDict({**base, "response_ids": torch.zeros(2, 2)}, batch_size=[2]))
    with pytest.raises(ValueError, match=r"'advantages' must be one per response"):
        GTPOConflictFilter()(TensorDict({**base, "response_ids": torch.zeros(2, 2, dtype=torch.long),
                                         "advantages": torch.ones(2, 2)}, batch_size=[2]))  # fmt: skip
