"""Benchmark: each stock recipe's ``recipe.loss`` against a minimal hand-written torch loss.

For every recipe in ``gspo_components.RECIPES`` (the six original ones when the code under
``--src`` predates the registry) it times forward plus backward of

- ``recipe``: ``recipe.loss(td)`` on a TensorDict (validation on, the library default, and all
  metrics computed), then ``out["loss"].backward()``;
- ``recipe_novalidate``: the same inside ``gspo_components.validation(False)`` (when the code
  under test has the switch);
- ``minimal``: the same algorithm written by hand in a few lines of torch with the recipe's
  defaults (mask by multiplication, no validation, no metrics), in :data:`MINIMAL`; a recipe
  without one stops the run with a message naming it;

and reports the ratio of medians recipe / minimal, measured in the same run, interleaved.

Before timing, the two losses must agree (else the run stops): value (except cispo and dppo,
whose minimal value is verl's −Â·sg(min(w, C))·ℓ) to 1e-4 relative and gradient to 1e-4 of the
largest gradient, on the timed batch and on a small off-policy batch (ℓ − ℓ_old of std 0.5) where
the clips, masks and dual clips bind. That is an independent check of the algorithms. For
clip_cov (a random draw from torch's global generator) torch is seeded before each call.

Inputs (:func:`make_inputs`): N = 256 responses in groups of 8, T = 4096 tokens, float32,
right-padded with lengths drawn uniformly from [1, T], finite values in the padding (so that the
minimal losses, which mask by multiplication, are correct), advantages [N], entropy [N, T] ≥ 0,
response_ids [N, T], group_ids [N]. One thread (``torch.set_num_threads(1)``).

Usage::

    .venv/bin/python benchmarks/loss_speed.py                       # the working tree's code
    .venv/bin/python benchmarks/loss_speed.py --n 64 --t 512 --out /tmp/ls/loss_speed.json  # a trial
    .venv/bin/python benchmarks/loss_speed.py --recipes vespo,gmpo --out /tmp/ls/loss_speed.json
    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/loss_speed.py --src /tmp/before --label before \\
        --out benchmarks/results/loss_speed_before.json
    .venv/bin/python benchmarks/loss_speed.py --before benchmarks/results/loss_speed_before.json

The last form writes ``results/loss_speed.{json,md}`` with both columns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ORIGINAL_RECIPES = ("grpo", "gspo", "gspo_token", "dr_grpo", "dapo", "cispo")
"""The recipes timed when the code under ``--src`` predates ``gspo_components.RECIPES``."""
GROUP_SIZE = 8
VALUE_DIFFERS = {"cispo", "dppo"}
"""Recipes whose minimal loss has a different value by design (sg(ŵ)·Â·ℓ, verl's form, where the
recipe's value is −Â·min(w, C)): only their gradients are compared."""


def make_inputs(n: int, t: int, seed: int = 0, noise: float = 0.01) -> dict[str, torch.Tensor]:
    """A right-padded batch with finite padding. ``noise`` is the std of ℓ − ℓ_old (0.01: near
    on-policy, the timed batch; 0.5: the agreement check's off-policy batch, where the clips,
    masks and dual clips bind). Groups of 8 consecutive responses; ``entropy`` ≥ 0 with row means
    spread over [0, 1.4] (both sides of GTPO's 0.7 threshold); ``response_ids`` from a 4-token
    vocabulary, so that completions of a group share tokens at the same positions (GTPO's
    conflict tokens)."""
    if n % GROUP_SIZE:
        raise SystemExit(f"--n must be a multiple of the group size {GROUP_SIZE}, got {n}")
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(n, t, generator=gen) * 3.0
    log_probs = old + noise * torch.randn(n, t, generator=gen)
    advantages = torch.randn(n, generator=gen)
    entropy = torch.rand(n, t, generator=gen) * torch.rand(n, 1, generator=gen) * 2.8
    response_ids = torch.randint(0, 4, (n, t), generator=gen)
    group_ids = torch.arange(n) // GROUP_SIZE
    return {
        "log_probs": log_probs,
        "old_log_probs": old,
        "advantages": advantages,
        "response_mask": mask,
        "entropy": entropy,
        "response_ids": response_ids,
        "group_ids": group_ids,
    }


# -- minimal hand-written losses: what a trainer author would write for one algorithm -------------
# Each takes (lp, old, adv [N], mask [N, T] bool, batch) with finite padding, masks by
# multiplication, and uses the recipe's defaults. ``batch`` holds the extra inputs.


def _ppo(ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return -torch.min(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)


def _seq_mean_token_mean(loss: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return ((loss * m).sum(-1) / m.sum(-1)).mean()


def _token_mean(loss: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (loss * m).sum() / m.sum()


def _grpo(lp, old, adv, mask, batch):
    m = mask.float()
    return _seq_mean_token_mean(_ppo(torch.exp(lp - old), adv.unsqueeze(-1), 0.2, 0.2), m)


def _gspo(lp, old, adv, mask, batch):
    m = mask.float()
    s = torch.exp(((lp - old) * m).sum(-1) / m.sum(-1))
    return _ppo(s, adv, 3e-4, 4e-4).mean()


def _gspo_token(lp, old, adv, mask, batch):
    m = mask.float()
    length = m.sum(-1, keepdim=True)
    log_s = ((lp.detach() - old) * m).sum(-1, keepdim=True) / length
    s = torch.exp(log_s + lp - lp.detach())
    return ((_ppo(s, adv.unsqueeze(-1), 3e-4, 4e-4) * m).sum(-1) / length.squeeze(-1)).mean()


def _dr_grpo(lp, old, adv, mask, batch):
    m = mask.float()
    return (_ppo(torch.exp(lp - old), adv.unsqueeze(-1), 0.2, 0.2) * m).sum() / (m.shape[0] * m.shape[1])


def _dapo(lp, old, adv, mask, batch):
    return _token_mean(_ppo(torch.exp(lp - old), adv.unsqueeze(-1), 0.2, 0.28), mask.float())


def _cispo(lp, old, adv, mask, batch):
    w = torch.exp(lp - old)
    return _token_mean(-(w.clamp(max=1.28).detach() * adv.unsqueeze(-1) * lp), mask.float())


def _sapo(lp, old, adv, mask, batch):
    a = adv.unsqueeze(-1)
    tau = torch.where(a > 0, 1.0, 1.05)
    gate = (4.0 / tau) * torch.sigmoid(tau * (torch.exp(lp - old) - 1.0))
    return _seq_mean_token_mean(-gate * a, mask.float())


def _gmpo(lp, old, adv, mask, batch):
    m = mask.float()
    sign = torch.sign(adv).unsqueeze(-1)
    d = lp - old
    c = sign * torch.min(sign * d, sign * d.clamp(-0.4, 0.4))
    g = torch.exp((c * m).sum(-1) / m.sum(-1))
    return (-adv * g).mean()


def _dppo(lp, old, adv, mask, batch):
    a = adv.unsqueeze(-1)
    tv = torch.exp(lp.detach()) - torch.exp(old)
    keep = torch.where(a > 0, tv <= 0.2, tv >= -0.2)
    w = torch.exp(lp - old).clamp(max=20.0).detach()
    return _token_mean(-(w * a * lp) * keep, mask.float())


def _m2po(lp, old, adv, mask, batch):
    m2 = (lp.detach() - old).double().square()
    ascending = m2[mask].sort().values
    mean_so_far = ascending.cumsum(0) / torch.arange(1, ascending.numel() + 1)
    kept = int((mean_so_far <= 0.04).sum())
    keep = m2 <= ascending[kept - 1] if kept else torch.zeros_like(mask)
    return _token_mean(-(torch.exp(lp - old) * adv.unsqueeze(-1)) * keep, mask.float())


def _cov(lp, adv, mask):
    a = adv.unsqueeze(-1).expand_as(lp)[mask]
    ell = lp.detach()[mask]
    return (a - a.mean()) * (ell - ell.mean())


def _clip_cov(lp, old, adv, mask, batch):
    # as verl's compute_policy_loss_clip_cov: candidates 1 < Cov < 5 that PPO's clip did not cut,
    # row-major; ⌊2e-4·N_v⌋ of them drawn with torch.randperm lose their loss and gradient
    m = mask.float()
    a = adv.unsqueeze(-1) * m
    ratio = torch.exp(lp - old)
    loss1, loss2 = -a * ratio, -a * ratio.clamp(0.8, 1.2)
    cut = (loss2 > loss1) & mask
    ell = lp.detach()
    cov = (a - a.sum() / m.sum()) * (ell - (ell * m).sum() / m.sum())
    candidates = torch.nonzero(mask & ~cut & (cov > 1.0) & (cov < 5.0))
    keep = torch.ones_like(m)
    if len(candidates):
        num = max(int(2e-4 * int(m.sum())), 1)
        chosen = candidates[torch.randperm(len(candidates))[:num]]
        keep[chosen[:, 0], chosen[:, 1]] = 0.0
    return _token_mean(torch.max(loss1, loss2) * keep, m)


def _kl_cov(lp, old, adv, mask, batch):
    a = adv.unsqueeze(-1)
    loss = -torch.exp(lp - old) * a
    k = max(1, int(int(mask.sum()) * 2e-4))
    top = torch.nonzero(mask.reshape(-1)).squeeze(-1)[torch.topk(_cov(lp, adv, mask), k).indices]
    penalised = torch.zeros(mask.numel(), dtype=torch.bool)
    penalised[top] = True
    loss = loss + 0.1 * (lp - old).abs() * penalised.view(mask.shape)
    return _token_mean(loss, mask.float())


def _vespo(lp, old, adv, mask, batch):
    m = mask.float()
    log_w = ((lp.detach() - old) * m).sum(-1).clamp(math.log(1e-8), 20.0)
    k = torch.where(adv >= 0, 2.0, 3.0)
    lam = torch.where(adv >= 0, 3.0, 2.0)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return _token_mean(-(phi * adv).unsqueeze(-1) * lp, m)


def _luspo(lp, old, adv, mask, batch):
    m = mask.float()
    length = m.sum(-1)
    s = torch.exp(((lp - old) * m).sum(-1) / length)
    return (_ppo(s, adv, 3e-4, 4e-4) * length).mean()


def _first_run(ids, mask, pos, neg):
    """[B, G, T]: the initial run of positions whose token also sits there in a positive and in
    a negative completion of the group."""
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)) & mask.unsqueeze(2) & mask.unsqueeze(1)  # [B, G, G, T]
    in_pos = (same & pos[:, None, :, None]).any(2)
    in_neg = (same & neg[:, None, :, None]).any(2)
    return torch.cumprod((in_pos & in_neg & mask).to(torch.uint8), -1).bool()


def _gtpo(lp, old, adv, mask, batch):
    m = mask.float()
    n, t = mask.shape
    shape = (n // GROUP_SIZE, GROUP_SIZE, t)  # groups of consecutive responses
    ids = torch.where(mask, batch["response_ids"], -1)
    pos, neg = (adv > 0).view(shape[:2]), (adv < 0).view(shape[:2])
    fwd = _first_run(ids.view(shape), mask.view(shape), pos, neg).view(n, t)
    length = mask.sum(-1, keepdim=True)
    src = (length - 1 - torch.arange(t)).clamp(min=0)  # the same, counted from the last token
    rev = _first_run(ids.gather(-1, src).view(shape), (torch.arange(t) < length).view(shape), pos, neg)
    bwd = rev.view(n, t).gather(-1, src) & mask
    w = torch.where(adv > 0, 2.0, 0.0).unsqueeze(-1)
    delta = torch.where(fwd, w, 1.0) * torch.where(bwd, w, 1.0)
    weight = delta / (fwd | bwd).sum(-1, keepdim=True).clamp(min=1)
    weight = torch.where((adv != 0).unsqueeze(-1), weight, 1.0)
    mean_h = (batch["entropy"] * m).sum(-1) / m.sum(-1)
    shaped = torch.where(mean_h <= 0.7, adv - 0.1 * mean_h, 0.0).unsqueeze(-1)
    rho = lp - old
    return _seq_mean_token_mean(-shaped * torch.exp(rho - rho.detach()) * weight, m)


def _aspo(lp, old, adv, mask, batch):
    a = adv.unsqueeze(-1)
    h = batch["entropy"]
    q = torch.nanquantile(torch.where(mask, h, math.nan), 0.8, dim=-1, keepdim=True)
    eps = torch.where(h <= q, 0.2, 0.4)
    r = torch.exp(lp - old)
    c_neg = torch.max(r, 1 - eps)
    neg = torch.where(c_neg.detach() > 3.0, -a * 3.0 * lp, -a * c_neg)
    c_pos = torch.min(r, 1 + eps)
    sg = c_pos.detach()
    pos = torch.where(1 / sg > 3.0, -a * 3.0 * lp, -a * (c_pos / sg) / sg)
    return _token_mean(torch.where(a < 0, neg, pos), mask.float())


def _ce_gppo(lp, old, adv, mask, batch):
    a = adv.unsqueeze(-1)
    rho = lp - old
    r = torch.exp(rho)
    unit = torch.exp(rho - rho.detach())
    low = (r.detach() < 0.8) & (a < 0)
    high = (r.detach() > 1.28) & (a > 0)
    loss = torch.where(low, -0.75 * 0.8 * unit * a, torch.where(high, -1.28 * unit * a, -r * a))
    loss = torch.where((a < 0) & (loss.detach() > -3.0 * a), -3.0 * a, loss)
    return _token_mean(loss, mask.float())


MINIMAL = {
    "grpo": _grpo,
    "gspo": _gspo,
    "gspo_token": _gspo_token,
    "dr_grpo": _dr_grpo,
    "dapo": _dapo,
    "cispo": _cispo,
    "sapo": _sapo,
    "gmpo": _gmpo,
    "dppo": _dppo,
    "m2po": _m2po,
    "clip_cov": _clip_cov,
    "kl_cov": _kl_cov,
    "vespo": _vespo,
    "luspo": _luspo,
    "gtpo": _gtpo,
    "aspo": _aspo,
    "ce_gppo": _ce_gppo,
}


def minimal_loss(name: str, lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                 batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """The minimal hand-written loss of recipe ``name`` (``batch``: the extra inputs)."""
    if name not in MINIMAL:
        raise KeyError(
            f"loss_speed: no minimal hand-written loss for recipe {name!r}; add one to MINIMAL in "
            f"{Path(__file__).name} (what a trainer author would write in a few lines of torch)"
        )
    return MINIMAL[name](lp, old, adv, mask, batch or {})


def _time(fn, lp: torch.Tensor) -> float:
    lp.grad = None
    start = time.perf_counter()
    fn().backward()
    return time.perf_counter() - start


SEEDED = {"clip_cov"}
"""Recipes with a random draw (torch's global generator): torch is seeded before each call."""
VALUE_RTOL, GRAD_RTOL = 1e-4, 1e-4
"""Agreement: |Δloss| ≤ VALUE_RTOL·max(|loss|, 1e-3), max|Δgrad| ≤ GRAD_RTOL·max|grad|."""


def _recipe_names(gc) -> list[str]:
    registry = getattr(gc, "RECIPES", None)
    names = list(registry) if registry is not None else list(ORIGINAL_RECIPES)
    missing = [n for n in names if n not in MINIMAL]
    if missing:
        raise SystemExit(
            f"loss_speed: gspo_components.RECIPES has {missing} but MINIMAL has no hand-written loss for "
            f"{'it' if len(missing) == 1 else 'them'}; add one per recipe to MINIMAL in {Path(__file__).name}"
        )
    return names


def _make_recipe(gc, name: str):
    registry = getattr(gc, "RECIPES", None)
    return registry[name]() if registry is not None else getattr(gc, name)()


def _closures(gc, TensorDict, name: str, inputs: dict[str, torch.Tensor]):
    """(lp, recipe.loss closure, minimal closure) on one batch; each returns the scalar loss."""
    recipe = _make_recipe(gc, name)
    n = inputs["advantages"].shape[0]
    lp = inputs["log_probs"].clone().requires_grad_()
    td = TensorDict({**inputs, "log_probs": lp}, batch_size=[n])
    old, adv, mask = inputs["old_log_probs"], inputs["advantages"], inputs["response_mask"]
    extra = {k: inputs[k] for k in ("entropy", "response_ids", "group_ids")}

    def lib(recipe=recipe, td=td):
        out = recipe.loss(td)
        assert "clip_fraction" in out.keys() and "ratio_mean" in out.keys()
        return out["loss"]

    def ref(name=name, lp=lp, old=old, adv=adv, mask=mask, extra=extra):
        return minimal_loss(name, lp, old, adv, mask, extra)

    return lp, lib, ref


def _agreement(gc, TensorDict, name: str, inputs: dict[str, torch.Tensor]) -> dict:
    """Value and gradient of recipe.loss against the minimal loss on one batch (torch seeded
    before each call for a recipe with a random draw)."""
    lp, lib, ref = _closures(gc, TensorDict, name, inputs)
    out = {}
    for side, fn in (("recipe", lib), ("minimal", ref)):
        if name in SEEDED:
            torch.manual_seed(1234)
        lp.grad = None
        loss = fn()
        loss.backward()
        out[side] = (float(loss.detach()), lp.grad.clone())
    (v_lib, g_lib), (v_ref, g_ref) = out["recipe"], out["minimal"]
    value_diff = None if name in VALUE_DIFFERS else abs(v_lib - v_ref)
    grad_diff = float((g_lib - g_ref).abs().max())
    grad_scale = float(g_ref.abs().max())
    ok = grad_diff <= GRAD_RTOL * grad_scale and (
        value_diff is None or value_diff <= VALUE_RTOL * max(abs(v_ref), 1e-3)
    )
    return {
        "agree": ok,
        "value_recipe": v_lib,
        "value_minimal": v_ref,
        "max_abs_value_diff": value_diff,
        "max_abs_grad_diff": grad_diff,
        "max_abs_grad": grad_scale,
    }


def _fmt(check: dict) -> str:
    value = "n/a (by design)" if check["max_abs_value_diff"] is None else f"{check['max_abs_value_diff']:.1e}"
    return (
        f"{'agree' if check['agree'] else 'DISAGREE'}: value diff {value} "
        f"({check['value_recipe']:.6g} vs {check['value_minimal']:.6g}), grad diff "
        f"{check['max_abs_grad_diff']:.1e} of max |grad| {check['max_abs_grad']:.1e}"
    )


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(args.src).resolve()))
    from tensordict import TensorDict

    import gspo_components as gc

    if not Path(gc.__file__).resolve().is_relative_to(Path(args.src).resolve()):
        raise SystemExit(f"imported gspo_components from {gc.__file__}, not from {args.src}")
    torch.set_num_threads(1)
    names = _recipe_names(gc)
    if args.recipes:
        unknown = [n for n in args.recipes if n not in names]
        if unknown:
            raise SystemExit(f"--recipes: unknown {unknown}; the recipes are {names}")
        names = [n for n in names if n in args.recipes]
    inputs = make_inputs(args.n, args.t)
    # Agreement, before any timing: on the timed batch (near on-policy) and on a small off-policy
    # batch (ℓ − ℓ_old of std 0.5) where the clips, masks and dual clips bind.
    stress = make_inputs(64, 256, seed=1, noise=0.5)
    checks: dict[str, dict] = {}
    for name in names:
        checks[name] = {"timed_batch": _agreement(gc, TensorDict, name, inputs),
                        "off_policy_batch": _agreement(gc, TensorDict, name, stress)}  # fmt: skip
        for batch, check in checks[name].items():
            print(f"{name:11s} {batch:16s} {_fmt(check)}", flush=True)
    bad = [n for n, c in checks.items() if not all(x["agree"] for x in c.values())]
    if bad:
        raise SystemExit(f"loss_speed: recipe.loss and the minimal loss disagree for {bad} (details above)")
    switch = getattr(gc, "validation", None)
    results = []
    for name in names:
        lp, lib, ref = _closures(gc, TensorDict, name, inputs)

        def lib_off(lib=lib):
            with switch(False) if switch is not None else contextlib.nullcontext():
                return lib()

        methods = {"recipe": lib, "minimal": ref}
        if switch is not None:
            methods["recipe_novalidate"] = lib_off
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.warmup):
            for fn in methods.values():
                _time(fn, lp)
        for _ in range(args.repeats):
            for m, fn in methods.items():
                times[m].append(_time(fn, lp))
        med = {m: statistics.median(v) for m, v in times.items()}
        row = {
            "recipe": name,
            "median_s": med,
            "ratio": med["recipe"] / med["minimal"],
            "ratio_novalidate": med["recipe_novalidate"] / med["minimal"] if switch is not None else None,
            "max_abs_grad_diff": checks[name]["timed_batch"]["max_abs_grad_diff"],
            "agreement": checks[name],
            "times_s": times,
        }
        print(
            f"{name:11s} recipe {med['recipe'] * 1e3:7.2f} ms  minimal {med['minimal'] * 1e3:6.2f} ms  "
            f"ratio {row['ratio']:5.2f}"
            + (f"  (validation off {row['ratio_novalidate']:5.2f})" if switch is not None else ""),
            flush=True,
        )
        results.append(row)
    from _machine import cpu_description

    return {
        "label": args.label,
        "source": str(Path(args.src).resolve()),
        "shape": {"N": args.n, "T": args.t, "dtype": "float32", "threads": 1},
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": cpu_description(),
        },
        "results": results,
    }


