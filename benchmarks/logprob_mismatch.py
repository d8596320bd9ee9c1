"""How far vLLM's log-probs are from transformers' for the same sampled tokens, fp32 and bf16.

The model is the demo's kind: a tiny Qwen3 (character vocabulary, hidden 128, 2 layers, 4 heads,
2 KV heads, head_dim 32), briefly trained on two-digit additions so that its distributions are
peaked like a trained model's rather than near-uniform like a fresh one's.

For each engine dtype (float32, bfloat16) a VLLMSampler samples n responses per prompt at
τ ∈ {1.0, 0.7}; ``rollout_log_probs`` (log softmax(z/τ) of the sampled tokens, as vLLM
reports them with ``logprobs_mode="processed_logprobs"``) are then compared, token by token
over the response mask, with the Scorer's recomputation on the same tokens:

- float32: vLLM fp32 vs transformers fp32 (fused head, the trainer's path; and the plain
  ``logits → log_softmax`` path);
- bfloat16: vLLM bf16 vs transformers bf16, and each of them vs a transformers fp32
  recomputation.

Reported per comparison: max and mean |Δℓ| over sampled tokens, and max and mean over
sequences of |mean_t Δℓ_t|, the log of GSPO's sequence ratio that the mismatch alone produces
(GSPO clips that ratio to [1 − 3e-4, 1 + 4e-4]).

Run: ``python benchmarks/logprob_mismatch.py`` (about 3 minutes on 2 cores, two engine
starts). Writes benchmarks/results/logprob_mismatch.json and .md.

``--model runs/warmup`` measures an existing model folder instead, e.g. the demo's own warm start
(written by ``make demo``), and writes ``logprob_mismatch_<folder name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from _machine import cpu_description

ALPHABET = "0123456789+-*=(). "
RESULTS = Path(__file__).resolve().parent / "results"


def addition_examples(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``("a+b=", "c")`` pairs with a, b in [0, 99]."""
    pairs = []
    for _ in range(count):
        a, b = rng.randrange(100), rng.randrange(100)
        pairs.append((f"{a}+{b}=", str(a + b)))
    return pairs


def build_model(path: Path, sft_steps: int, seed: int) -> dict:
    """Build the tiny Qwen3 + tokenizer, fine-tune it on additions, save it (float32) to ``path``."""
    from gspo_components.testing.tiny import build_char_tokenizer, build_tiny_qwen3, supervised_step

    tok = build_char_tokenizer(ALPHABET, path)
    model = build_tiny_qwen3(len(tok), tokenizer=tok, max_position_embeddings=128, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    start, loss = time.perf_counter(), float("nan")
    for _ in range(sft_steps):
        loss = supervised_step(model, tok, optimizer, addition_examples(rng, 64), prompt_loss=True)
    model.eval()
    model.save_pretrained(str(path))
    return {"sft_steps": sft_steps, "sft_seconds": round(time.perf_counter() - start, 1), "final_loss": loss}


def stats(delta: torch.Tensor, mask: torch.Tensor) -> dict:
    """max/mean |Δ| over tokens, and max/mean over sequences of |mean_t Δ_t|."""
    tokens = delta.abs()[mask]
    per_seq = torch.where(mask, delta, torch.zeros(())).sum(-1) / mask.sum(-1).clamp(min=1)
    valid = mask.any(-1)
    return {
        "token_max_abs": float(tokens.max()),
        "token_mean_abs": float(tokens.mean()),
        "seq_mean_max_abs": float(per_seq.abs()[valid].max()),
        "seq_mean_mean_abs": float(per_seq.abs()[valid].mean()),
        "tokens": int(mask.sum()),
        "sequences": int(valid.sum()),
    }


def score(model: torch.nn.Module, td, temperature: float, fused: bool = True) -> torch.Tensor:
    from gspo_components.rollout.scoring import response_log_probs

    with torch.no_grad():
        return response_log_probs(
            model,
            td["prompt_ids"],
            td["prompt_mask"],
            td["response_ids"],
            td["response_mask"],
            temperature=temperature,
            fused=fused,
        )


def run(model_dir: Path, prompts: list[str], n: int, max_tokens: int, temps: list[float]) -> dict:
    from transformers import AutoModelForCausalLM

    from gspo_components.rollout.sampling import VLLMSampler

    hf32 = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hf16 = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    results: dict = {}
    for dtype in ("float32", "bfloat16"):
        sampler = VLLMSampler(str(model_dir), n=n, max_tokens=max_tokens, seed=0, dtype=dtype)
        try:
            for tau in temps:
                sampler.temperature = tau
                td = sampler(prompts)
                mask, rollout = td["response_mask"], td["rollout_log_probs"]
                key = f"{dtype}/tau={tau}"
                if dtype == "float32":
                    results[key] = {
                        "vllm_fp32 vs transformers_fp32 (Scorer, fused head)": stats(
                            rollout - score(hf32, td, tau), mask
                        ),
                        "vllm_fp32 vs transformers_fp32 (plain log_softmax)": stats(
                            rollout - score(hf32, td, tau, fused=False), mask
                        ),
                    }
                else:
                    ref32, ref16 = score(hf32, td, tau), score(hf16, td, tau)
                    results[key] = {
                        "vllm_bf16 vs transformers_bf16 (Scorer)": stats(rollout - ref16, mask),
                        "vllm_bf16 vs transformers_fp32 (Scorer)": stats(rollout - ref32, mask),
                        "transformers_bf16 vs transformers_fp32 (Scorer)": stats(ref16 - ref32, mask),
                    }
                results[key]["mean_response_tokens"] = float(mask.sum(-1).float().mean())
                results[key]["truncated_fraction"] = float(td["truncated"].float().mean())
        finally:
            sampler.close()
    return results


def machine() -> dict:
    cpu = cpu_description()
    import transformers
    import vllm

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
    }


