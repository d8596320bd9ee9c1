"""The verl adapter against verl 0.9.1 itself: the installed package, not a copy or a mock.

This suite runs inside ``.venv-verl`` (verl's own pins: tensordict 0.10, transformers < 5.11);
``make test`` runs it through ``tests/test_verl_env.py``. It checks

- parity: ``gspo_components/gspo_token`` equals verl's ``compute_policy_loss_gspo`` bit for bit
  (value and gradient, fp64 and fp32) under ``seq-mean-token-mean``, and to rounding under every
  other shared aggregation, with verl's global-batch normalisers, data-parallel scaling and
  rollout IS weights;
- registration: through verl's ``register_policy_loss``, ``get_policy_loss_fn``, the
  ``verl.plugins`` entry point, and verl's own ``ppo_loss`` (the function its actor calls);
- the documented differences (docs/integrations/verl.md), each shown where it changes a result.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tensordict
import torch
import verl
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.core_algos import (
    compute_policy_loss_cispo,
    compute_policy_loss_gspo,
    compute_policy_loss_vanilla,
    get_policy_loss_fn,
)
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

import gspo_components.integrations.verl as verl_adapter
from gspo_components import RECIPES
from gspo_components.integrations.verl import RECIPE_NAMES, register_verl_losses, verl_policy_loss

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
PREFIX = "gspo_components/"
VERL_INPUTS = {"log_probs", "old_log_probs", "advantages", "response_mask"}  # what verl hands a policy loss
# The stock recipes verl can feed: those whose chain needs nothing else (PolicyLoss.required_keys).
VERL_RECIPES = sorted(name for name, make in RECIPES.items() if set(make().loss.required_keys) <= VERL_INPUTS)
register_verl_losses()
# The adapter warns once per process when verl's loss_agg_mode is not the recipe's own;
# test_verl_defaults_to_token_mean checks that warning, the other tests choose the mode on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:gspo_components verl loss:UserWarning")


def actor_config(
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    mode: str = "seq-mean-token-mean",
    loss_mode: str = "vanilla",
    **kwargs: object,
) -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=eps_low,
        clip_ratio_high=eps_high,
        loss_agg_mode=mode,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
        **kwargs,
    )


@dataclass
class Batch:
    mask: torch.Tensor  # bool [N, T], right-padded, every L_i >= 1
    log_probs: torch.Tensor  # [N, T]; finite garbage at padding (verl masks by multiplying)
    old_log_probs: torch.Tensor
    advantages: torch.Tensor  # [N, T], 0 at padding like verl's
    weights: torch.Tensor | None  # rollout IS weights [N, T] or None


@st.composite
def verl_batches(
    draw: st.DrawFn,
    *,
    dtype: torch.dtype = torch.float64,
    sequence_advantages: bool = False,
    weights: bool | None = None,
) -> Batch:
    """Lengths 1..64, N 1..8, token log-ratios up to ±20 clamped to [-20, 10] (the range where
    verl's GSPO clamp and ours agree; tests below show what happens outside), advantages of both
    signs, per sequence or per token."""
    n = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, 64), min_size=n, max_size=n))
    width = max(lengths) + draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.0, 1e-5, 1e-4, 3e-4, 1e-3, 1e-2, 0.3, 1.0, 5.0, 20.0]))
    garbage = draw(st.sampled_from([0.0, 123.0, -1e4]))
    kinds = ["sequence", "positive", "negative", "with-zeros"] + ([] if sequence_advantages else ["token"])
    adv_kind = draw(st.sampled_from(kinds))
    weighted = draw(st.booleans()) if weights is None else weights
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    log_probs = -torch.rand(n, width, generator=gen, dtype=f64) * 5.0
    log_ratio = ((torch.rand(n, width, generator=gen, dtype=f64) * 2 - 1) * scale).clamp(-20.0, 10.0)
    old = log_probs - log_ratio
    seq_adv = torch.randn(n, 1, generator=gen, dtype=f64)
    if adv_kind == "positive":
        seq_adv = seq_adv.abs() + 0.1
    elif adv_kind == "negative":
        seq_adv = -seq_adv.abs() - 0.1
    elif adv_kind == "with-zeros":
        seq_adv = torch.where(torch.rand(n, 1, generator=gen) < 0.4, torch.zeros_like(seq_adv), seq_adv)
    adv = torch.randn(n, width, generator=gen, dtype=f64) if adv_kind == "token" else seq_adv.expand(n, width)
    w = torch.rand(n, width, generator=gen, dtype=f64) * 2.0 if weighted else None

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.where(mask, x, torch.full_like(x, value)).to(dtype)

    return Batch(
        mask=mask,
        log_probs=pad(log_probs, garbage),
        old_log_probs=pad(old, -garbage),
        advantages=pad(adv, 0.0),
        weights=None if w is None else pad(w, garbage),
    )


eps_pairs = st.sampled_from([(3e-4, 4e-4), (0.2, 0.28), (0.2, 0.2)]) | st.tuples(
    st.floats(1e-4, 0.9), st.floats(1e-4, 2.0)
)


def run(fn, batch: Batch, mode: str, config: object, *, weights: bool = True):
    """Call a verl policy-loss function as verl's ppo_loss does; return loss, d loss/d log_prob, metrics."""
    log_prob = batch.log_probs.clone().requires_grad_()
    loss, metrics = fn(
        old_log_prob=batch.old_log_probs,
        log_prob=log_prob,
        advantages=batch.advantages,
        response_mask=batch.mask,
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=batch.weights if weights else None,
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


def ours(recipe: str):
    return get_policy_loss_fn(PREFIX + recipe)


# ---------------------------------------------------------------------------------------------
# The real package


def test_runs_against_the_installed_verl() -> None:
    assert verl.__version__ == "0.9.1"
    assert tensordict.__version__.startswith("0.10"), tensordict.__version__
    assert "site-packages" in core_algos.__file__, core_algos.__file__
    assert core_algos.register_policy_loss.__module__ == "verl.trainer.ppo.core_algos"


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@given(data=st.data())
def test_gspo_token_is_verl_gspo_bit_for_bit(dtype: torch.dtype, data: st.DataObject) -> None:
    """seq-mean-token-mean, equal clip settings, with and without rollout IS weights: the loss,
    its gradient and verl's clip fraction are identical, not merely close."""
    batch = data.draw(verl_batches(dtype=dtype))
    eps_low, eps_high = data.draw(eps_pairs)
    config = actor_config(eps_low, eps_high)
    loss, grad, metrics = run(ours("gspo_token"), batch, "seq-mean-token-mean", config)
    ref_loss, ref_grad, ref_metrics = run(compute_policy_loss_gspo, batch, "seq-mean-token-mean", config)
    assert loss.dtype == ref_loss.dtype == dtype
    assert torch.equal(loss, ref_loss), (loss.item(), ref_loss.item())
    assert torch.equal(grad, ref_grad), (grad - ref_grad).abs().max().item()
    assert metrics["actor/pg_clipfrac"] == pytest.approx(ref_metrics["actor/pg_clipfrac"], rel=1e-6, abs=1e-9)
    assert metrics["actor/ppo_kl"] == pytest.approx(ref_metrics["actor/ppo_kl"], rel=1e-5, abs=1e-9)
    assert metrics["actor/pg_clipfrac_lower"] == ref_metrics["actor/pg_clipfrac_lower"] == 0.0


@given(data=st.data())
def test_every_shared_aggregation_with_global_batch_info(data: st.DataObject) -> None:
    """Micro-batches normalised by verl's global_batch_info (tokens, sequences, horizon, dp_size):
    each micro-batch's loss and gradient equal verl's to rounding, and the micro-batch losses add
    up to the whole batch's (times dp_size, which verl's ranks average away)."""
    batch = data.draw(verl_batches())
    mode = data.draw(st.sampled_from(SHARED_MODES))
    dp_size = data.draw(st.sampled_from([1, 2, 4]))
    scale_factor = data.draw(st.sampled_from([None, 7, 128]))
    eps_low, eps_high = data.draw(eps_pairs)
    n = batch.mask.shape[0]
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
    bounds = [0, *cuts, n]
    info = {
        "dp_size": dp_size,
        "batch_num_tokens": int(batch.mask.sum()),
        "global_batch_size": n,
        "loss_scale_factor": scale_factor,
    }
    total, total_ref = 0.0, 0.0
    for lo, hi in itertools.pairwise(bounds):
        part = Batch(
            batch.mask[lo:hi],
            batch.log_probs[lo:hi],
            batch.old_log_probs[lo:hi],
            batch.advantages[lo:hi],
            None if batch.weights is None else batch.weights[lo:hi],
        )
        config = actor_config(eps_low, eps_high, mode, global_batch_info=dict(info))
        loss, grad, _ = run(ours("gspo_token"), part, mode, config)
        ref_loss, ref_grad, _ = run(compute_policy_loss_gspo, part, mode, config)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-300)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-300)
        total, total_ref = total + loss.item(), total_ref + ref_loss.item()
    whole_config = actor_config(
        eps_low, eps_high, mode, global_batch_info={"loss_scale_factor": scale_factor}
    )
    whole, _, _ = run(ours("gspo_token"), batch, mode, whole_config)
    assert total == pytest.approx(dp_size * whole.item(), rel=1e-10, abs=1e-300)
    assert total == pytest.approx(total_ref, rel=1e-12, abs=1e-300)


