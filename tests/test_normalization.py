"""Normaliser tests: property 12 of docs/algorithms.md (micro-batching and data parallelism).

Proves, for every aggregation in ``AGGREGATIONS`` and the recipes grpo, gspo, gspo_token,
dr_grpo, dapo and cispo:

- gradient accumulation: splitting a batch into k random micro-batches (random row partition,
  either kept at the batch's width or re-padded to each micro-batch's own width), computing
  ``norm = recipe.step_normalizers(micro_batches)`` and summing the gradients of
  ``recipe.loss(mb, normalizers=norm)["loss"]`` gives the whole batch's gradient (fp64,
  rtol 1e-10), and the micro-batch losses sum to the whole batch's loss;
- the property is not vacuous: with each micro-batch's own normalisers (or, for the re-padded
  ``seq-mean-token-sum-norm``, without the step's width), an uneven split gives a different
  gradient;
- data parallelism, with a real two-process ``torch.distributed`` run (gloo backend, CPU): each
  rank holds a shard of different size and width, its loss is back-propagated through
  ``DistributedDataParallel`` (which averages gradients over ranks), and the averaged gradient
  equals the single-process gradient of the whole batch, and the mean of the ranks' losses equals
  the whole loss; and the same with 2 ranks × 2 micro-batches and ``step_normalizers``, which
  all-reduces the counts across ranks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import PolicyBatch, policy_batches
from tensordict import TensorDict

import gspo_components as gc
from gspo_components import AGGREGATIONS, dapo, dr_grpo, grpo, gspo
from gspo_components.loss.recipes import Recipe

# Every registered recipe whose parts compute each response's loss from that response alone
# (PolicyLoss.micro_batch_exact); the others are checked to say so.
RECIPES: dict[str, Callable[..., Recipe]] = {
    name: factory for name, factory in gc.RECIPES.items() if factory().loss.micro_batch_exact
}


def make_td(lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> TensorDict:
    return TensorDict(
        {"log_probs": lp, "old_log_probs": old, "advantages": adv, "response_mask": mask},
        batch_size=[mask.shape[0]],
    )


def shard(
    lp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    rows: Sequence[int],
    repad: bool,
) -> TensorDict:
    """The rows ``rows`` of a batch, optionally re-padded to their own width (max length)."""
    index = torch.tensor(list(rows))
    width = int(mask[index].sum(-1).max()) if repad else mask.shape[1]
    return make_td(lp[index, :width], old[index, :width], adv[index], mask[index, :width])


def split_rows(n: int, k: int, seed: int) -> list[list[int]]:
    """A random partition of range(n) into k non-empty parts of uneven sizes."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: k - 1].add(1).tolist()) if k > 1 else []
    bounds = [0, *cuts, n]
    return [perm[a:b] for a, b in itertools.pairwise(bounds)]


def trimmed(batch: PolicyBatch) -> PolicyBatch:
    """The same batch without its padding columns beyond the longest sequence."""
    width = int(batch.lengths.max())
    return PolicyBatch(
        mask=batch.mask[:, :width],
        lengths=batch.lengths,
        log_probs=batch.log_probs[:, :width],
        old_log_probs=batch.old_log_probs[:, :width],
        advantages=batch.advantages,
        token_advantages=batch.token_advantages[:, :width],
        garbage=batch.garbage,
    )


def loss_scale(batch: PolicyBatch) -> float:
    """A bound on the size of the per-token terms, for an absolute tolerance on summed losses."""
    log_ratio = torch.where(batch.mask, batch.log_probs - batch.old_log_probs, 0.0)
    ratio = float(torch.exp(log_ratio.abs().clamp(max=20.0)).max())
    return ratio * (1.0 + float(batch.advantages.abs().max())) * batch.mask.shape[1]


