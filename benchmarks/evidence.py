"""Evidence: the GSPO paper's claims (arXiv 2507.18071, §5) re-run on a tiny mixture-of-experts
model, several seeds per arm.

Setup (fixed before any comparison; the same for every arm except the part under test):

- Task: two-digit addition ``ab+cd=`` → ``sum<eos>``, reward 1 for an exact answer, else 0.
  Training prompts are drawn from pairs outside a fixed held-out set of ``--heldout`` pairs;
  held-out accuracy is greedy exact match, evaluated every ``--eval-every`` steps.
- Model: a tiny Qwen3-MoE (4 layers, hidden 64, 2 heads of 32, 8 experts, top-2, expert width
  64, normalised top-k weights), float32, warmed up by supervised steps on the task (cached in
  ``<out>/warmup``). Every arm and seed starts RL from that same warm start.
- Rollouts: a bf16 copy of the policy (the "engine", like a bf16 vLLM engine) samples G = 8
  responses for each of 16 prompts per step at τ = 1 (``TransformersSampler``), and is synced
  from the policy after every step. So every arm learns from the same kind of slightly
  off-policy data, and R3 replays the engine's routing, not the trainer's own.
- Updates: the paper's off-policy setting, 4 minibatch updates per rollout batch (1 epoch),
  AdamW (lr 2e-4, no weight decay), gradient norm clipped at 1.0. Recipes at their library
  defaults (GRPO: token ratio, clip 0.2/0.2; GSPO and GSPO-token: sequence ratio, clip
  3e-4/4e-4), no KL term.

Arms (``--arms``): ``grpo``, ``grpo+R2``, ``grpo+R3``, ``gspo``, ``gspo_token``, ``gspo+R2``
(a control), and ``grpo+bf16old``, ``gspo+bf16old``, which take π_old from the bf16 engine's
log-probs (``old_from_rollout=True``) instead of recomputing it in float32.

Logged per step (``<out>/<arm>/seed<k>/history.json``): reward, held-out accuracy, token and
sequence clip fractions, ``routing_volatility`` and ``tokens_rerouted`` (means over the step's
minibatches, and at the minibatch that follows exactly one update), the variance of the token
ratios w_{i,t} and of the sequence ratios s_i over the minibatch, the gradient norm, and in the
fp32-π_old arms the mean |per-sequence mean log-ratio| between the fp32 π_old and the bf16
engine.

Collapse (defined before the run): a run collapses when its loss or gradient norm is ever
non-finite, or when its held-out accuracy at the last evaluation is below half of its peak over
the run (with a peak of at least 0.1): it fell and did not recover.

Outputs: ``<results>/summary.json`` (``{"arms": {name: {"seeds": [...], ...}}}``: per-seed final
and peak metrics, collapse flags and counts, the path of each seed's curves), and plots in
``<plots>`` (mean and min–max spread across seeds per arm). The run resumes: finished seeds are
read back, unfinished ones continue from their last checkpoint.

Run: ``python benchmarks/evidence.py`` (defaults: all arms, 3 seeds, 250 steps, 2 worker
processes; results in benchmarks/results/evidence/, plots in docs/images/). ``--quick`` runs every
arm for 3 steps on one seed with a short warm-up, writing only under ``--out``: the test suite runs
it to keep the machinery working.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
ALPHABET = "0123456789+="
PAIRS = [(a, b) for a in range(10, 100) for b in range(10, 100)]
ARMS: dict[str, dict[str, Any]] = {
    "grpo": {"recipe": "grpo", "routing_replay": None, "old_from_rollout": False},
    "grpo+R2": {"recipe": "grpo", "routing_replay": "R2", "old_from_rollout": False},
    "grpo+R3": {"recipe": "grpo", "routing_replay": "R3", "old_from_rollout": False},
    "gspo": {"recipe": "gspo", "routing_replay": None, "old_from_rollout": False},
    "gspo_token": {"recipe": "gspo_token", "routing_replay": None, "old_from_rollout": False},
    "gspo+R2": {"recipe": "gspo", "routing_replay": "R2", "old_from_rollout": False},
    "grpo+bf16old": {"recipe": "grpo", "routing_replay": None, "old_from_rollout": True},
    "gspo+bf16old": {"recipe": "gspo", "routing_replay": None, "old_from_rollout": True},
}


@dataclass(frozen=True)
class Settings:
    steps: int = 250
    prompts_per_step: int = 16
    group: int = 8
    minibatches: int = 4
    lr: float = 2e-4
    max_grad_norm: float = 1.0
    max_tokens: int = 4
    heldout: int = 100
    eval_every: int = 10
    warmup_steps: int = 800
    warmup_batch: int = 64
    warmup_lr: float = 3e-3
    checkpoint_every: int = 25
    layers: int = 4
    hidden: int = 64
    experts: int = 8
    top_k: int = 2


def heldout_pairs(settings: Settings) -> list[tuple[int, int]]:
    return random.Random(12345).sample(PAIRS, settings.heldout)


def train_pairs(settings: Settings) -> list[tuple[int, int]]:
    held = set(heldout_pairs(settings))
    return [p for p in PAIRS if p not in held]


def build_model(settings: Settings, tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    from gspo_components.testing.tiny import build_tiny_qwen3_moe

    return build_tiny_qwen3_moe(
        len(tokenizer),
        tokenizer=tokenizer,
        hidden_size=settings.hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=settings.experts,
        num_experts_per_tok=settings.top_k,
        moe_intermediate_size=64,
        max_position_embeddings=32,
        seed=seed,
    )


@torch.no_grad()
def greedy_accuracy(
    model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[int, int]], max_tokens: int
) -> float:
    """Greedy exact match on ``pairs`` (left-padded batch generate)."""
    from transformers import GenerationConfig

    prompts = [tokenizer.encode(f"{a}+{b}=") for a, b in pairs]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        generation_config=GenerationConfig(
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
    )
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(t == str(a + b) for t, (a, b) in zip(texts, pairs, strict=True)) / len(pairs)


def warm_start(out: Path, settings: Settings) -> Path:
    """The supervised warm start shared by every arm, cached in ``out/warmup``."""
    from gspo_components.testing.tiny import build_char_tokenizer, supervised_step

    path = out / "warmup"
    meta = {
        k: v
        for k, v in asdict(settings).items()
        if k.startswith("warmup") or k in ("layers", "hidden", "experts", "top_k", "heldout")
    }
    marker = path / "warmup.json"
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == meta:
        return path
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer(ALPHABET, path)
    model = build_model(settings, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.warmup_lr, weight_decay=0.0)
    rng = random.Random(0)
    pairs = train_pairs(settings)
    t0 = time.perf_counter()
    loss = float("nan")
    for _ in range(settings.warmup_steps):
        batch = rng.sample(pairs, settings.warmup_batch)
        loss = supervised_step(model, tokenizer, optimizer, [(f"{a}+{b}=", str(a + b)) for a, b in batch])
    model.eval()
    model.save_pretrained(str(path))
    accuracy = greedy_accuracy(model, tokenizer, heldout_pairs(settings), settings.max_tokens)
    marker.write_text(
        json.dumps(
            {
                "settings": meta,
                "loss": loss,
                "heldout_accuracy": accuracy,
                "seconds": time.perf_counter() - t0,
            },
            indent=2,
        )
    )
    return path


class _LossProbe(torch.nn.Module):
    """Wraps a recipe's loss: records per-minibatch ratio variances, the engine mismatch and the
    routing metrics (by minibatch index within the step), then returns the loss unchanged."""

    def __init__(self, inner: torch.nn.Module, minibatches: int, engine_gap: bool) -> None:
        super().__init__()
        self.inner = inner
        self.minibatches = minibatches
        self.engine_gap = engine_gap  # π_old recomputed in float32: measure its gap to the engine
        self.records: list[dict[str, float]] = []

    def key(self, name: str) -> Any:
        return self.inner.key(name)

    def out_key(self, name: str) -> Any:
        return self.inner.out_key(name)

    def forward(self, td: Any) -> Any:
        from gspo_components.moe import routing_mask, routing_metrics

        with torch.no_grad():
            mask = td["response_mask"].bool()
            delta = torch.where(mask, td["log_probs"].detach().float() - td["old_log_probs"].float(), 0.0)
            lengths = mask.sum(-1)
            rows = lengths > 0
            token_ratio = torch.exp(delta)[mask]
            seq_ratio = torch.exp(delta.sum(-1)[rows] / lengths[rows])
            rec = {
                "index": len(self.records) % self.minibatches,
                "token_ratio_var": float(token_ratio.var()) if token_ratio.numel() > 1 else 0.0,
                "seq_ratio_var": float(seq_ratio.var()) if seq_ratio.numel() > 1 else 0.0,
            }
            if self.engine_gap and "rollout_log_probs" in td.keys():
                gap = torch.where(mask, td["old_log_probs"].float() - td["rollout_log_probs"].float(), 0.0)
                rec["engine_seq_logratio_abs"] = float((gap.sum(-1)[rows] / lengths[rows]).abs().mean())
            if "rerouted" in td.keys():
                m = routing_metrics(td["rerouted"], routing_mask(td["prompt_mask"], td["response_mask"]))
                rec["routing_volatility"] = float(m["routing_volatility"])
        self.records.append(rec)
        return self.inner(td)


def _exact_reward():
    from gspo_components.rollout.rewards import RewardFn

    class ExactAnswer(RewardFn):
        """1 when the response (special tokens dropped) is exactly the answer, else 0."""

        fields = ("response_text", "answer")

        def score(self, sample: dict[str, Any]) -> float:
            return float(sample["response_text"] == sample["answer"])

    return ExactAnswer()


def run_seed(job: dict[str, Any]) -> dict[str, Any]:
    """One arm and seed: RL from the warm start; writes history.json and returns its summary."""
    torch.set_num_threads(1)
    import gspo_components as gc
    from gspo_components.loss.recipes import Recipe
    from gspo_components.rollout.loop import PromptBatch, RLConfig, train
    from gspo_components.rollout.sampling import TransformersSampler

    settings = Settings(**job["settings"])
    arm, seed = job["arm"], job["seed"]
    spec = ARMS[arm]
    job_dir = Path(job["dir"])
    job_dir.mkdir(parents=True, exist_ok=True)
    done = job_dir / "history.json"
    if done.is_file():
        return summarize(arm, seed, json.loads(done.read_text()), done)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warm = Path(job["warmup"])
    tokenizer = AutoTokenizer.from_pretrained(str(warm))
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(str(warm), dtype=torch.float32)
    engine = copy.deepcopy(policy).to(torch.bfloat16).eval()
    sampler = TransformersSampler(
        engine,
        n=settings.group,
        max_tokens=settings.max_tokens,
        seed=1000 + seed,
        tokenizer=tokenizer,
        return_routed_experts=spec["routing_replay"] == "R3",
    )
    base = getattr(gc, spec["recipe"])()
    probe = _LossProbe(base.loss, settings.minibatches, engine_gap=not spec["old_from_rollout"])
    recipe = Recipe(arm, base.advantage, probe)
    pairs = train_pairs(settings)
    held = heldout_pairs(settings)

    def next_prompts(step: int) -> PromptBatch:
        batch = random.Random(seed * 100_003 + step).sample(pairs, settings.prompts_per_step)
        return PromptBatch([f"{a}+{b}=" for a, b in batch], {"answer": [str(a + b) for a, b in batch]})

    progress = job_dir / "progress.txt"
    initial = greedy_accuracy(policy, tokenizer, held, settings.max_tokens)

    def on_step(step: int, metrics: dict[str, float]) -> dict[str, float]:
        extra: dict[str, float] = {}
        recs, probe.records[:] = list(probe.records), []
        for name in ("token_ratio_var", "seq_ratio_var", "engine_seq_logratio_abs", "routing_volatility"):
            values = [r[name] for r in recs if name in r]
            if values and name != "routing_volatility":
                extra[name] = sum(values) / len(values)
        after_one = [r["routing_volatility"] for r in recs if r["index"] == 1 and "routing_volatility" in r]
        if after_one:
            extra["routing_volatility_after_1_update"] = sum(after_one) / len(after_one)
        if step % settings.eval_every == 0 or step == settings.steps:
            extra["heldout_accuracy"] = greedy_accuracy(policy, tokenizer, held, settings.max_tokens)
        progress.write_text(str(step))
        return extra

    history = train(
        policy,
        sampler,
        _exact_reward(),
        recipe,
        torch.optim.AdamW(policy.parameters(), lr=settings.lr, weight_decay=0.0),
        next_prompts,
        RLConfig(
            steps=settings.steps,
            minibatches=settings.minibatches,
            epochs=1,
            max_grad_norm=settings.max_grad_norm,
            old_from_rollout=spec["old_from_rollout"],
            routing_replay=spec["routing_replay"],
            accuracy_key=None,
            checkpoint_dir=job_dir / "ckpt",
            checkpoint_every=settings.checkpoint_every,
            progress=False,
            seed=seed,
        ),
        samples_per_prompt=settings.group,
        on_step=on_step,
    )
    record = {"arm": arm, "seed": seed, "initial_heldout_accuracy": initial, "history": history}
    done.write_text(json.dumps(record, default=lambda v: None))
    return summarize(arm, seed, record, done)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def summarize(arm: str, seed: int, record: dict[str, Any], path: Path) -> dict[str, Any]:
    history = record["history"]
    evals = [(m["step"], m["heldout_accuracy"]) for m in history if m.get("heldout_accuracy") is not None]
    accs = [record.get("initial_heldout_accuracy", 0.0)] + [a for _, a in evals]
    peak = max(accs)
    final = accs[-1]
    nonfinite = any(not _finite(m.get(k)) for m in history for k in ("loss", "grad_norm") if k in m)
    fell = peak >= 0.1 and final < 0.5 * peak
    tail = history[-max(1, len(history) // 5) :]

    def mean_of(key: str, rows: list[dict[str, Any]]) -> float | None:
        values = [m[key] for m in rows if _finite(m.get(key))]
        return sum(values) / len(values) if values else None

    keys = (
        "reward", "clip_fraction", "seq_clip_fraction", "routing_volatility", "tokens_rerouted",
        "routing_volatility_after_1_update", "token_ratio_var", "seq_ratio_var", "grad_norm",
        "engine_seq_logratio_abs",
    )  # fmt: skip
    return {
        "seed": seed,
        "initial_heldout_accuracy": accs[0],
        "final_heldout_accuracy": final,
        "peak_heldout_accuracy": peak,
        "collapsed": bool(nonfinite or fell),
        "collapse_reason": "non-finite loss or gradient"
        if nonfinite
        else ("accuracy fell below half its peak" if fell else None),
        "final_reward": mean_of("reward", tail),
        "mean": {k: mean_of(k, history) for k in keys},
        "curves": str(path),
        "steps": len(history),
    }


def _progress(jobs: list[dict[str, Any]], total: int, pool_result: Any, quiet: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="evidence", dynamic_ncols=True, disable=quiet)
    while not pool_result.ready():
        steps = 0
        for job in jobs:
            p = Path(job["dir"]) / "progress.txt"
            if (Path(job["dir"]) / "history.json").is_file():
                steps += job["settings"]["steps"]
            elif p.is_file():
                try:
                    steps += int(p.read_text() or 0)
                except ValueError:
                    pass
        bar.n = min(steps, total)
        bar.refresh()
        pool_result.wait(2.0)
    bar.n = total
    bar.close()


def plot(summary: dict[str, Any], plots: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward", "reward (training)", False),
        ("heldout_accuracy", "held-out accuracy", True),
        ("clip_fraction", "token clip fraction", False),
        ("routing_volatility", "routing volatility", False),
        ("token_ratio_var", "var of token ratios", False),
        ("seq_ratio_var", "var of sequence ratios", False),
    ]
    plots.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (key, title, sparse) in zip(axes.flat, panels, strict=True):
        for arm, entry in summary["arms"].items():
            curves = []
            for s in entry["seeds"]:
                record = json.loads(Path(s["curves"]).read_text())
                pts = [(m["step"], m.get(key)) for m in record["history"] if _finite(m.get(key))]
                if sparse:
                    pts = [(0.0, record.get("initial_heldout_accuracy")), *pts]
                curves.append(dict(pts))
            steps = sorted(set().union(*[c.keys() for c in curves])) if curves else []
            if not steps:
                continue
            if not sparse and len(steps) > 20:  # smooth dense curves: mean over windows of 10 steps
                steps = steps[::10]
            mean, low, high = [], [], []
            for st in steps:
                vals = [c[st] for c in curves if st in c]
                mean.append(statistics.fmean(vals))
                low.append(min(vals))
                high.append(max(vals))
            line = ax.plot(steps, mean, label=arm, lw=1.4)[0]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.12)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if key in ("clip_fraction", "token_ratio_var", "seq_ratio_var"):
            ax.set_yscale("symlog", linthresh=1e-6)
    axes.flat[0].legend(fontsize=8, ncol=2)
    fig.suptitle("GSPO's claims on a tiny MoE: mean across seeds, band = min–max")
    fig.tight_layout()
    name = f"{prefix}curves.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return [name]


def _fmt(v: Any, digits: int = 3) -> str:
    if not _finite(v):
        return "–"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def report(summary: dict[str, Any]) -> str:
    """A markdown table of ``summary``: per arm, means across seeds (min–max for accuracies)."""

    def acc(entry: dict[str, Any], key: str) -> str:
        v = entry.get(key)
        return f"{v['mean']:.3f} ({v['min']:.2f}–{v['max']:.2f})" if v else "–"

    lines = [
        "| arm | seeds | collapses | held-out acc. start | final (min–max) | peak (min–max) | reward, last 20 % | "
        "token clip frac. | seq clip frac. | routing volatility | after 1 update | var token ratio | "
        "var seq ratio | grad norm | fp32 vs bf16 π_old, per seq. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in summary["arms"].items():
        m = e["mean"]
        start = statistics.fmean(r["initial_heldout_accuracy"] for r in e["seeds"])
        lines.append(
            f"| {arm} | {len(e['seeds'])} | {e['collapses']} | {start:.3f} | {acc(e, 'final_heldout_accuracy')} | "
            f"{acc(e, 'peak_heldout_accuracy')} | {_fmt((e.get('final_reward') or {}).get('mean'))} | "
            f"{_fmt(m['clip_fraction'])} | {_fmt(m['seq_clip_fraction'])} | {_fmt(m['routing_volatility'])} | "
            f"{_fmt(m['routing_volatility_after_1_update'])} | {_fmt(m['token_ratio_var'])} | {_fmt(m['seq_ratio_var'])} | "
            f"{_fmt(m['grad_norm'])} | {_fmt(m['engine_seq_logratio_abs'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms: " + ", ".join(ARMS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (0 .. seeds-1)")
    parser.add_argument(
        "--steps", type=int, default=None, help="RL steps per run (default 250; 3 with --quick)"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "evidence", help="work folder (checkpoints, curves)"
    )
    parser.add_argument(
        "--results", type=Path, default=None, help="summary.json folder (default benchmarks/results/evidence)"
    )
    parser.add_argument("--plots", type=Path, default=None, help="plot folder (default docs/images)")
    parser.add_argument("--workers", type=int, default=2, help="parallel runs (each one torch thread)")
    parser.add_argument(
        "--quick", action="store_true", help="every arm, 1 seed, 3 steps, short warm-up, outputs under --out"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite summary.md from an existing summary.json"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        results = args.results or ROOT / "benchmarks" / "results" / "evidence"
        summary = json.loads((results / "summary.json").read_text())
        (results / "summary.md").write_text(report(summary))
        print(report(summary))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if args.seeds < 1 or args.workers < 1:
        parser.error("--seeds and --workers must be >= 1")
    if args.quick:
        settings = Settings(steps=args.steps or 3, prompts_per_step=4, group=4, heldout=20, eval_every=2,
                            warmup_steps=30, warmup_batch=16, checkpoint_every=2)  # fmt: skip
        seeds = 1 if args.seeds == 3 else args.seeds
        results = args.results or args.out
        plots = args.plots or args.out
    else:
        settings = Settings(steps=args.steps or Settings.steps)
        seeds = args.seeds
        results = args.results or ROOT / "benchmarks" / "results" / "evidence"
        plots = args.plots or ROOT / "docs" / "images"
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    warm = warm_start(args.out, settings)
    warm_info = json.loads((warm / "warmup.json").read_text())
    run_tag = f"steps{settings.steps}"
    jobs = [
        {"arm": arm, "seed": seed, "settings": asdict(settings), "warmup": str(warm),
         "dir": str(args.out / run_tag / arm.replace("+", "_") / f"seed{seed}")}
        for arm in arms for seed in range(seeds)
    ]  # fmt: skip
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(args.workers, len(jobs)), maxtasksperchild=1) as pool:
        result = pool.map_async(run_seed, jobs, chunksize=1)
        _progress(jobs, settings.steps * len(jobs), result, args.no_progress)
        per_seed = result.get()
    summary: dict[str, Any] = {
        "setup": {
            "settings": asdict(settings),
            "arms": {a: ARMS[a] for a in arms},
            "seeds": seeds,
            "warmup": warm_info,
            "collapse": "non-finite loss or gradient norm at any step, or held-out accuracy at the last "
            "evaluation below half of the run's peak (peak >= 0.1)",
            "seconds": time.perf_counter() - t0,
            "machine": {
                "cpu": _cpu(),
                "cores": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
            },
        },
        "arms": {},
    }
    for arm in arms:
        rows = [r for r, j in zip(per_seed, jobs, strict=True) if j["arm"] == arm]
        entry: dict[str, Any] = {"seeds": rows, "collapses": sum(r["collapsed"] for r in rows)}
        for key in ("final_heldout_accuracy", "peak_heldout_accuracy", "final_reward"):
            vals = [r[key] for r in rows if _finite(r[key])]
            entry[key] = (
                {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)} if vals else None
            )
        entry["mean"] = {}
        for key in rows[0]["mean"]:
            vals = [r["mean"][key] for r in rows if _finite(r["mean"][key])]
            entry["mean"][key] = statistics.fmean(vals) if vals else None
        summary["arms"][arm] = entry
    results.mkdir(parents=True, exist_ok=True)
    # Keep each seed's curves beside the summary (the work folder is not kept); paths in the
    # summary are relative to summary.json's folder.
    (results / "curves").mkdir(exist_ok=True)
    for arm, entry in summary["arms"].items():
        for row in entry["seeds"]:
            target = results / "curves" / f"{arm.replace('+', '_')}_seed{row['seed']}.json"
            if Path(row["curves"]).resolve() != target.resolve():
                target.write_text(Path(row["curves"]).read_text())
            row["curves"] = str(target)
    summary["plots"] = [str(plots / p) for p in plot(summary, plots, "" if args.quick else "evidence_")]
    for entry in summary["arms"].values():
        for row in entry["seeds"]:
            row["curves"] = os.path.relpath(row["curves"], results)
    summary["plots"] = [os.path.relpath(p, results) for p in summary["plots"]]
    summary["setup"]["commit"] = _commit()
    (results / "summary.json").write_text(json.dumps(summary, indent=2, default=lambda v: None) + "\n")
    (results / "summary.md").write_text(report(summary))
    print(
        json.dumps(
            {
                a: {k: e[k] for k in ("collapses", "final_heldout_accuracy")}
                for a, e in summary["arms"].items()
            },
            indent=1,
        )
    )
    print(f"wrote {results / 'summary.json'} in {summary['setup']['seconds']:.0f} s")
    return 0


def _commit() -> str | None:
    """The git commit the runner's code came from, when it runs from a checkout."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import cpu_description

    return cpu_description()


if __name__ == "__main__":
    sys.exit(main())