@given(batch=verl_batches(sequence_advantages=True, weights=False))
def test_gspo_recipe_is_verl_gspo_for_sequence_advantages(batch: Batch) -> None:
    """GSPO (the sequence-level weighter) equals verl's GSPO-token form when every token of a
    response has the response's advantage (property 1 of docs/algorithms.md), to fp64 rounding. (Not with
    per-token IS weights: GSPO's gradient spreads each token's weight over its whole sequence.)"""
    config = actor_config()
    loss, grad, _ = run(ours("gspo"), batch, "seq-mean-token-mean", config)
    ref_loss, ref_grad, _ = run(compute_policy_loss_gspo, batch, "seq-mean-token-mean", config)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("recipe", ["grpo", "dr_grpo", "dapo"])
@given(data=st.data())
def test_token_ppo_recipes_are_verl_vanilla_without_dual_clip(recipe: str, data: st.DataObject) -> None:
    """grpo / dr_grpo / dapo under verl are the token-level PPO clip: verl's vanilla loss with its
    dual clip moved out of reach (clip_ratio_c = 1e10 > e^20), in every shared aggregation."""
    batch = data.draw(verl_batches())
    mode = data.draw(st.sampled_from(SHARED_MODES))
    eps_low, eps_high = data.draw(eps_pairs)
    config = actor_config(eps_low, eps_high, mode, clip_ratio_c=1e10)
    loss, grad, metrics = run(ours(recipe), batch, mode, config)
    ref_loss, ref_grad, ref_metrics = run(compute_policy_loss_vanilla, batch, mode, config)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-300)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(ref_metrics["actor/pg_clipfrac"], rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Registration


def test_registered_through_verls_registry() -> None:
    registered = register_verl_losses()
    assert sorted(registered) == sorted(PREFIX + r for r in VERL_RECIPES)  # from RECIPES, no other list
    assert "gspo_token" in VERL_RECIPES  # the parity tests below use it
    assert sorted(verl_adapter.UNSUPPORTED) == sorted(set(RECIPES) - set(VERL_RECIPES))
    for name in verl_adapter.UNSUPPORTED:  # left out, and refused when named, naming the entries
        missing = sorted(set(RECIPES[name]().loss.required_keys) - VERL_INPUTS)
        with pytest.raises(
            ValueError, match=re.escape(f"reads {missing}, which this trainer does not provide")
        ):
            verl_policy_loss(name)
    assert RECIPE_NAMES == tuple(RECIPES)  # the old name, kept for existing callers
    for name, fn in registered.items():
        assert get_policy_loss_fn(name) is fn
        assert core_algos.POLICY_LOSS_REGISTRY[name] is fn
        assert list(inspect.signature(fn).parameters) == list(
            inspect.signature(compute_policy_loss_gspo).parameters
        )
    custom = register_verl_losses(prefix="mine:", recipes=["gspo"])
    assert get_policy_loss_fn("mine:gspo") is custom["mine:gspo"]
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        get_policy_loss_fn(PREFIX + "not_a_recipe")
    with pytest.raises(ValueError, match=r"name of a stock recipe \(one of \['grpo'.*got 'ppo'"):
        verl_policy_loss("ppo")


def _registered_in_fresh_process(env: dict[str, str]) -> list[str]:
    code = (
        "import json, verl\n"
        "import verl.trainer.ppo.core_algos as c\n"
        "print(json.dumps(sorted(k for k in c.POLICY_LOSS_REGISTRY if k.startswith('gspo_components/'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_verl_loads_the_plugin_in_every_process() -> None:
    """verl's ``verl.plugins`` entry points run at ``import verl`` (so in its Ray workers too):
    a fresh interpreter that only imports verl has the losses; with plugins off it has none."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    assert _registered_in_fresh_process(env) == sorted(PREFIX + r for r in VERL_RECIPES)
    assert _registered_in_fresh_process({**env, "VERL_USE_EXTERNAL_PLUGINS": "none"}) == []


def test_importing_the_adapter_does_not_import_verl() -> None:
    code = "import sys, gspo_components, gspo_components.integrations.verl; print('verl' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "False"


def _ppo_loss_inputs(seed: int, *, weights: bool) -> tuple[TensorDict, torch.Tensor, torch.Tensor]:
    """A batch in the layout verl's actor hands ``ppo_loss``: model log-probs unpadded (one row of
    prompt + response tokens per sample, concatenated), the rest padded [N, T]."""
    gen = torch.Generator().manual_seed(seed)
    n, p, t = 6, 3, 9
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[0] = t
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    log_probs = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    old = log_probs + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.5
    adv = torch.randn(n, 1, generator=gen, dtype=torch.float64) * mask
    chunks = []
    for i in range(n):
        chunk = torch.randn(p + int(lengths[i]), generator=gen, dtype=torch.float64)
        chunk[p - 1 : p - 1 + int(lengths[i])] = log_probs[i, : lengths[i]]  # log-prob of token j+1 at j
        chunks.append(chunk)
    flat = torch.cat(chunks).requires_grad_()
    fields = {
        "prompts": torch.ones(n, p, dtype=torch.long),
        "responses": torch.ones(n, t, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(n, p, dtype=torch.long), mask.long()], dim=1),
        "response_mask": mask.long(),
        "old_log_probs": torch.where(mask, old, 0.0),
        "advantages": adv,
    }
    if weights:
        fields["rollout_is_weights"] = torch.rand(n, t, generator=gen, dtype=torch.float64) * mask
    data = TensorDict(fields, batch_size=[n])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=n)
    return data, flat, mask


# (our recipe, verl's loss mode, config) whose gradients verl's ppo_loss must make equal.
PPO_LOSS_PAIRS = [
    ("gspo_token", "gspo", {}),
    ("gspo", "gspo", {}),
    ("grpo", "vanilla", {"eps_low": 0.2, "eps_high": 0.2, "clip_ratio_c": 1e10}),
    ("dr_grpo", "vanilla", {"eps_low": 0.2, "eps_high": 0.2, "clip_ratio_c": 1e10}),
    ("dapo", "vanilla", {"eps_low": 0.2, "eps_high": 0.28, "clip_ratio_c": 1e10}),
    # verl's CISPO clamps the weight below at 1 - clip_ratio_low; 1.0 removes that bound.
    ("cispo", "cispo", {"eps_low": 1.0, "eps_high": 0.28}),
]
# GSPO with per-token IS weights is not GSPO-token: its gradient spreads each token's weight over
# the whole sequence. Every other pair runs with and without weights.
PPO_LOSS_CASES = [
    pytest.param(*pair, weights, id=f"{pair[0]}-{'is-weights' if weights else 'plain'}")
    for pair in PPO_LOSS_PAIRS
    for weights in (False, True)
    if not (pair[0] == "gspo" and weights)
]


@pytest.mark.parametrize(("recipe", "verl_mode", "kwargs", "weights"), PPO_LOSS_CASES)
@pytest.mark.parametrize("mode", SHARED_MODES)
def test_through_verls_ppo_loss(recipe: str, verl_mode: str, kwargs: dict, weights: bool, mode: str) -> None:
    """verl's own ``ppo_loss`` (what its actor calls per micro-batch) selects the loss by name,
    fills global_batch_info, passes rollout IS weights and wraps the metrics. Gradients with
    respect to the model's unpadded log-probs equal those of the matching built-in loss."""
    grads, losses = [], []
    for loss_mode in (PREFIX + recipe, verl_mode):
        data, flat, mask = _ppo_loss_inputs(7, weights=weights)
        config = actor_config(mode=mode, loss_mode=loss_mode, **kwargs)
        policy_loss, metrics = ppo_loss(config, {"log_probs": flat}, data)
        assert {"actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl"} <= set(metrics)
        assert config.global_batch_info["batch_num_tokens"] == int(mask.sum())
        (grad,) = torch.autograd.grad(policy_loss, flat)
        assert torch.isfinite(grad).all()
        grads.append(grad)
        losses.append(policy_loss.detach())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-15)
    if recipe != "cispo":  # CISPO's value differs by design; see test_cispo_value_and_lower_bound
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-15)


