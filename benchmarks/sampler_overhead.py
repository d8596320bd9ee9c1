"""What VLLMSampler adds over a raw ``LLM.generate``, and what a weight sync costs.

Overhead. One engine, one set of prompts, the same ``SamplingParams`` object
(``sampler.sampling_params(P)``, unseeded). A round times four calls: ``sampler(prompts)``
(tokenise, generate, build the rollout TensorDict); ``sampler.llm.generate`` on the prompt
strings (what a user of plain vLLM writes) and on the same prompts as token ids (what the
sampler hands the engine); and token ids with plain ``SamplingParams(..., logprobs=0)`` (vLLM's
default, per-token detokenised output). The order rotates every round. Overhead = sampler /
raw − 1 against each raw variant, as a ratio of medians and as the median of per-round ratios,
in wall time and in CPU time (this process + engine core + worker), the latter being less
sensitive to other jobs on a shared machine. The sampler's own work is also timed alone, on
fixed engine outputs (tokenisation + text decoding + TensorDict, no generation).

Weight sync. ``sampler.sync_weights(model)`` for both transports ("file", the default:
safetensors in /dev/shm + the worker's built-in ``reload_weights``; "rpc": raw bytes through
``collective_rpc`` to the sampler's worker extension), median of several, for the tiny model
and for a ~58M-parameter Qwen3 (hidden 512, 8 layers, vocab 32000; 232 MB in float32).

Run: ``python benchmarks/sampler_overhead.py`` (about 5 minutes on 2 cores: two engine
starts). Writes benchmarks/results/sampler_overhead.json and .md, with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _machine import cpu_description

ALPHABET = "0123456789+-*=(). "
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = cpu_description()
    import vllm

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
    }


def build(path: Path, **arch) -> int:
    """Save a tiny Qwen3 (+ tokenizer) to ``path``; return its parameter count."""
    from gspo_components.testing.tiny import build_char_tokenizer, build_tiny_qwen3

    tok = build_char_tokenizer(ALPHABET, path)
    vocab = arch.pop("vocab_size", len(tok))
    model = build_tiny_qwen3(vocab, path, tokenizer=tok, **arch)
    return sum(p.numel() for p in model.parameters())


def time_sync(sampler, model: torch.nn.Module, repeats: int) -> dict:
    out = {}
    for transport in ("file", "rpc"):
        sampler.weight_sync = transport
        sampler.sync_weights(model)  # warm-up (first call allocates the folder / buffers)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            sampler.sync_weights(model)
            times.append(time.perf_counter() - start)
        out[transport] = {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}
    sampler.weight_sync = "file"
    return out


def cpu_seconds() -> float:
    """User + system CPU time of this process and all its descendants (engine core, worker)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def overhead(sampler, prompts: list[str], repeats: int) -> dict:
    from gspo_components.rollout.sampling._batch import tokenize_prompts

    params = sampler.sampling_params(len(prompts))
    llm = sampler.llm
    token_prompts = [{"prompt_token_ids": sampler.tokenizer(p)["input_ids"]} for p in prompts]
    from vllm import SamplingParams

    # What plain vLLM does with default output processing: per-token detokenisation and a dict
    # of Logprob objects per token (the sampler turns both off and decodes texts in one batch).
    plain = SamplingParams(
        n=sampler.n, max_tokens=sampler.max_tokens, temperature=sampler.temperature, logprobs=0
    )
    calls = {
        "sampler": lambda: sampler(prompts),
        "raw_strings": lambda: llm.generate(prompts, params, use_tqdm=False),
        "raw_ids": lambda: llm.generate(token_prompts, params, use_tqdm=False),
        "raw_ids_default_output": lambda: llm.generate(token_prompts, plain, use_tqdm=False),
    }
    for _ in range(2):  # warm-up every path
        for call in calls.values():
            call()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    loads, tokens = [], 0
    names = list(calls)
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            c0, w0 = cpu_seconds(), time.perf_counter()
            out = calls[name]()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(cpu_seconds() - c0)
            if name == "raw_ids":
                tokens += sum(len(c.token_ids) for o in out for c in o.outputs)
        loads.append(os.getloadavg()[0])
    # The sampler's own work alone: tokenise + build the TensorDict from fixed engine outputs.
    outputs = llm.generate(token_prompts, params, use_tqdm=False)
    own = []
    for _ in range(max(repeats, 10)):
        start = time.perf_counter()
        ids, texts = tokenize_prompts(
            "bench", prompts, sampler.tokenizer, sampler.max_model_len, sampler.vocab_size
        )
        sampler._rollout(ids, texts, outputs)
        own.append(time.perf_counter() - start)

    def summary(times: dict[str, list[float]]) -> dict:
        med = {name: statistics.median(t) for name, t in times.items()}
        out = {"median_s": med}
        for raw in ("raw_strings", "raw_ids", "raw_ids_default_output"):
            paired = [s / r for s, r in zip(times["sampler"], times[raw], strict=True)]
            out[f"overhead_vs_{raw}"] = {
                "ratio_of_medians": med["sampler"] / med[raw] - 1.0,
                "median_of_paired_ratios": statistics.median(paired) - 1.0,
            }
        return out

    own_median = statistics.median(own)
    return {
        "wall": summary(wall),
        "cpu": summary(cpu),
        "sampler_own_work_median_s": own_median,
        "own_work_fraction_of_raw_ids_wall": own_median / statistics.median(wall["raw_ids"]),
        "wall_s": wall,
        "cpu_s": cpu,
        "generated_tokens_per_call": tokens / repeats,
        "load_1min_per_round": loads,
    }


