"""The field's TokenFilters: top-entropy tokens (arXiv 2506.01939), DPPO's binary-TV / binary-KL
mask (arXiv 2602.04879), M2PO's second-moment mask (arXiv 2510.01161) and OPSM (arXiv 2512.02556).

Each filter is checked against a float64 reference written from the formula (plain Python loops),
through a whole PolicyLoss (value and gradient, padding holding NaN / ±inf), for its
``filtered_<name>`` metric and its bad-input errors; top-entropy and OPSM also against TRL 1.16's
own functions (``GRPOTrainer.get_high_entropy_mask`` on a built trainer, and the static
``GRPOTrainer.get_off_policy_mask``). DPPO's parity with verl is in tests_verl/test_verl_filters.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import GARBAGE
from tensordict import TensorDict

from gspo_components.loss.algorithms.dppo import DPPOFilter, dppo
from gspo_components.loss.algorithms.m2po import M2POFilter, m2po
from gspo_components.loss.algorithms.opsm import OPSMFilter
from gspo_components.loss.algorithms.top_entropy import TopEntropyFilter
from gspo_components.loss.numerics import Padding
from gspo_components.loss.recipes import grpo

F64 = torch.float64


@st.composite
def batches(draw: st.DrawFn, *, max_n: int = 6, max_len: int = 24) -> dict:
    """A float64 batch: log-probs in (−4, 0], log-ratios of a drawn scale, advantages [N] and
    [N, T] of both signs (some 0), entropies (sometimes rounded to a few levels, for ties), and
    garbage at the padding."""
    n = draw(st.integers(1, max_n))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=n, max_size=n))
    width = max(lengths) + draw(st.integers(0, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.0, 1e-3, 0.05, 0.3, 1.0, 3.0]))
    garbage = draw(st.sampled_from(GARBAGE))
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    old = -torch.rand(n, width, generator=gen, dtype=F64) * 4.0
    lp = (old + torch.randn(n, width, generator=gen, dtype=F64) * scale).clamp(max=0.0)
    adv = torch.randn(n, generator=gen, dtype=F64)
    adv = torch.where(torch.rand(n, generator=gen) < 0.2, torch.zeros_like(adv), adv)
    token_adv = torch.randn(n, width, generator=gen, dtype=F64)
    ent = torch.rand(n, width, generator=gen, dtype=F64) * 3.0
    if draw(st.booleans()):
        ent = (ent * 2).round() / 2  # few levels: ties at the threshold

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, torch.full_like(x, garbage))

    return {
        "mask": mask,
        "log_probs": pad(lp),
        "old_log_probs": pad(old),
        "advantages": adv,
        "token_advantages": pad(token_adv),
        "entropy": pad(ent),
    }


def td_of(b: dict, *, token_advantages: bool = False) -> TensorDict:
    return TensorDict(
        {
            "log_probs": b["log_probs"].clone().requires_grad_(),
            "old_log_probs": b["old_log_probs"],
            "advantages": b["token_advantages"] if token_advantages else b["advantages"],
            "response_mask": b["mask"],
            "entropy": b["entropy"],
        },
        batch_size=[b["mask"].shape[0]],
    )


def valid_tokens(mask: torch.Tensor) -> list[tuple[int, int]]:
    return [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]


def keep_of(f, b: dict, *, token_advantages: bool = False) -> torch.Tensor:
    """The filter's keep decision as a bool [N, T] (through its public keep())."""
    pad = Padding(b["mask"])
    inputs = {
        k: b["token_advantages"] if (k == "advantages" and token_advantages) else b[k] for k in f.inputs
    }
    k = f.keep(pad, **inputs)
    k = k.unsqueeze(-1).expand_as(b["mask"]) if k.dim() == 1 else k
    return k.bool() & b["mask"]


def loss_and_grad(recipe, b: dict, **kw) -> tuple[torch.Tensor, torch.Tensor, TensorDict]:
    td = td_of(b, **kw)
    out = recipe.loss(td)
    (g,) = torch.autograd.grad(out["loss"], td["log_probs"])
    return out["loss"].detach(), g, out