def test_config_may_be_a_dictconfig_or_absent() -> None:
    batch = _fixed_batch()
    dict_config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.28})
    loss, grad, _ = run(ours("dapo"), batch, "token-mean", dict_config)
    ref, ref_grad, _ = run(ours("dapo"), batch, "token-mean", actor_config(0.2, 0.28, "token-mean"))
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)
    # Without a config, the recipe's own clip range (GSPO's 3e-4 / 4e-4) applies.
    loss_none, _, _ = run(ours("gspo_token"), batch, "seq-mean-token-mean", None)
    ref_none, _, _ = run(compute_policy_loss_gspo, batch, "seq-mean-token-mean", actor_config(3e-4, 4e-4))
    assert torch.equal(loss_none, ref_none)


def _fixed_batch() -> Batch:
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    lp = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    old = lp - torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.tensor([[1.0], [-0.5], [0.7]], dtype=torch.float64) * mask
    return Batch(mask, lp, old, adv, None)


# ---------------------------------------------------------------------------------------------
# The documented differences


def test_verl_defaults_to_token_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    """verl's ActorConfig defaults to token-mean; GSPO's aggregation (the recipe's) is
    seq-mean-token-mean. With unequal lengths the two disagree; the adapter follows verl's mode and
    warns that it is not the recipe's."""
    assert ActorConfig.__dataclass_fields__["loss_agg_mode"].default == "token-mean"
    batch = _fixed_batch()
    default = actor_config(3e-4, 4e-4, mode=ActorConfig.__dataclass_fields__["loss_agg_mode"].default)
    verl_default, _, _ = run(compute_policy_loss_gspo, batch, default.loss_agg_mode, default)
    ours_paper, _, _ = run(ours("gspo_token"), batch, "seq-mean-token-mean", actor_config())
    assert not torch.allclose(verl_default, ours_paper, rtol=1e-3)
    monkeypatch.setattr(verl_adapter, "_WARNED", set())
    with pytest.warns(UserWarning, match=r"loss_agg_mode='token-mean'.*'seq-mean-token-mean'"):
        ours_token, _, _ = run(ours("gspo_token"), batch, "token-mean", default)
    assert torch.equal(ours_token, verl_default)
    # With equal lengths the two aggregations coincide.
    full = Batch(torch.ones_like(batch.mask), batch.log_probs, batch.old_log_probs, batch.advantages, None)
    a, _, _ = run(compute_policy_loss_gspo, full, "token-mean", default)
    b, _, _ = run(ours("gspo_token"), full, "seq-mean-token-mean", actor_config())
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def _one_row(log_s: float, adv: float, length: int = 4) -> Batch:
    """One response whose every token has log-ratio ``log_s`` (so log s_i = log_s)."""
    mask = torch.ones(1, length, dtype=torch.bool)
    lp = torch.full((1, length), -1.0, dtype=torch.float64)
    return Batch(mask, lp, lp - log_s, torch.full((1, length), adv, dtype=torch.float64), None)


