"""torch.compile(fullgraph=True) of every stock recipe, with validation off: 0 graph breaks.

``fullgraph=True`` turns any graph break (a host synchronisation such as ``.item()`` or
``bool(tensor)``, or a data-dependent Python branch) into an error, so compiling is the check.
Most cases compile with the ``aot_eager`` backend, which traces forward *and* backward through
AOTAutograd in a second or so; one case runs inductor, the default backend. Compiled results
must equal eager ones: loss, every metric, and the gradient.

The batches hold NaN and ±inf at padding and an empty row, so the compiled graphs keep padding
inert too.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

import gspo_components as gc

RECIPES = tuple(gc.RECIPES)
# The pure-function chain exists for the recipes built from the stock pure functions.
PURE_RECIPES = ("grpo", "gspo", "gspo_token", "dr_grpo", "dapo", "cispo")


@pytest.fixture(autouse=True)
def _validation_off():
    torch._dynamo.reset()
    with gc.validation(False):
        yield
    torch._dynamo.reset()


def _batch(n: int = 6, t: int = 7, seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, t, generator=gen) > 0.3
    mask[0] = False  # an empty (filtered) row
    mask[1, 0] = True
    old = -torch.rand(n, t, generator=gen) * 2
    lp = old + 0.3 * torch.randn(n, t, generator=gen)
    ref = old + 0.2 * torch.randn(n, t, generator=gen)
    # garbage at padding: it must stay inert in compiled graphs too
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    fill = garbage[torch.arange(n * t) % 4].view(n, t)
    old = torch.where(mask, old, fill).to(dtype)
    lp = torch.where(mask, lp, fill.flip(0)).to(dtype)
    ref = torch.where(mask, ref, fill).to(dtype)
    adv = torch.randn(n, generator=gen)
    return mask, lp, old, ref, adv


def _grad_and_out(fn, lp: torch.Tensor, *args):
    leaf = lp.clone().requires_grad_()
    loss, metrics = fn(leaf, *args)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grad


def _assert_same(eager, compiled, exact: bool = True) -> None:
    loss_e, metrics_e, grad_e = eager
    loss_c, metrics_c, grad_c = compiled
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(loss_c, loss_e, **tol)
    assert set(metrics_c) == set(metrics_e)
    for key in metrics_e:
        torch.testing.assert_close(metrics_c[key], metrics_e[key], equal_nan=True, **tol, msg=key)
    torch.testing.assert_close(grad_c, grad_e, **tol)
    assert torch.isfinite(grad_c).all()


# -- the pure-function chain of each stock recipe -------------------------------------------------

_WEIGHTER = {
    "grpo": gc.token_log_ratio,
    "gspo": gc.sequence_log_ratio,
    "gspo_token": gc.sequence_token_log_ratio,
    "dr_grpo": gc.token_log_ratio,
    "dapo": gc.token_log_ratio,
    "cispo": gc.token_log_ratio,
}


def _pure_chain(name: str):
    """The recipe written with the pure functions (its defaults, plus a k3 KL term)."""
    recipe = getattr(gc, name)()
    objective = recipe.loss.objective
    clipper = recipe.loss.clipper

    def chain(lp, old, ref, adv, mask):
        log_ratio = _WEIGHTER[name](lp, old, mask)
        if name == "cispo":
            token_loss, clipped = gc.cispo_loss(log_ratio, adv, mask, **clipper.params)
        else:
            token_loss, clipped = gc.ppo_clip_loss(log_ratio, adv, mask, **clipper.params)
        kl = gc.kl_penalty(lp, ref, mask)
        loss, terms = gc.objective_loss(
            token_loss, mask, aggregation=objective.aggregation, kl=kl, kl_coef=0.05, sync_ranks=False
        )
        metrics = gc.loss_metrics(mask, log_ratio=log_ratio, clipped=clipped, kl=kl)
        return loss, {**metrics, **{f"term_{k}": v for k, v in terms.items()}}

    return chain


@pytest.mark.parametrize("name", PURE_RECIPES)
def test_pure_chain_compiles_without_graph_breaks(name: str) -> None:
    mask, lp, old, ref, adv = _batch()
    chain = _pure_chain(name)
    eager = _grad_and_out(chain, lp, old, ref, adv, mask)
    compiled = _grad_and_out(
        torch.compile(chain, fullgraph=True, backend="aot_eager"), lp, old, ref, adv, mask
    )
    _assert_same(eager, compiled)


# -- recipe.loss on a TensorDict -----------------------------------------------------------------


def _recipe_fn(recipe: gc.Recipe):
    def fn(lp, old, ref, adv, mask):
        td = TensorDict(
            {
                "log_probs": lp,
                "old_log_probs": old,
                "ref_log_probs": ref,
                "advantages": adv,
                "response_mask": mask,
                "entropy": (lp.detach() * -0.5).clamp(min=0.0),
                "response_ids": torch.arange(lp.numel()).view(lp.shape).remainder(7),
                "group_ids": torch.arange(lp.shape[0]) // 2,
            },
            batch_size=[lp.shape[0]],
        )
        out = recipe.loss(td)
        return out["loss"], {k: out[k] for k in out.keys() if k != "loss"}

    return fn


# Algorithms that select a data-dependent number of tokens (as their papers and verl do: a fraction
# of the tokens in a covariance band, chosen with nonzero/randperm; runs of conflict tokens; the
# tokens of the high-entropy responses) have data-dependent shapes, which fullgraph tracing refuses.
# They compile with graph breaks, and give the eager result.
DATA_DEPENDENT_SHAPES = {"clip_cov", "kl_cov", "gtpo", "aspo"}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loss_on_a_tensordict_compiles_without_graph_breaks(name: str) -> None:
    recipe = getattr(gc, name)(kl_coef=0.05)
    assert recipe.loss._one_pass
    mask, lp, old, ref, adv = _batch(seed=1)
    fn = _recipe_fn(recipe)
    if name in DATA_DEPENDENT_SHAPES:
        with pytest.raises(Exception, match=r"(?i)data.dependent|dynamic shape|Unsupported|graph break"):
            torch.compile(fn, fullgraph=True, backend="aot_eager")(lp, old, ref, adv, mask)

        def seeded(*args, fn=fn):
            torch.manual_seed(0)  # Clip-Cov draws its tokens at random, like verl
            return fn(*args)

        eager = _grad_and_out(seeded, lp, old, ref, adv, mask)
        compiled = _grad_and_out(torch.compile(seeded, backend="aot_eager"), lp, old, ref, adv, mask)
    else:
        eager = _grad_and_out(fn, lp, old, ref, adv, mask)
        compiled = _grad_and_out(
            torch.compile(fn, fullgraph=True, backend="aot_eager"), lp, old, ref, adv, mask
        )
    _assert_same(eager, compiled)


def test_recipe_loss_compiles_module_by_module_too() -> None:
    """The chain that runs the four modules one after the other (a custom composition)."""
    recipe = gc.gspo_token(kl_coef=0.05)
    recipe.loss._one_pass = False
    mask, lp, old, ref, adv = _batch(seed=2)
    token_adv = adv.unsqueeze(-1) * torch.linspace(0.5, 1.5, mask.shape[1])
    fn = _recipe_fn(recipe)
    eager = _grad_and_out(fn, lp, old, ref, token_adv, mask)
    compiled = _grad_and_out(
        torch.compile(fn, fullgraph=True, backend="aot_eager"), lp, old, ref, token_adv, mask
    )
    _assert_same(eager, compiled)


def test_recipe_loss_with_rollout_correction_and_bf16_inputs_compiles() -> None:
    recipe = gc.grpo(rollout_correction=gc.RolloutCorrection(level="sequence-geometric"))
    mask, lp, old, ref, adv = _batch(seed=3, dtype=torch.bfloat16)

    def fn(lp, old, rollout, adv, mask):
        td = TensorDict(
            {
                "log_probs": lp,
                "old_log_probs": old,
                "rollout_log_probs": rollout,
                "advantages": adv,
                "response_mask": mask,
            },
            batch_size=[lp.shape[0]],
        )
        out = recipe.loss(td)
        assert out["loss"].dtype == torch.float32
        return out["loss"], {k: out[k] for k in out.keys() if k != "loss"}

    eager = _grad_and_out(fn, lp, old, ref, adv, mask)
    compiled = _grad_and_out(torch.compile(fn, fullgraph=True, backend="aot_eager"), lp, old, ref, adv, mask)
    _assert_same(eager, compiled)


def test_recipe_loss_compiles_with_inductor() -> None:
    """The default backend generates fused kernels: equal to eager up to float rounding."""
    recipe = gc.gspo()
    mask, lp, old, ref, adv = _batch(seed=4)
    fn = _recipe_fn(recipe)
    eager = _grad_and_out(fn, lp, old, ref, adv, mask)
    compiled = _grad_and_out(torch.compile(fn, fullgraph=True), lp, old, ref, adv, mask)
    _assert_same(eager, compiled, exact=False)


def test_validation_on_is_what_breaks_the_graph() -> None:
    """The checks read values back to the host: with validation on, fullgraph compile refuses."""
    recipe = gc.grpo()
    mask, lp, old, ref, adv = _batch(seed=5)
    with gc.validation(True):
        with pytest.raises(Exception, match=r"(?i)graph break|data-dependent|item|bool|Unsupported"):
            torch.compile(_recipe_fn(recipe), fullgraph=True, backend="eager")(lp, old, ref, adv, mask)