def ref_losses(b: dict, keep: torch.Tensor, per_token, aggregation: str, **kw) -> tuple[float, torch.Tensor]:
    """A float64 reference: per_token(ℓ, ℓ_old, Â) on the valid tokens (autograd for ∇), times keep,
    aggregated with the normalisers unchanged."""
    mask = b["mask"]
    lp = torch.where(mask, b["log_probs"], 0.0).detach().requires_grad_()
    old = torch.where(mask, b["old_log_probs"], 0.0)
    adv = (
        b["token_advantages"] if kw.get("token_advantages") else b["advantages"].unsqueeze(-1).expand_as(mask)
    )
    rows = []
    for i in range(mask.shape[0]):
        terms = [
            per_token(lp[i, t], old[i, t], float(adv[i, t])) * float(keep[i, t])
            for t in range(mask.shape[1])
            if mask[i, t]
        ]
        rows.append(terms)
    if aggregation == "token-mean":
        total = sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    else:  # seq-mean-token-mean
        total = sum(sum(r) / len(r) for r in rows) / len(rows)
    (g,) = torch.autograd.grad(total, lp)
    return float(total.detach()), g


def check_inert(g: torch.Tensor, mask: torch.Tensor) -> None:
    assert torch.isfinite(g).all()
    assert torch.all(g[~mask] == 0)


# ---------------------------------------------------------------------------------------------
# Top-entropy tokens


def ref_top_entropy(b: dict, rho: float) -> torch.Tensor:
    mask, h = b["mask"], b["entropy"]
    values = sorted(float(h[i, t]) for i, t in valid_tokens(mask))
    pos = (1.0 - rho) * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    threshold = values[lo] + (pos - lo) * (values[hi] - values[lo])
    keep = torch.zeros_like(mask)
    for i, t in valid_tokens(mask):
        keep[i, t] = float(h[i, t]) >= threshold
    return keep


@given(b=batches(), rho=st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]) | st.floats(0.0, 1.0))
def test_top_entropy_matches_quantile_reference(b: dict, rho: float) -> None:
    keep = keep_of(TopEntropyFilter(rho), b)
    assert torch.equal(keep, ref_top_entropy(b, rho))
    if rho == 1.0:
        assert torch.equal(keep, b["mask"])


def test_top_entropy_keeps_ties_and_the_top_fraction() -> None:
    mask = torch.ones(1, 10, dtype=torch.bool)
    h = torch.arange(10, dtype=F64).unsqueeze(0)
    b = {"mask": mask, "entropy": h}
    assert keep_of(TopEntropyFilter(0.2), b).sum() == 2  # τ = quantile_0.8 = 7.2: H ∈ {8, 9}
    b["entropy"] = torch.tensor([[1.0, 2.0, 2.0, 2.0, 3.0]], dtype=F64)
    b["mask"] = torch.ones(1, 5, dtype=torch.bool)
    assert keep_of(TopEntropyFilter(0.5), b).tolist() == [[False, True, True, True, True]]  # τ = 2, kept


@given(b=batches(), rho=st.sampled_from([0.2, 0.8]), seq=st.booleans())
def test_top_entropy_through_grpo(b: dict, rho: float, seq: bool) -> None:
    aggregation = "seq-mean-token-mean" if seq else "token-mean"
    loss, g, out = loss_and_grad(grpo(filters=[TopEntropyFilter(rho)], aggregation=aggregation), b)
    keep = ref_top_entropy(b, rho)

    def ppo(lp, old, a):
        r = torch.exp(lp - old)
        return -torch.minimum(r * a, r.clamp(0.8, 1.2) * a)

    ref, ref_g = ref_losses(b, keep, ppo, aggregation)
    assert loss.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-12)
    check_inert(g, b["mask"])
    n_valid = int(b["mask"].sum())
    assert out["filtered_top_entropy"].item() == pytest.approx(
        (n_valid - int(keep.sum())) / n_valid, abs=1e-6
    )


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from gspo_components.testing import build_char_tokenizer, build_tiny_qwen3

    tok = build_char_tokenizer("0123456789+=")
    model = build_tiny_qwen3(
        len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        report_to="none",
        use_cpu=True,
        bf16=False,
        top_entropy_quantile=0.2,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2="]}),
        processing_class=tok,
    )


def test_top_entropy_matches_trl(trl_trainer) -> None:
    """TRL's own mask (``get_high_entropy_mask(H, M, 1 − ρ)``, the call ``_compute_loss`` makes) on
    float32 entropies with ties: bit-identical keep decisions."""
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for rho in (0.0, 0.1, 0.2, 0.37, 0.5, 0.8, 1.0):
        for trial in range(12):
            n, t = 1 + trial % 5, 3 + 2 * trial
            lengths = torch.randint(1, t + 1, (n,), generator=gen)
            mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
            h = torch.rand(n, t, generator=gen) * 4
            if trial % 2:
                h = (h * 3).round() / 3
            ours = keep_of(TopEntropyFilter(rho), {"mask": mask, "entropy": h})
            theirs = trl_trainer.get_high_entropy_mask(h, mask.long(), 1 - rho)
            assert torch.equal(ours, theirs), (rho, trial)
            cases += 1
    assert cases == 84