def test_log_ratio_clamp_one_sided_in_verl_gspo() -> None:
    """verl's GSPO clamps log s_{i,t} above at 10 and not below; every part here clamps the
    log-ratio to [-20, 20]. Inside [-20, 10] the two agree (the parity tests draw there)."""
    config = actor_config()
    length = 4
    # log s = 15, Â < 0 (wrong side, unclipped): verl's value stops at e^10 and its gradient
    # vanishes; ours is e^15 with gradient e^15 / L per token.
    batch = _one_row(15.0, -1.0, length)
    v, g, _ = run(compute_policy_loss_gspo, batch, "seq-mean-token-mean", config)
    o, og, _ = run(ours("gspo_token"), batch, "seq-mean-token-mean", config)
    assert v.item() == pytest.approx(math.exp(10.0), rel=1e-12) and torch.all(g == 0)
    assert o.item() == pytest.approx(math.exp(15.0), rel=1e-12)
    torch.testing.assert_close(og, torch.full_like(og, math.exp(15.0) / length), rtol=1e-12, atol=0)
    # log s = 25: both clamp, at different heights, and neither passes a gradient.
    batch = _one_row(25.0, -1.0, length)
    v, g, _ = run(compute_policy_loss_gspo, batch, "seq-mean-token-mean", config)
    o, og, _ = run(ours("gspo_token"), batch, "seq-mean-token-mean", config)
    assert v.item() == pytest.approx(math.exp(10.0), rel=1e-12) and torch.all(g == 0)
    assert o.item() == pytest.approx(math.exp(20.0), rel=1e-12) and torch.all(og == 0)
    # log s = -25, Â > 0 (wrong side, unclipped): verl has no lower clamp, ours stops at -20.
    batch = _one_row(-25.0, 1.0, length)
    v, g, _ = run(compute_policy_loss_gspo, batch, "seq-mean-token-mean", config)
    o, og, _ = run(ours("gspo_token"), batch, "seq-mean-token-mean", config)
    assert v.item() == pytest.approx(-math.exp(-25.0), rel=1e-12)
    torch.testing.assert_close(g, torch.full_like(g, -math.exp(-25.0) / length), rtol=1e-12, atol=0)
    assert o.item() == pytest.approx(-math.exp(-20.0), rel=1e-12) and torch.all(og == 0)
    # verl's token-level losses clamp to [-20, 20] like ours: GRPO matches vanilla out there too.
    for log_w, adv in ((25.0, -1.0), (15.0, -1.0), (-25.0, 1.0)):
        batch = _one_row(log_w, adv, length)
        c = actor_config(0.2, 0.2, clip_ratio_c=1e10)
        o, og, _ = run(ours("grpo"), batch, "seq-mean-token-mean", c)
        v, g, _ = run(compute_policy_loss_vanilla, batch, "seq-mean-token-mean", c)
        torch.testing.assert_close(o, v, rtol=1e-12, atol=0)
        torch.testing.assert_close(og, g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_padding(garbage: float) -> None:
    """verl's GSPO masks the sequence sum by multiplying, so NaN or ±inf in padding poisons the
    loss; ours masks with torch.where and gives the clean-padding result."""
    clean = _fixed_batch()
    dirty = Batch(
        clean.mask,
        torch.where(clean.mask, clean.log_probs, garbage),
        torch.where(clean.mask, clean.old_log_probs, garbage),
        clean.advantages,
        None,
    )
    config = actor_config()
    v, _, _ = run(compute_policy_loss_gspo, dirty, "seq-mean-token-mean", config)
    assert torch.isnan(v)
    o, og, _ = run(ours("gspo_token"), dirty, "seq-mean-token-mean", config)
    ref, ref_g, _ = run(compute_policy_loss_gspo, clean, "seq-mean-token-mean", config)
    assert torch.equal(o, ref) and torch.equal(og, ref_g)


def test_verl_vanilla_dual_clip() -> None:
    """verl's vanilla loss always applies dual-clip PPO (clip_ratio_c = 3 by default); the grpo,
    dr_grpo and dapo recipes have none: with Â < 0 and w > 3 verl's loss is capped at 3|Â| with
    no gradient, ours is w|Â| with gradient."""
    config = actor_config(0.2, 0.2)
    assert config.clip_ratio_c == 3.0
    batch = _one_row(math.log(5.0), -1.0, 2)
    v, g, vm = run(compute_policy_loss_vanilla, batch, "seq-mean-token-mean", config)
    o, og, om = run(ours("grpo"), batch, "seq-mean-token-mean", config)
    assert v.item() == pytest.approx(3.0, rel=1e-12) and torch.all(g == 0)
    assert vm["actor/pg_clipfrac_lower"] == pytest.approx(1.0)
    assert o.item() == pytest.approx(5.0, rel=1e-12)
    torch.testing.assert_close(og, torch.full_like(og, 5.0 / 2), rtol=1e-12, atol=0)
    assert om["actor/pg_clipfrac_lower"] == 0.0


def test_cispo_value_and_lower_bound() -> None:
    """verl's CISPO writes the loss as −sg(clip(w))·Â·log π (its value depends on log π itself) and
    clamps w to [1−ε_low, 1+ε_high]; ours has value −clip(w)·Â and no lower bound (MiniMax-M1).
    Gradients agree wherever w ≥ 1−ε_low."""
    config = actor_config(0.2, 0.28, "token-mean")
    inside = _one_row(math.log(1.5), 1.0, 3)  # truncated at 1.28 by both
    v, g, _ = run(compute_policy_loss_cispo, inside, "token-mean", config)
    o, og, _ = run(ours("cispo"), inside, "token-mean", config)
    assert o.item() == pytest.approx(-1.28, rel=1e-12)
    assert v.item() == pytest.approx(-1.28 * -1.0, rel=1e-12)  # −1.28 · Â · log π with log π = −1
    torch.testing.assert_close(og, g, rtol=1e-12, atol=0)
    below = _one_row(math.log(0.5), 1.0, 3)  # w = 0.5 < 1 − 0.2
    v, g, _ = run(compute_policy_loss_cispo, below, "token-mean", config)
    o, og, _ = run(ours("cispo"), below, "token-mean", config)
    torch.testing.assert_close(g, torch.full_like(g, -0.8 / 3), rtol=1e-12, atol=0)
    torch.testing.assert_close(og, torch.full_like(og, -0.5 / 3), rtol=1e-12, atol=0)


def test_token_sum_has_no_counterpart() -> None:
    with pytest.raises(ValueError, match="token-sum"):
        run(ours("gspo_token"), _fixed_batch(), "token-sum", actor_config(mode="token-sum"))


def test_data_parallel_needs_global_counts() -> None:
    config = actor_config(
        global_batch_info={"dp_size": 2, "batch_num_tokens": None, "global_batch_size": None}
    )
    with pytest.raises(ValueError, match="global_batch_size"):
        run(ours("gspo_token"), _fixed_batch(), "seq-mean-token-mean", config)
    with pytest.raises(ValueError, match="global_batch_size is required"):
        run(compute_policy_loss_gspo, _fixed_batch(), "seq-mean-token-mean", config)


def test_all_padding_micro_batch() -> None:
    """A micro-batch without a valid token: ours contributes 0 with a zero gradient; verl's GSPO
    divides 0 by 0 sequences when no global batch size is given."""
    batch = _fixed_batch()
    empty = Batch(torch.zeros_like(batch.mask), batch.log_probs, batch.old_log_probs, batch.advantages, None)
    o, og, om = run(ours("gspo_token"), empty, "seq-mean-token-mean", actor_config())
    assert o.item() == 0.0 and torch.all(og == 0) and om["actor/pg_clipfrac"] == 0.0
    v, _, _ = run(compute_policy_loss_gspo, empty, "seq-mean-token-mean", actor_config())
    assert torch.isnan(v)
    info = {"dp_size": 1, "batch_num_tokens": 10, "global_batch_size": 3}
    v, _, _ = run(
        compute_policy_loss_gspo, empty, "seq-mean-token-mean", actor_config(global_batch_info=info)
    )
    assert v.item() == 0.0


# ---------------------------------------------------------------------------------------------
# The documentation page runs as written

DOC = ROOT / "docs" / "integrations" / "verl.md"
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def test_doc_page_runs() -> None:
    text = DOC.read_text(encoding="utf-8")
    blocks = [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]
    assert blocks, f"{DOC} has no python block"
    namespace: dict[str, object] = {"__name__": "__main__"}
    for line, code in blocks:
        exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)
