"""The extension API: public role bases, the filter stage, the per-response slot, the registry.

A part written the way docs/extending.md says (subclass a public role base, implement one method)
must give the loss an independent float64 reference gives, through both of PolicyLoss's paths
(the single pass and the modules one after the other), with NaN/±inf padding inert. The loss side
must import nothing but the standard library, torch and tensordict, and the algorithm files
nothing private.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import policy_batches
from tensordict import TensorDict

import gspo_components as gc
from gspo_components.loss.numerics import (
    clamped_ratio,
    clean_padding,
    masked_mean,
    masked_row_mean,
    masked_row_sum,
)

ROOT = Path(__file__).resolve().parent.parent
LOSS_DIR = ROOT / "gspo_components" / "loss"


# -- parts written as a user would ----------------------------------------------------------------


class HardGate(gc.Clipper):
    """J_t = w Â inside |log w| ≤ band, 0 outside (a token outside passes no gradient)."""

    def __init__(self, band: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.band = band

    def surrogate(self, log_ratio, advantages, padding):
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        outside = log_ratio.abs() > self.band
        w = clamped_ratio(log_ratio, self.max_log_ratio)
        return -(w * adv) * (~outside).to(w.dtype), outside


class MeanRatioPerResponse(gc.Clipper):
    """One loss per response: −Â_i · mean_t w_{i,t} (uses the per-response slot)."""

    def surrogate(self, log_ratio, advantages, padding):
        w = clamped_ratio(log_ratio, self.max_log_ratio)
        return -(advantages * padding.row_mean(w)), torch.zeros_like(advantages, dtype=torch.bool)


class LongResponses(gc.TokenFilter):
    """Removes responses longer than ``limit`` tokens."""

    name = "long"

    def __init__(self, limit: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.limit = limit

    def keep(self, padding):
        return padding.lengths <= self.limit


class PositiveEntropyOnly(gc.TokenFilter):
    """Keeps tokens whose entropy is above 1 (reads an extra input)."""

    inputs = ("entropy",)

    def keep(self, padding, entropy):
        return entropy > 1.0


class ClampedSequenceLogRatio(gc.ImportanceWeighter):
    level = "sequence"

    def log_ratio(self, token_log_ratio, padding):
        return padding.row_mean(token_log_ratio).clamp(-0.05, 0.05)


class GroupMedianBaseline(gc.AdvantageEstimator):
    def estimate(self, rewards, group_ids, valid):
        out = torch.empty_like(rewards, dtype=torch.float32)
        for g in group_ids.unique():
            sel = group_ids == g
            out[sel] = (rewards[sel] - rewards[sel].median()).float()
        return out


def _sequential(loss: gc.PolicyLoss) -> gc.PolicyLoss:
    """The same chain, forced onto the modules-one-after-the-other path."""

    class Sequential(type(loss.weighter)):
        def forward(self, tensordict):
            return super().forward(tensordict)

    weighter = Sequential.__new__(Sequential)
    weighter.__dict__.update(loss.weighter.__dict__)
    out = gc.PolicyLoss(
        weighter,
        loss.clipper,
        loss.objective,
        rollout_correction=loss.rollout_correction,
        filters=list(loss.filters),
    )
    assert not out._one_pass
    return out


def _batch(seed: int, n: int = 6, t: int = 9, garbage: float = float("nan")) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    lp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = lp + 0.08 * torch.randn(n, t, generator=g, dtype=torch.float64)
    entropy = torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    lp, old, entropy = (torch.where(mask, x, garbage) for x in (lp, old, entropy))
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return TensorDict(
        log_probs=lp.requires_grad_(),
        old_log_probs=old,
        entropy=entropy,
        response_ids=torch.randint(3, 9, (n, t), generator=g),
        advantages=adv,
        response_mask=mask,
        batch_size=[n],
    )


def _rows(td: TensorDict):
    mask = td["response_mask"]
    for i in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if bool(mask[i, t])]
        yield i, idx


def _reference_hard_gate(td: TensorDict, band: float, aggregation: str, filters: tuple = ()) -> torch.Tensor:
    """Σ over rows written from the formula, float64, with the filters' keep rules re-derived."""
    lp, old, adv, ent = td["log_probs"], td["old_log_probs"], td["advantages"], td["entropy"]
    row_terms, row_lengths = [], []
    for i, idx in _rows(td):
        terms = []
        for t in idx:
            d = lp[i, t] - old[i, t]
            keep = 1.0
            if "long" in filters and len(idx) > 5:
                keep = 0.0
            if "entropy" in filters and not ent[i, t] > 1.0:
                keep = 0.0
            j = torch.exp(d) * adv[i] if abs(float(d.detach())) <= band else 0.0 * d
            terms.append(-j * keep)
        row_terms.append(terms)
        row_lengths.append(len(idx))
    if aggregation == "seq-mean-token-mean":
        return sum(sum(ts) / len(ts) for ts in row_terms) / len(row_terms)
    return sum(sum(ts) for ts in row_terms) / sum(row_lengths)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("filters", [(), ("long",), ("entropy",), ("long", "entropy")])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -1e30])