def markdown(after: dict, before: dict | None) -> str:
    m = after["machine"]
    lines = [
        "# recipe.loss against a minimal hand-written loss (forward + backward)",
        "",
        f"N = {after['shape']['N']}, T = {after['shape']['T']}, float32, 1 thread, median of "
        f"{after['repeats']} interleaved runs; {m['cpu']}, torch {m['torch']}, Python {m['python']}.",
        "Ratio = median(recipe.loss) / median(minimal loss), both measured in the same run.",
        "`recipe.loss` runs with validation on and all metrics computed.",
        "",
    ]
    head = "| recipe | minimal (ms) | recipe.loss (ms) | ratio | ratio, validation off |"
    sep = "|---|---|---|---|---|"
    if before is not None:
        head += " before: recipe.loss (ms) | before: ratio |"
        sep += "---|---|"
    lines += [head, sep]
    prior = {r["recipe"]: r for r in before["results"]} if before else {}
    for r in after["results"]:
        med = r["median_s"]
        off = "" if r["ratio_novalidate"] is None else f"{r['ratio_novalidate']:.2f}"
        line = (
            f"| {r['recipe']} | {med['minimal'] * 1e3:.2f} | {med['recipe'] * 1e3:.2f} | "
            f"**{r['ratio']:.2f}** | {off} |"
        )
        if before is not None:
            b = prior.get(r["recipe"])
            line += f" {b['median_s']['recipe'] * 1e3:.2f} | {b['ratio']:.2f} |" if b else " | |"
        lines.append(line)
    if before is not None:
        lines += [
            "",
            f'"before" is the code at `{before["label"]}`, measured on the same machine with the same '
            "command (`--src` pointing at a worktree of that commit); its minimal-loss times are in "
            "`loss_speed_before.json`.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--t", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--src", default=str(HERE.parent), help="repository root whose code to time")
    parser.add_argument("--label", default="after")
    parser.add_argument(
        "--out",
        default=str(HERE / "results" / "loss_speed.json"),
        help="JSON path (the .md is written beside it); point it outside results/ for a trial run",
    )
    parser.add_argument("--before", default=None, help="a JSON written by an earlier run, for the table")
    parser.add_argument(
        "--recipes", type=lambda v: v.split(","), default=None, help="comma-separated subset (default: all)"
    )
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    before = json.loads(Path(args.before).read_text()) if args.before else None
    out.with_suffix(".md").write_text(markdown(result, before))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