def model_line(model: dict) -> str:
    if "source" in model:
        return (
            f"Model: `{model['source']}` ({model['parameters']:,} parameters, vocab {model['vocab']}), "
            "loaded as it is; prompts are two-digit additions."
        )
    return (
        f"Model: tiny Qwen3, vocab {model['vocab']} tokens (characters + 3 special), hidden 128, 2 layers, "
        f"4 heads, 2 KV heads, head_dim 32, trained {model['sft_steps']} steps on two-digit additions "
        f"(final loss {model['final_loss']:.3f})."
    )


def write_markdown(report: dict, path: Path) -> None:
    m = report["machine"]
    lines = [
        "# Log-prob mismatch: vLLM vs transformers",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, vLLM {m['vllm']}, "
        f"transformers {m['transformers']}. Load average (1 min) {report['load_before'][0]:.1f} before, "
        f"{report['load_after'][0]:.1f} after (load changes timings, not these numbers).",
        "",
        model_line(report["model"])
        + f" {report['setup']['prompts']} prompts x n = {report['setup']['n']}, at most "
        f"{report['setup']['max_tokens']} tokens.",
        "",
        "Δℓ = ℓ_a − ℓ_b per sampled token (response mask only). 'seq' columns: |mean_t Δℓ_t| per response, "
        "the log GSPO sequence ratio that the mismatch alone creates.",
        "",
        "| engine dtype, τ | comparison | token max abs | token mean abs | seq max abs | seq mean abs | tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, block in report["results"].items():
        for name, s in block.items():
            if not isinstance(s, dict):
                continue
            lines.append(
                f"| {key} | {name} | {s['token_max_abs']:.2e} | {s['token_mean_abs']:.2e} | "
                f"{s['seq_mean_max_abs']:.2e} | {s['seq_mean_mean_abs']:.2e} | {s['tokens']} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--model", type=Path, default=None, help="an existing model folder (e.g. runs/warmup)"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    prompts = [p for p, _ in addition_examples(random.Random(args.seed + 1), args.prompts)]
    stem = "logprob_mismatch"
    if args.model is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(args.model))
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(args.model)).parameters())
        model_info = {"source": str(args.model), "vocab": config.vocab_size, "parameters": n_params}
        results = run(args.model, prompts, args.n, args.max_tokens, [1.0, 0.7])
        stem += f"_{args.model.resolve().name}"
    else:
        with tempfile.TemporaryDirectory(prefix="gspo_mismatch_") as tmp:
            model_dir = Path(tmp)
            model_info = build_model(model_dir, args.sft_steps, args.seed)
            model_info["vocab"] = len(ALPHABET) + 3
            results = run(model_dir, prompts, args.n, args.max_tokens, [1.0, 0.7])
    report = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "model": model_info,
        "setup": {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / f"{stem}.md")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