# ---------------------------------------------------------------------------------------------
# Gradient accumulation in one process
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200)
@given(
    batch=policy_batches(max_n=8),
    recipe_name=st.sampled_from(sorted(RECIPES)),
    aggregation=st.sampled_from(AGGREGATIONS),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    repad=st.sampled_from(["no", "own-width+max_length", "own-width"]),
    pass_tensordicts=st.booleans(),
)
def test_micro_batches_reproduce_the_whole_batch(
    batch: PolicyBatch,
    recipe_name: str,
    aggregation: str,
    k: int,
    seed: int,
    repad: str,
    pass_tensordicts: bool,
) -> None:
    """repad: "no" keeps the batch's width; "own-width+max_length" re-pads each micro-batch to
    its own width and passes the step's width as max_length; "own-width" re-pads a batch whose
    width is its longest sequence, and relies on step_normalizers taking the widest micro-batch."""
    recipe = RECIPES[recipe_name](aggregation=aggregation)
    if repad == "own-width":
        batch = trimmed(batch)
    n, width = batch.mask.shape
    k = min(k, n)

    lp_whole = batch.log_probs.clone().requires_grad_(True)
    whole = recipe.loss(make_td(lp_whole, batch.old_log_probs, batch.advantages, batch.mask))["loss"]
    whole.backward()

    lp_micro = batch.log_probs.clone().requires_grad_(True)
    parts = [
        shard(lp_micro, batch.old_log_probs, batch.advantages, batch.mask, rows, repad != "no")
        for rows in split_rows(n, k, seed)
    ]
    given_mbs = parts if pass_tensordicts else [mb["response_mask"] for mb in parts]
    if repad == "own-width+max_length":
        # the micro-batches may all be narrower than the batch: Dr.GRPO's L_norm is the step's width
        norm = recipe.step_normalizers(given_mbs, max_length=width)
    else:
        norm = recipe.step_normalizers(given_mbs)
    assert norm.num_tokens == float(batch.lengths.sum()) and norm.num_sequences == float(n)
    assert norm.max_length == float(width) and norm.num_replicas == 1
    total = torch.zeros((), dtype=torch.float64)
    for mb in parts:
        loss = recipe.loss(mb, normalizers=norm)["loss"]
        loss.backward()
        total = total + loss.detach()

    assert lp_micro.grad is not None and lp_whole.grad is not None
    torch.testing.assert_close(lp_micro.grad, lp_whole.grad, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(total, whole.detach(), rtol=1e-10, atol=1e-13 * loss_scale(batch))


def _uneven_batch(width: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four rows of lengths 1, 5, 6, 7 at width 9 (two columns of padding; fewer when ``width``
    trims them), mixed advantages."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 5, 6, 7])
    mask = torch.arange(9)[None] < lengths[:, None]
    lp = -torch.rand(4, 9, generator=gen, dtype=torch.float64) * 3
    old = lp - 0.05 * torch.randn(4, 9, generator=gen, dtype=torch.float64)
    nan = torch.full_like(lp, float("nan"))
    adv = torch.tensor([1.0, -0.5, 0.8, -1.2], dtype=torch.float64)
    lp, old, mask = lp[:, :width], old[:, :width], mask[:, :width]
    return torch.where(mask, lp, nan[:, :width]), torch.where(mask, old, nan[:, :width]), adv, mask


def _accumulated_grad(
    recipe: Recipe,
    parts_rows: list[list[int]],
    repad: bool,
    norm_fn: Callable[[list[TensorDict]], object],
    width: int = 9,
) -> torch.Tensor:
    lp, old, adv, mask = _uneven_batch(width)
    lp = lp.requires_grad_(True)
    parts = [shard(lp, old, adv, mask, rows, repad) for rows in parts_rows]
    norm = norm_fn(parts)
    for mb in parts:
        recipe.loss(mb, normalizers=norm)["loss"].backward()  # type: ignore[arg-type]
    assert lp.grad is not None
    return lp.grad


def test_own_normalizers_give_a_different_gradient() -> None:
    """The counter-example that property 12 guards against (each aggregation)."""
    split = [[0], [1, 2, 3]]
    for aggregation in AGGREGATIONS:
        recipe = grpo(aggregation=aggregation)
        lp, old, adv, mask = _uneven_batch()
        lp = lp.requires_grad_(True)
        recipe.loss(make_td(lp, old, adv, mask))["loss"].backward()
        assert lp.grad is not None
        whole = lp.grad

        exact = _accumulated_grad(recipe, split, False, lambda parts, r=recipe: r.step_normalizers(parts))
        torch.testing.assert_close(exact, whole, rtol=1e-10, atol=0.0)
        own = _accumulated_grad(recipe, split, False, lambda parts: None)
        assert not torch.allclose(own, whole, rtol=1e-3, atol=0.0), aggregation

    # re-padded micro-batches: the step's width must be given for Dr.GRPO's length norm
    recipe = dr_grpo()
    lp, old, adv, mask = _uneven_batch()
    lp = lp.requires_grad_(True)
    recipe.loss(make_td(lp, old, adv, mask))["loss"].backward()
    assert lp.grad is not None
    exact = _accumulated_grad(recipe, split, True, lambda parts: recipe.step_normalizers(parts, max_length=9))
    torch.testing.assert_close(exact, lp.grad, rtol=1e-10, atol=0.0)
    narrow = _accumulated_grad(recipe, split, True, lambda parts, r=recipe: r.step_normalizers(parts))
    torch.testing.assert_close(narrow, lp.grad * 9 / 7, rtol=1e-10, atol=0.0)  # width 7, not 9

    # a batch as wide as its longest sequence: the widest micro-batch gives the step's width,
    # wherever it comes in the step
    lp, old, adv, mask = _uneven_batch(width=7)
    lp = lp.requires_grad_(True)
    recipe.loss(make_td(lp, old, adv, mask))["loss"].backward()
    assert lp.grad is not None
    for order in ([[0], [1, 2, 3]], [[1, 2, 3], [0]], [[2], [3, 0], [1]]):
        got = _accumulated_grad(
            recipe, order, True, lambda parts, r=recipe: r.step_normalizers(parts), width=7
        )
        torch.testing.assert_close(got, lp.grad, rtol=1e-10, atol=0.0)


# ---------------------------------------------------------------------------------------------
# Data parallelism: two real processes, gloo, DistributedDataParallel
# ---------------------------------------------------------------------------------------------

WORLD = 2
DIST_RECIPES = ("grpo", "gspo", "cispo")
DIST_LENGTHS = (5, 2, 9, 1, 7, 3, 4)
SHARDS = ([0, 1, 3], [2, 4, 5, 6])  # 3 sequences of width 5 / 4 sequences of width 9
MICRO = ([[0], [1, 3]], [[2, 5], [4, 6]])  # per rank, each re-padded to its own width


def dist_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole batch (width = its longest sequence), with clipped and unclipped rows for both
    token and sequence ratios, mixed advantages and NaN padding."""
    gen = torch.Generator().manual_seed(1234)
    n, width = len(DIST_LENGTHS), max(DIST_LENGTHS)
    mask = torch.arange(width)[None] < torch.tensor(DIST_LENGTHS)[:, None]
    lp = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 4
    row_scale = torch.tensor([0.3, 1e-3, 0.5, 2e-4, 0.1, 1e-3, 0.4], dtype=torch.float64)[:, None]
    old = lp - (torch.rand(n, width, generator=gen, dtype=torch.float64) * 2 - 1) * row_scale
    adv = torch.tensor([1.2, -0.7, 0.4, 1.5, -1.1, 0.9, -0.3], dtype=torch.float64)
    nan = torch.full_like(lp, float("nan"))
    return torch.where(mask, lp, nan), torch.where(mask, old, nan), adv, mask


class ShardedLogProbs(torch.nn.Module):
    """Stands in for a model: the whole batch's log-probs are its parameter (identical on every
    rank, as weights are), and a forward call scores some rows of the batch."""

    def __init__(self, lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.lp = torch.nn.Parameter(lp.clone())
        self.old, self.adv, self.mask = old, adv, mask

    def forward(self, rows: list[int], recipe: Recipe, normalizers: object = None) -> torch.Tensor:
        td = shard(self.lp, self.old, self.adv, self.mask, rows, repad=True)
        return recipe.loss(td, normalizers=normalizers)["loss"]  # type: ignore[arg-type]


def _ddp_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        module = ShardedLogProbs(*dist_batch())
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        results: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}

        def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
            value = value.detach().clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            return value / WORLD

        for name in DIST_RECIPES:
            for aggregation in AGGREGATIONS:
                recipe = RECIPES[name](aggregation=aggregation)
                # one shard per rank: the Objective sums the counts across ranks itself
                module.lp.grad = None
                loss = ddp(SHARDS[rank], recipe)
                loss.backward()  # DDP averages the gradient over the ranks here
                results[(name, aggregation, "ddp")] = (module.lp.grad.clone(), mean_over_ranks(loss))

                # two micro-batches per rank, the step's normalisers all-reduced across ranks
                module.lp.grad = None
                masks = [
                    module.mask[torch.tensor(rows)][:, : max(DIST_LENGTHS[r] for r in rows)]
                    for rows in MICRO[rank]
                ]
                norm = recipe.step_normalizers(masks)
                with ddp.no_sync():  # accumulate locally, as gradient accumulation does
                    first = ddp(MICRO[rank][0], recipe, norm)
                    first.backward()
                second = ddp(MICRO[rank][1], recipe, norm)
                second.backward()  # synchronises the accumulated gradient
                results[(name, aggregation, "ddp+micro")] = (
                    module.lp.grad.clone(),
                    mean_over_ranks(first + second),
                )
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path: Path, timeout_s: float = 240.0) -> dict:
    out = tmp_path / "results.pt"
    ctx = mp.start_processes(
        _ddp_worker,
        args=(str(tmp_path / "store"), str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {WORLD}-rank run did not finish within {timeout_s} s")
    finally:
        for proc in ctx.processes:  # only the two workers started above
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    assert out.exists(), "rank 0 wrote no results"
    return torch.load(out)


def test_data_parallel_two_ranks_match_the_whole_batch(tmp_path: Path) -> None:
    results = _run_two_ranks(tmp_path)
    assert not dist.is_initialized()  # the test process itself stays single-process
    lp, old, adv, mask = dist_batch()
    assert len(results) == len(DIST_RECIPES) * len(AGGREGATIONS) * 2
    for name in DIST_RECIPES:
        for aggregation in AGGREGATIONS:
            recipe = RECIPES[name](aggregation=aggregation)
            leaf = lp.clone().requires_grad_(True)
            whole = recipe.loss(make_td(leaf, old, adv, mask))["loss"]
            whole.backward()
            assert leaf.grad is not None and bool((leaf.grad != 0).any())
            for case in ("ddp", "ddp+micro"):
                grad, mean_loss = results[(name, aggregation, case)]
                where = f"{name}/{aggregation}/{case}"
                torch.testing.assert_close(
                    grad, leaf.grad, rtol=1e-10, atol=0.0, msg=lambda m, w=where: f"{w}: {m}"
                )
                torch.testing.assert_close(
                    mean_loss, whole.detach(), rtol=1e-10, atol=1e-14, msg=lambda m, w=where: f"{w}: {m}"
                )


def test_empty_micro_batch_with_step_normalizers_contributes_exact_zero() -> None:
    """A micro-batch whose rows were all filtered (e.g. on one rank) still yields a loss that
    joins backward: exactly 0 with exactly zero gradient, while the step's normalisers come from
    the non-empty micro-batches. Without step normalisers it is an error (nothing to optimise)."""
    n, t = 3, 4
    lp = torch.randn(n, t, dtype=torch.float64, requires_grad=True)
    empty = TensorDict(
        log_probs=lp,
        old_log_probs=lp.detach() + 0.1,
        response_mask=torch.zeros(n, t, dtype=torch.bool),
        advantages=torch.randn(n, dtype=torch.float64),
        batch_size=[n],
    )
    full = empty.clone()
    full["response_mask"] = torch.ones(n, t, dtype=torch.bool)
    for make in (grpo, gspo, dapo):
        recipe = make()
        norm = recipe.step_normalizers([full, empty])
        out = recipe.loss(empty, normalizers=norm)
        (grad,) = torch.autograd.grad(out["loss"], lp)
        assert out["loss"].item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))
        with pytest.raises(ValueError, match="selects no token"):
            recipe.loss(empty)


def test_recipes_with_batch_statistics_say_so() -> None:
    """The recipes left out above are exactly those with a part that reads the whole batch."""
    coupled = sorted(set(gc.RECIPES) - set(RECIPES))
    assert coupled == ["aspo", "clip_cov", "gtpo", "kl_cov", "m2po"]
    assert not gc.grpo(filters=[gc.TopEntropyFilter(0.2)]).loss.micro_batch_exact
    assert gc.grpo(filters=[gc.OPSMFilter(0.1)]).loss.micro_batch_exact