def test_user_clipper_and_filters_match_a_reference(aggregation, filters, garbage) -> None:
    parts = {"long": LongResponses(5), "entropy": PositiveEntropyOnly()}
    recipe = gc.compose(
        "hard-gate",
        gc.GroupNormalizedAdvantage(),
        gc.TokenLogRatio(),
        HardGate(0.1),
        aggregation=aggregation,
        filters=[parts[f] for f in filters],
    )
    assert recipe.loss._one_pass
    for seed in range(3):
        td = _batch(seed, garbage=garbage)
        ref = _reference_hard_gate(td, 0.1, aggregation, filters)
        (ref_grad,) = torch.autograd.grad(ref, td["log_probs"])
        for loss in (recipe.loss, _sequential(recipe.loss)):
            out = loss(td)
            (grad,) = torch.autograd.grad(out["loss"], td["log_probs"])
            torch.testing.assert_close(out["loss"].double(), ref.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
            assert torch.all(grad[~td["response_mask"]] == 0)
            for f in filters:
                name = parts[f].metric_name
                assert name in out.keys()


def test_filter_metric_is_the_fraction_of_valid_tokens_removed() -> None:
    td = _batch(4)
    recipe = gc.grpo(filters=[LongResponses(5)])
    out = recipe.loss(td)
    lengths = td["response_mask"].sum(-1)
    expected = float(lengths[lengths > 5].sum()) / float(lengths.sum())
    assert out["filtered_long"].item() == pytest.approx(expected, rel=1e-6)
    assert out["num_tokens"].item() == float(lengths.sum())  # the normalisers are not changed


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_per_response_slot(aggregation: str) -> None:
    recipe = gc.compose(
        "mean-ratio",
        gc.GroupNormalizedAdvantage(),
        gc.TokenLogRatio(),
        MeanRatioPerResponse(),
        aggregation=aggregation,
    )
    td = _batch(7, garbage=float("-inf"))
    values, lengths = [], []
    for i, idx in _rows(td):
        w = [torch.exp(td["log_probs"][i, t] - td["old_log_probs"][i, t]) for t in idx]
        values.append(-td["advantages"][i] * sum(w) / len(w))
        lengths.append(len(idx))
    if aggregation == "seq-mean-token-mean":
        ref = sum(values) / len(values)
    elif aggregation == "token-mean":
        ref = sum(v * n for v, n in zip(values, lengths, strict=True)) / sum(lengths)
    else:
        ref = sum(v * n for v, n in zip(values, lengths, strict=True)) / len(values)
    (ref_grad,) = torch.autograd.grad(ref, td["log_probs"])
    for loss in (recipe.loss, _sequential(recipe.loss)):
        out = loss(td)
        (grad,) = torch.autograd.grad(out["loss"], td["log_probs"])
        torch.testing.assert_close(out["loss"].double(), ref.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_user_weighter_and_advantage_estimator() -> None:
    recipe = gc.compose("clamped-gspo", GroupMedianBaseline(), ClampedSequenceLogRatio(), gc.NoClip())
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    td = _batch(9)
    td["rewards"], td["group_ids"] = rewards, groups
    recipe.advantage(td)
    assert td["advantages"].tolist() == [0.0, -1.0, 2.0, 0.0, 0.0, 3.0]
    ref = 0.0
    for i, idx in _rows(td):
        d = sum(td["log_probs"][i, t] - td["old_log_probs"][i, t] for t in idx) / len(idx)
        ref = ref - torch.exp(d.clamp(-0.05, 0.05)) * td["advantages"][i]
    ref = ref / td.shape[0]
    for loss in (recipe.loss, _sequential(recipe.loss)):
        torch.testing.assert_close(loss(td)["loss"].double(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_part_returning_a_wrong_shape_is_named() -> None:
    class Bad(gc.Clipper):
        def surrogate(self, log_ratio, advantages, padding):
            return log_ratio[:, :1], log_ratio[:, :1] > 0

    with pytest.raises(ValueError, match=r"Bad\.surrogate: its loss must be \[N\]"):
        gc.compose("bad", gc.GroupNormalizedAdvantage(), gc.TokenLogRatio(), Bad()).loss(_batch(1))

    class BadFilter(gc.TokenFilter):
        def keep(self, padding):
            return torch.ones(3)

    with pytest.raises(ValueError, match=r"BadFilter\.keep must return \[N\]"):
        gc.grpo(filters=[BadFilter()]).loss(_batch(1))
    with pytest.raises(ValueError, match="every filter must be a TokenFilter"):
        gc.grpo(filters=[HardGate()])


# -- recipes: names, compatibility, external weights ----------------------------------------------


@pytest.mark.parametrize("key", list(gc.RECIPES))
def test_every_recipe_takes_name_and_is_exported(key: str) -> None:
    factory = gc.RECIPES[key]
    assert getattr(gc, key) is factory
    assert key in gc.__all__
    assert factory().name == key
    assert factory(name=f"{key}-variant").name == f"{key}-variant"
    assert factory.__doc__ and "arXiv" in factory.__doc__


def test_sequence_weighter_refuses_per_token_advantages() -> None:
    with pytest.raises(ValueError, match="gspo_token"):
        gc.gspo(advantage=gc.PerTokenAdvantage())
    assert gc.gspo_token(per_token_advantages=True).advantage.per_token


def test_stale_weights_in_the_batch_are_refused_and_explicit_ones_apply() -> None:
    td = _batch(2)
    td["is_weights"] = torch.full(td["response_mask"].shape, 2.0)
    with pytest.raises(ValueError, match="'is_weights', an intermediate of the chain"):
        gc.grpo().loss(td)
    del td["is_weights"]
    td["loss_weights"] = torch.ones(td["response_mask"].shape)
    with pytest.raises(ValueError, match="'loss_weights'"):
        gc.grpo().loss(td)
    del td["loss_weights"]
    weights = torch.rand(td["response_mask"].shape, dtype=torch.float64)
    plain = gc.grpo(aggregation="token-mean")
    base = gc.compose(
        "x", gc.GroupNormalizedAdvantage(), gc.TokenLogRatio(), gc.PPOClip(), aggregation="token-mean"
    )
    out = plain.loss(td, is_weights=weights)
    mask = td["response_mask"]
    d = (td["log_probs"] - td["old_log_probs"]).detach()
    w = torch.exp(torch.where(mask, d, 0.0))
    adv = td["advantages"][:, None]
    j = torch.minimum(w * adv, w.clamp(0.8, 1.2) * adv)
    ref = -(torch.where(mask, j * weights, 0.0)).sum() / mask.sum()
    torch.testing.assert_close(out["loss"].detach().double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_sequential(base.loss)(td, is_weights=weights)["loss"], out["loss"])
    with pytest.raises(ValueError, match="own rollout_correction"):
        gc.grpo(rollout_correction=gc.RolloutCorrection()).loss(td, is_weights=weights)


# -- numerics -------------------------------------------------------------------------------------


@given(batch=policy_batches(max_n=5, max_len=12))
def test_numerics_helpers_match_a_loop_and_ignore_padding(batch) -> None:
    x = batch.log_probs.clone().requires_grad_()
    mask = batch.mask
    sums, means = [], []
    for i, idx in _rows(TensorDict(response_mask=mask, batch_size=[mask.shape[0]])):
        s = math.fsum(float(x.detach()[i, t]) for t in idx)
        sums.append(s)
        means.append(s / len(idx) if idx else 0.0)
    assert masked_row_sum(x, mask).tolist() == pytest.approx(sums, rel=1e-12, abs=1e-12)
    assert masked_row_mean(x, mask).tolist() == pytest.approx(means, rel=1e-12, abs=1e-12)
    total = sum(sums) / max(1, int(mask.sum()))
    assert masked_mean(x, mask).item() == pytest.approx(total, rel=1e-12, abs=1e-12)
    cleaned = clean_padding(x, mask)
    assert torch.all(cleaned[~mask] == 0) and torch.equal(cleaned[mask], x[mask])
    (grad,) = torch.autograd.grad(masked_row_mean(x, mask).sum(), x)
    assert torch.all(grad[~mask] == 0) and torch.isfinite(grad).all()


@given(v=st.floats(-60, 60))
def test_clamped_ratio(v: float) -> None:
    x = torch.tensor(v, dtype=torch.float64, requires_grad=True)
    w = clamped_ratio(x)
    assert w.item() == pytest.approx(math.exp(min(max(v, -20.0), 20.0)), rel=1e-12)
    (g,) = torch.autograd.grad(w, x)
    assert g.item() == (
        pytest.approx(math.exp(v), rel=1e-12) if abs(v) <= 20 else 0.0
    )  # the band is closed, as in autograd's clamp


def test_numerics_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="'mask' must be a bool tensor"):
        masked_row_mean(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"shape of a 2-D 'mask' \[2, 3\], got \[2, 4\]"):
        clean_padding(torch.ones(2, 4), torch.ones(2, 3, dtype=torch.bool))


# -- layout ---------------------------------------------------------------------------------------

ALLOWED_TOP_LEVEL = {"torch", "tensordict", "__future__"} | set(sys.stdlib_module_names)


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, [alias.name]
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names]


@pytest.mark.parametrize("path", sorted(LOSS_DIR.rglob("*.py")), ids=lambda p: str(p.relative_to(LOSS_DIR)))
def test_loss_side_imports_only_torch_tensordict_and_itself(path: Path) -> None:
    depth = len(path.relative_to(LOSS_DIR).parts) - 1  # 0 for loss/x.py, 1 for loss/algorithms/x.py
    for level, module, _names in _imports(path):
        if level == 0:
            assert module.split(".")[0] in ALLOWED_TOP_LEVEL, f"{path.name} imports {module}"
        else:
            assert level - 1 <= depth, (
                f"{path.name} imports from outside gspo_components/loss ({'.' * level}{module})"
            )


@pytest.mark.parametrize("path", sorted((LOSS_DIR / "algorithms").glob("[!_]*.py")), ids=lambda p: p.name)
def test_algorithm_files_import_nothing_private(path: Path) -> None:
    for _level, module, names in _imports(path):
        private = [p for p in module.split(".") if p.startswith("_") and not p.startswith("__")]
        assert not private, f"{path.name} imports from the private module {module}"
        assert not any(n.startswith("_") for n in names), f"{path.name} imports {names} from {module}"


def test_importing_the_package_loads_no_rollout_or_trainer_code() -> None:
    code = (
        "import sys, gspo_components\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'vllm', 'trl', 'verl', 'torchrl')"
        " or m.startswith(('gspo_components.rollout', 'gspo_components.moe', 'gspo_components.integrations'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("key", list(gc.RECIPES))
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
def test_every_stock_recipe_runs_both_paths_with_inert_padding(key: str, garbage: float) -> None:
    """Every registered recipe, on a batch whose padding holds garbage: a finite loss, exactly 0
    gradient at padding, and the same loss and gradient through both PolicyLoss paths (a random
    part, Clip-Cov's draw, is seeded alike)."""
    recipe = gc.RECIPES[key]()
    td = _batch(11, garbage=garbage)
    td["rewards"] = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    td["group_ids"] = torch.tensor([0, 0, 0, 1, 1, 1])
    if recipe.advantage.per_token:
        td["token_advantages"] = torch.randn(td["response_mask"].shape, dtype=torch.float64)
    recipe.advantage(td)
    results = []
    for loss in (recipe.loss, _sequential(recipe.loss)):
        torch.manual_seed(0)
        out = loss(td)
        (grad,) = torch.autograd.grad(out[loss.out_key("loss")], td["log_probs"])
        assert torch.isfinite(out["loss"]) and torch.isfinite(grad).all()
        assert torch.all(grad[~td["response_mask"]] == 0)
        results.append((out["loss"], grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-8)


def test_required_keys_name_what_the_parts_read() -> None:
    assert "entropy" not in gc.grpo().loss.required_keys
    assert "entropy" in gc.grpo(filters=[gc.TopEntropyFilter(0.2)]).loss.required_keys
    assert "entropy" in gc.aspo().loss.required_keys
    assert "rollout_log_probs" in gc.grpo(rollout_correction=gc.RolloutCorrection()).loss.required_keys
    assert "log_ratio" not in gc.grpo().loss.required_keys  # written by the weighter


def test_the_docs_recipe_table_lists_exactly_the_registry() -> None:
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    section = text.split("## The stock recipes", 1)[1].split("\n## ", 1)[0]
    names = [line.split("`")[1].removesuffix("()") for line in section.splitlines() if line.startswith("| `")]
    assert names == list(gc.RECIPES), "docs/recipes.md's table and gspo_components.RECIPES differ"


def test_parts_that_need_one_advantage_per_response_say_so() -> None:
    for key in ("gmpo", "vespo", "gtpo"):
        assert gc.RECIPES[key]().loss.per_response_advantages, key
        with pytest.raises(ValueError, match=r"needs one advantage per response \(\[N\]\)"):
            gc.RECIPES[key](advantage=gc.PerTokenAdvantage())
    assert not gc.grpo().loss.per_response_advantages


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_metric_only_inputs_are_checked_at_valid_positions(bad: float) -> None:
    """Before: a NaN entropy or log-ratio read only for metrics gave a silently NaN metric."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    values = torch.zeros(2, 3)
    values[0, 2] = bad  # padding: inert
    assert torch.isfinite(gc.loss_metrics(mask, entropy=values, log_ratio=values)["entropy"])
    assert torch.isfinite(gc.objective_loss(torch.zeros(2, 3), mask, entropy=values)[1]["entropy"])
    values[0, 1] = bad  # valid
    with pytest.raises(ValueError, match="'entropy' at valid positions"):
        gc.loss_metrics(mask, entropy=values)
    with pytest.raises(ValueError, match="'log_ratio' at valid positions"):
        gc.loss_metrics(mask, log_ratio=values)
    with pytest.raises(ValueError, match="'entropy' at valid positions"):
        gc.objective_loss(torch.zeros(2, 3), mask, entropy=values)
    td = TensorDict(token_loss=torch.zeros(2, 3), response_mask=mask, log_ratio=values, batch_size=[2])
    with pytest.raises(ValueError, match="'log_ratio' at valid positions"):
        gc.Objective()(td)
    with pytest.raises(ValueError, match=r"advantage_eps"):
        gc.gmpo(advantage_eps=-1.0)
