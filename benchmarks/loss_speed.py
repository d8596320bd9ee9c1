"""Benchmark: each stock recipe's ``recipe.loss`` against a minimal hand-written torch loss.

For every stock recipe (grpo, gspo, gspo_token, dr_grpo, dapo, cispo) it times forward plus
backward of

- ``recipe``: ``recipe.loss(td)`` on a TensorDict (validation on, the library default, and all
  metrics computed), then ``out["loss"].backward()``;
- ``recipe_novalidate``: the same inside ``gspo_components.validation(False)`` (when the code
  under test has the switch);
- ``minimal``: the same algorithm written by hand in a few lines of torch (mask by
  multiplication, no validation, no metrics), below in :func:`minimal_loss`;

and reports the ratio of medians recipe / minimal, measured in the same run, interleaved.

Inputs: N = 256 responses, T = 4096 tokens, float32, right-padded with lengths drawn uniformly
from [1, T], finite values in the padding (so that the minimal losses, which mask by
multiplication, are correct), advantages [N]. One thread (``torch.set_num_threads(1)``).

Usage::

    .venv/bin/python benchmarks/loss_speed.py                       # the working tree's code
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
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RECIPES = ("grpo", "gspo", "gspo_token", "dr_grpo", "dapo", "cispo")


def make_inputs(n: int, t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(n, t, generator=gen) * 3.0
    log_probs = old + 0.01 * torch.randn(n, t, generator=gen)
    advantages = torch.randn(n, generator=gen)
    return {"log_probs": log_probs, "old_log_probs": old, "advantages": advantages, "response_mask": mask}


# -- minimal hand-written losses: what a trainer author would write for one algorithm -------------


def _ppo(ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return -torch.min(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)


def minimal_loss(name: str, lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor):
    m = mask.float()
    a = adv.unsqueeze(-1)
    if name == "gspo":
        length = m.sum(-1)
        s = torch.exp(((lp - old) * m).sum(-1) / length)
        return _ppo(s, adv, 3e-4, 4e-4).mean()
    if name == "gspo_token":
        length = m.sum(-1, keepdim=True)
        log_s = ((lp.detach() - old) * m).sum(-1, keepdim=True) / length
        s = torch.exp(log_s + lp - lp.detach())
        return ((_ppo(s, a, 3e-4, 4e-4) * m).sum(-1) / length.squeeze(-1)).mean()
    if name == "cispo":
        w = torch.exp(lp - old)
        return -(w.clamp(max=1.28).detach() * a * lp * m).sum() / m.sum()
    ratio = torch.exp(lp - old)
    if name == "grpo":
        return ((_ppo(ratio, a, 0.2, 0.2) * m).sum(-1) / m.sum(-1)).mean()
    if name == "dr_grpo":
        return (_ppo(ratio, a, 0.2, 0.2) * m).sum() / (m.shape[0] * m.shape[1])
    if name == "dapo":
        return (_ppo(ratio, a, 0.2, 0.28) * m).sum() / m.sum()
    raise ValueError(name)


def _time(fn, lp: torch.Tensor) -> float:
    lp.grad = None
    start = time.perf_counter()
    fn().backward()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(args.src).resolve()))
    from tensordict import TensorDict

    import gspo_components as gc

    if not Path(gc.__file__).resolve().is_relative_to(Path(args.src).resolve()):
        raise SystemExit(f"imported gspo_components from {gc.__file__}, not from {args.src}")
    torch.set_num_threads(1)
    inputs = make_inputs(args.n, args.t)
    switch = getattr(gc, "validation", None)
    results = []
    for name in RECIPES:
        recipe = getattr(gc, name)()
        lp = inputs["log_probs"].clone().requires_grad_()
        td = TensorDict({**inputs, "log_probs": lp}, batch_size=[args.n])
        old, adv, mask = inputs["old_log_probs"], inputs["advantages"], inputs["response_mask"]

        def lib(recipe=recipe, td=td):
            out = recipe.loss(td)
            assert "clip_fraction" in out.keys() and "ratio_mean" in out.keys()
            return out["loss"]

        def lib_off(lib=lib):
            with switch(False) if switch is not None else contextlib.nullcontext():
                return lib()

        def ref(name=name, lp=lp, old=old, adv=adv, mask=mask):
            return minimal_loss(name, lp, old, adv, mask)

        # the two losses agree in value (cispo's minimal value is sg(ŵ)·Â·ℓ, so compare gradients)
        lp.grad = None
        lib().backward()
        g_lib = lp.grad.clone()
        lp.grad = None
        ref().backward()
        grad_err = float((g_lib - lp.grad).abs().max())
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
            "max_abs_grad_diff": grad_err,
            "times_s": times,
        }
        print(
            f"{name:11s} recipe {med['recipe'] * 1e3:7.2f} ms  minimal {med['minimal'] * 1e3:6.2f} ms  "
            f"ratio {row['ratio']:5.2f}"
            + (f"  (validation off {row['ratio_novalidate']:5.2f})" if switch is not None else "")
            + f"  grad diff {grad_err:.1e}",
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
            b = prior[r["recipe"]]
            line += f" {b['median_s']['recipe'] * 1e3:.2f} | {b['ratio']:.2f} |"
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
    parser.add_argument("--out", default=str(HERE / "results" / "loss_speed.json"))
    parser.add_argument("--before", default=None, help="a JSON written by an earlier run, for the table")
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