def test_top_entropy_bad_input() -> None:
    for bad in (1.5, -0.1, "0.2", True, float("nan")):
        with pytest.raises(ValueError, match=r"'quantile'.*\[0, 1\]"):
            TopEntropyFilter(bad)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"'entropy' must be a float tensor \[N, T\] = \[2, 3\], got torch.float32 \[2\]"
    ):
        TopEntropyFilter().keep(Padding(mask), entropy=torch.ones(2))
    with pytest.raises(ValueError, match=r"'entropy'.*torch.int64"):
        TopEntropyFilter().keep(Padding(mask), entropy=torch.ones(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# DPPO


def ref_dppo_keep(b: dict, mode: str, lo: float, hi: float, token_advantages: bool = False) -> torch.Tensor:
    mask = b["mask"]
    keep = torch.zeros_like(mask)
    for i, t in valid_tokens(mask):
        p, q = math.exp(float(b["log_probs"][i, t])), math.exp(float(b["old_log_probs"][i, t]))
        a = float(b["token_advantages"][i, t]) if token_advantages else float(b["advantages"][i])
        if mode == "binary_tv":
            ok = (p - q <= hi) if a > 0 else (p - q >= -lo)
        else:
            kl = q * math.log(q / p) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
            ok = (kl <= hi or p <= q) if a > 0 else (kl <= lo or p >= q)
        keep[i, t] = ok
    return keep


@given(
    b=batches(),
    mode=st.sampled_from(["binary_tv", "binary_kl"]),
    bounds=st.sampled_from([(0.2, 0.2), (0.05, 0.1), (0.01, 0.3)]),
    token_advantages=st.booleans(),
)
def test_dppo_matches_reference(b: dict, mode: str, bounds: tuple, token_advantages: bool) -> None:
    lo, hi = bounds
    keep = keep_of(DPPOFilter(mode, lo, hi), b, token_advantages=token_advantages)
    ref = ref_dppo_keep(b, mode, lo, hi, token_advantages)
    # binary KL at p' → 1 subtracts nearly equal numbers: allow a decision to flip only within 1e-9 of a bound
    if not torch.equal(keep, ref):
        assert mode == "binary_kl"
        for i, t in valid_tokens(b["mask"]):
            if keep[i, t] != ref[i, t]:
                p, q = math.exp(float(b["log_probs"][i, t])), math.exp(float(b["old_log_probs"][i, t]))
                kl = q * math.log(q / p) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
                assert min(abs(kl - lo), abs(kl - hi)) < 1e-9


@given(b=batches(), mode=st.sampled_from(["binary_tv", "binary_kl"]), cap=st.sampled_from([1.5, 3.0, 20.0]))
def test_dppo_recipe_value_and_gradient(b: dict, mode: str, cap: float) -> None:
    loss, g, out = loss_and_grad(dppo(mode=mode, tis_cap=cap), b)
    keep = keep_of(DPPOFilter(mode), b)

    def tis(lp, old, a):
        r = torch.exp(lp - old)
        w = min(float(r), cap)
        return -a * w * torch.exp(lp - lp.detach())  # value −Â·min(r, C), gradient −Â·min(r, C)·∇ℓ

    ref, ref_g = ref_losses(b, keep, tis, "token-mean")
    assert loss.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-12)
    check_inert(g, b["mask"])
    n_valid = int(b["mask"].sum())
    assert out["filtered_dppo"].item() == pytest.approx((n_valid - int(keep.sum())) / n_valid, abs=1e-6)


def test_dppo_masks_only_the_advantage_side() -> None:
    # p: 0.5 → 0.8 (TV +0.3): masked for Â > 0, kept for Â < 0; 0.5 → 0.2 the other way round.
    mask = torch.ones(4, 1, dtype=torch.bool)
    lp = torch.tensor([[0.8], [0.8], [0.2], [0.2]], dtype=F64).log()
    b = {"mask": mask, "log_probs": lp, "old_log_probs": torch.full_like(lp, math.log(0.5))}
    b["advantages"] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
    assert keep_of(DPPOFilter("binary_tv"), b).flatten().tolist() == [False, True, True, False]
    assert keep_of(DPPOFilter("binary_kl"), b).flatten().tolist() == [False, True, True, False]
    assert keep_of(DPPOFilter("binary_kl", 1.0, 1.0), b).all()


def test_dppo_bad_input() -> None:
    with pytest.raises(ValueError, match=r"'mode' must be one of \['binary_tv', 'binary_kl'\], got 'tv'"):
        DPPOFilter("tv")
    with pytest.raises(ValueError, match=r"'delta_low' must be a finite number >= 0.*got -0.1"):
        DPPOFilter(delta_low=-0.1)
    with pytest.raises(ValueError, match=r"'delta_high'.*got 'x'"):
        DPPOFilter(delta_high="x")
    with pytest.raises(ValueError, match=r"'tis_cap'.*>= 1, got 0.5"):
        dppo(tis_cap=0.5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    x = torch.zeros(2, 3)
    with pytest.raises(
        ValueError, match=r"'old_log_probs' must be a float tensor of shape \[2, 3\], got torch.float32 \[3\]"
    ):
        DPPOFilter().keep(Padding(mask), log_probs=x, old_log_probs=torch.zeros(3), advantages=torch.zeros(2))
    with pytest.raises(ValueError, match=r"'advantages'.*\[2, 3\] or \[2\], got torch.float32 \[3\]"):
        DPPOFilter().keep(Padding(mask), log_probs=x, old_log_probs=x, advantages=torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# M2PO


def greedy_m2po(
    b: dict, tau: float, trust_region: bool = False, token_advantages: bool = False
) -> torch.Tensor:
    """Algorithm 1 of arXiv 2510.01161, literally: remove the current largest (log r)² (first one on
    ties) while the mean over the remaining set exceeds τ."""
    mask = b["mask"]
    m2, members = {}, []
    for i, t in valid_tokens(mask):
        lr = float(b["log_probs"][i, t]) - float(b["old_log_probs"][i, t])
        a = float(b["token_advantages"][i, t]) if token_advantages else float(b["advantages"][i])
        if trust_region and not ((a > 0 and lr > 0) or (a < 0 and lr < 0)):
            continue
        m2[(i, t)] = lr * lr
        members.append((i, t))
    keep = mask.clone()
    while members and math.fsum(m2[k] for k in members) / len(members) > tau:
        j = max(members, key=lambda k: m2[k])  # max() returns the first maximal element
        keep[j] = False
        members.remove(j)
    return keep


@given(
    b=batches(),
    tau=st.sampled_from([0.0, 1e-4, 0.04, 0.3, 5.0]),
    trust_region=st.booleans(),
    token_advantages=st.booleans(),
)
def test_m2po_matches_the_greedy_loop(
    b: dict, tau: float, trust_region: bool, token_advantages: bool
) -> None:
    tokens = "trust_region" if trust_region else "all"
    keep = keep_of(M2POFilter(tau, tokens=tokens), b, token_advantages=token_advantages)
    assert torch.equal(keep, greedy_m2po(b, tau, trust_region, token_advantages))


def test_m2po_ties_and_extremes() -> None:
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.zeros(1, 4, dtype=F64)
    b = {"mask": mask, "old_log_probs": old, "advantages": torch.ones(1, dtype=F64)}
    b["log_probs"] = torch.tensor([[-0.5, -0.5, -0.1, 0.0]], dtype=F64)  # (log r)² = .25, .25, .01, 0
    # mean .1275 > .04 → drop the first .25 → mean .0867 → drop the second → .005 ≤ .04
    assert keep_of(M2POFilter(0.04), b).tolist() == [[False, False, True, True]]
    # τ = .09: one removal leaves .0867 ≤ .09; of the two equal maxima the first goes
    assert keep_of(M2POFilter(0.09), b).tolist() == [[False, True, True, True]]
    assert keep_of(M2POFilter(1.0), b).all()
    assert keep_of(M2POFilter(0.0), b).tolist() == [[False, False, False, True]]


@given(b=batches(), tau=st.sampled_from([0.01, 0.04]))
def test_m2po_recipe_value_and_gradient(b: dict, tau: float) -> None:
    loss, g, out = loss_and_grad(m2po(tau=tau), b)
    keep = greedy_m2po(b, tau)

    def unclipped(lp, old, a):
        return -torch.exp(lp - old) * a

    ref, ref_g = ref_losses(b, keep, unclipped, "token-mean")
    assert loss.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-12)
    check_inert(g, b["mask"])
    n_valid = int(b["mask"].sum())
    assert out["filtered_m2po"].item() == pytest.approx((n_valid - int(keep.sum())) / n_valid, abs=1e-6)


def test_m2po_bad_input() -> None:
    for bad in (-1.0, float("inf"), "0.04", None):
        with pytest.raises(ValueError, match=r"'tau'.*finite number >= 0"):
            M2POFilter(bad)
    with pytest.raises(ValueError, match=r"'tokens' must be one of \['all', 'trust_region'\], got 'harmful'"):
        M2POFilter(tokens="harmful")
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"'log_probs' must be a float tensor of shape \[2, 3\], got torch.int64"
    ):
        M2POFilter().keep(
            Padding(mask),
            log_probs=torch.zeros(2, 3, dtype=torch.long),
            old_log_probs=torch.zeros(2, 3),
            advantages=torch.zeros(2),
        )


# ---------------------------------------------------------------------------------------------
# OPSM


def ref_opsm(
    b: dict, delta: float, sampler: str = "old_log_probs", token_advantages: bool = False
) -> torch.Tensor:
    mask = b["mask"]
    keep = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        ts = [t for t in range(mask.shape[1]) if mask[i, t]]
        kls = [float(b[sampler][i, t]) - float(b["log_probs"][i, t]) for t in ts]
        kl = math.fsum(0.0 if math.isnan(k) else k for k in kls) / max(len(ts), 1)
        for t in ts:
            a = float(b["token_advantages"][i, t]) if token_advantages else float(b["advantages"][i])
            keep[i, t] = a >= 0 or kl <= delta
    return keep


@given(b=batches(), delta=st.sampled_from([0.0, 1e-3, 0.05, 0.5]), token_advantages=st.booleans())
def test_opsm_matches_reference(b: dict, delta: float, token_advantages: bool) -> None:
    keep = keep_of(OPSMFilter(delta), b, token_advantages=token_advantages)
    assert torch.equal(keep, ref_opsm(b, delta, token_advantages=token_advantages))


@given(b=batches(), delta=st.sampled_from([1e-3, 0.05, 0.5]))
def test_opsm_matches_trl(b: dict, delta: float) -> None:
    """TRL's static ``GRPOTrainer.get_off_policy_mask`` (A (B,1), ℓ, ℓ_sampler, M, δ) on the same
    batch, with NaN sampler log-probs at some valid tokens (TRL counts them as KL 0)."""
    from trl import GRPOTrainer

    mask = b["mask"]
    sampler = b["old_log_probs"].clone()
    sampler[0, 0] = float("nan")
    b = {**b, "old_log_probs": sampler}
    ours = keep_of(OPSMFilter(delta), b)[:, 0]
    clean = lambda x: torch.where(mask, x, 0.0)  # noqa: E731 — TRL's inputs are finite at padding
    theirs = GRPOTrainer.get_off_policy_mask(
        b["advantages"].unsqueeze(-1),
        clean(b["log_probs"]),
        torch.where(mask, sampler, 0.0),
        mask.to(F64),
        delta,
    )
    assert torch.equal(ours, theirs.squeeze(-1).bool())


@given(b=batches(), delta=st.sampled_from([0.01, 0.1]))
def test_opsm_through_grpo_and_rollout_key(b: dict, delta: float) -> None:
    gen = torch.Generator().manual_seed(1)
    rollout = b["old_log_probs"] + torch.rand(b["mask"].shape, generator=gen, dtype=F64) * 0.5
    f = OPSMFilter(delta, in_keys={"old_log_probs": "rollout_log_probs"})
    td = td_of(b)
    td["rollout_log_probs"] = rollout
    out = grpo(filters=[f]).loss(td)
    (g,) = torch.autograd.grad(out["loss"], td["log_probs"])
    keep = ref_opsm({**b, "rollout_log_probs": rollout}, delta, sampler="rollout_log_probs")

    def ppo(lp, old, a):
        r = torch.exp(lp - old)
        return -torch.minimum(r * a, r.clamp(0.8, 1.2) * a)

    ref, ref_g = ref_losses(b, keep, ppo, "seq-mean-token-mean")
    assert out["loss"].item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-12)
    check_inert(g, b["mask"])
    n_valid = int(b["mask"].sum())
    assert out["filtered_opsm"].item() == pytest.approx((n_valid - int(keep.sum())) / n_valid, abs=1e-6)


def test_opsm_bad_input() -> None:
    for bad in ("0.1", None, float("nan"), True):
        with pytest.raises(ValueError, match=r"'delta'.*real number"):
            OPSMFilter(bad)
    mask = torch.ones(2, 3, dtype=torch.bool)
    x = torch.zeros(2, 3)
    with pytest.raises(
        ValueError, match=r"'log_probs' must be a float tensor of shape \[2, 3\], got torch.float32 \[2, 4\]"
    ):
        OPSMFilter(0.1).keep(
            Padding(mask), log_probs=torch.zeros(2, 4), old_log_probs=x, advantages=torch.zeros(2)
        )
    with pytest.raises(ValueError, match=r"in_keys has no entry named"):
        OPSMFilter(0.1, in_keys={"sampler_log_probs": "x"})