def write_markdown(report: dict, path: Path) -> None:
    m, o, s = report["machine"], report["overhead"], report["setup"]
    lines = [
        "# VLLMSampler overhead over raw `LLM.generate`, and weight-sync cost",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; torch {m['torch']}, vLLM {m['vllm']}.",
        f"Load average (1 / 5 / 15 min) before: {' / '.join(f'{x:.1f}' for x in report['load_before'])}; "
        f"after: {' / '.join(f'{x:.1f}' for x in report['load_after'])}. "
        + (
            "Other processes were using the CPU when this started (load above the core count), so "
            "absolute times are inflated and noisy; the rotating order, the per-round pairing and "
            "the CPU-time columns keep the comparison fair, and the 'own work' row is free of "
            "generation noise."
            # The load after counts this benchmark's own engine and trainer processes.
            if report["load_before"][0] > (m["cores"] or 1)
            else "No other job was using the CPU when this started (the load after counts the benchmark's own processes)."
        ),
        "",
        f"Setup: tiny Qwen3 ({report['tiny_params']:,} parameters, float32), {s['prompts']} prompts x "
        f"n = {s['n']}, max_tokens = {s['max_tokens']}, τ = 1.0, {s['repeats']} rounds (the order of the four calls rotates "
        f"each round); "
        f"about {o['generated_tokens_per_call']:.0f} generated tokens per call.",
        "",
        "Wall: seconds per call (median over rounds). CPU: user + system seconds of this process, "
        "the engine core and the worker per call (less sensitive to other jobs than wall time). "
        "Overhead: sampler / raw − 1, as the ratio of medians and as the median of per-round "
        "ratios (each round's calls run back to back, under the same load).",
        "",
        "| call | wall s | CPU s | overhead, wall (medians / paired) | overhead, CPU (medians / paired) |",
        "|---|---|---|---|---|",
        f"| `VLLMSampler.__call__` | {o['wall']['median_s']['sampler']:.4f} | "
        f"{o['cpu']['median_s']['sampler']:.4f} | | |",
    ]
    for raw, label in (
        ("raw_strings", "string prompts"),
        ("raw_ids", "token-id prompts"),
        ("raw_ids_default_output", "token-id prompts, vLLM's default detokenised output"),
    ):
        w, c = o["wall"][f"overhead_vs_{raw}"], o["cpu"][f"overhead_vs_{raw}"]
        lines.append(
            f"| raw `LLM.generate`, {label} | {o['wall']['median_s'][raw]:.4f} | {o['cpu']['median_s'][raw]:.4f} | "
            f"{100 * w['ratio_of_medians']:+.2f} % / {100 * w['median_of_paired_ratios']:+.2f} % | "
            f"{100 * c['ratio_of_medians']:+.2f} % / {100 * c['median_of_paired_ratios']:+.2f} % |"
        )
    lines += [
        f"| sampler's own work alone (tokenise + TensorDict, no generation) | "
        f"{o['sampler_own_work_median_s']:.4f} | | {100 * o['own_work_fraction_of_raw_ids_wall']:.2f} % "
        "of raw (ids) | |",
        "",
        "The sampler hands vLLM token ids (tokenised in one batched call), so it skips vLLM's "
        "per-prompt rendering of strings; the token-id row isolates the wrapper's own cost. The first two "
        "raw rows use the sampler's SamplingParams (``logprobs=0, flat_logprobs=True, detokenize=False``); "
        "the last uses plain ``SamplingParams(n, max_tokens, temperature, logprobs=0)``, whose per-token "
        "detokenisation the sampler avoids (it decodes the texts once, in a batch).",
        "",
        "## Weight sync (`sampler.sync_weights(model)`, median seconds)",
        "",
        "| model | parameters | file (/dev/shm, default) | rpc |",
        "|---|---|---|---|",
    ]
    for name, block in report["sync"].items():
        lines.append(
            f"| {name} | {block['params']:,} | {block['file']['median_s']:.3f} | {block['rpc']['median_s']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sync-repeats", type=int, default=5)
    parser.add_argument("--skip-medium", action="store_true", help="skip the ~58M-parameter sync timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from gspo_components.rollout.sampling import VLLMSampler

    load_before = os.getloadavg()
    rng = random.Random(0)
    prompts = [f"{rng.randrange(100)}+{rng.randrange(100)}=" for _ in range(args.prompts)]
    sync: dict = {}
    with tempfile.TemporaryDirectory(prefix="gspo_overhead_") as tmp:
        tiny = Path(tmp) / "tiny"
        tiny_params = build(tiny, max_position_embeddings=256)
        sampler = VLLMSampler(str(tiny), n=args.n, max_tokens=args.max_tokens, temperature=1.0)
        try:
            result = overhead(sampler, prompts, args.repeats)
            model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
            sync["tiny"] = {"params": tiny_params, **time_sync(sampler, model, args.sync_repeats)}
        finally:
            sampler.close()
        if not args.skip_medium:
            medium = Path(tmp) / "medium"
            arch = dict(
                vocab_size=32000,
                hidden_size=512,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=64,
                intermediate_size=1536,
                max_position_embeddings=256,
            )
            medium_params = build(medium, **arch)
            sampler = VLLMSampler(str(medium), n=1, max_tokens=4)
            try:
                model = AutoModelForCausalLM.from_pretrained(str(medium), dtype=torch.float32)
                sync["medium (hidden 512, 8 layers, vocab 32000)"] = {
                    "params": medium_params,
                    **time_sync(sampler, model, args.sync_repeats),
                }
            finally:
                sampler.close()
    report = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "setup": {
            "prompts": args.prompts,
            "n": args.n,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
        },
        "tiny_params": tiny_params,
        "overhead": result,
        "sync": sync,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "sampler_overhead.md")
    print((args.out / "sampler_overhead.md").read_text())


if __name__ == "__main__":
    main()
