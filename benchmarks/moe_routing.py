"""What Routing Replay costs: forward time with record and with replay against a plain forward,
and the bytes per token of stored routing.

Models: tiny Qwen3-MoE built locally (``tiny.build_tiny_qwen3_moe``), float32, every layer sparse:

- ``tiny``: the test suite's and the experiments' size (2 layers, hidden 128, 8 experts, top-2);
- ``small``: 4 layers, hidden 256, 32 experts, top-4 (more layers and experts per token, so more
  hook calls and a larger routing tensor per forward).

A batch is B = 16 sequences of S = 128 tokens (no padding). Each round times, in a rotating order:

- ``plain``: ``model.model(input_ids)`` under ``torch.no_grad`` (the backbone forward the Scorer
  runs for π_old);
- ``record``: the same inside ``RoutingReplay.record()``, reading ``routed_experts`` after;
- ``replay``: the same inside ``RoutingReplay.replay(recorded)``;
- ``plain+bwd`` and ``replay+bwd``: forward and backward of the summed last hidden state (the π_θ
  pass).

Overhead = median(variant) / median(plain) − 1, with the same-run plain forward as reference, and
also the median of per-round ratios. One torch thread (the tests' setting; steadier on a shared
2-core machine). Routing bytes per token = L · K · itemsize of the stored dtype, measured on the
recorded tensor, and computed the same way for published configurations.

Run: ``python benchmarks/moe_routing.py`` (about 1 minute). Writes
benchmarks/results/moe_routing.json and .md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _machine import cpu_description

from gspo_components.moe import RoutingReplay, routing_dtype
from gspo_components.testing.tiny import build_tiny_qwen3_moe

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {
    "tiny": dict(
        hidden_size=128, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64
    ),
    "small": dict(
        hidden_size=256, num_hidden_layers=4, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64
    ),
}
# Published MoE configurations: (MoE layers, experts, experts per token).
PUBLISHED = {
    "Qwen3-30B-A3B": (48, 128, 8),
    "Qwen3-235B-A22B": (94, 128, 8),
    "Mixtral-8x7B": (32, 8, 2),
    "OLMoE-1B-7B": (16, 64, 8),
    "DeepSeek-V3 (256 routed experts)": (58, 256, 8),
}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name: str, arch: dict, batch: int, seq: int, rounds: int) -> dict:
    model = build_tiny_qwen3_moe(64, seed=0, **arch)
    replay = RoutingReplay(model)
    ids = torch.randint(3, 64, (batch, seq), generator=torch.Generator().manual_seed(0))
    backbone = model.model
    with torch.no_grad(), replay.record() as rec:
        backbone(input_ids=ids)
    recorded = rec.routed_experts

    def plain() -> None:
        with torch.no_grad():
            backbone(input_ids=ids)

    def record() -> None:
        with torch.no_grad(), replay.record() as r:
            backbone(input_ids=ids)
        r.routed_experts  # noqa: B018 (the joined tensor is part of the cost)

    def replayed() -> None:
        with torch.no_grad(), replay.replay(recorded):
            backbone(input_ids=ids)

    def plain_bwd() -> None:
        model.zero_grad(set_to_none=True)
        backbone(input_ids=ids).last_hidden_state.sum().backward()

    def replay_bwd() -> None:
        model.zero_grad(set_to_none=True)
        with replay.replay(recorded):
            out = backbone(input_ids=ids).last_hidden_state.sum()
        out.backward()

    variants = {
        "plain": plain,
        "record": record,
        "replay": replayed,
        "plain+bwd": plain_bwd,
        "replay+bwd": replay_bwd,
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            times[k].append(_time(variants[k]))
    med = {k: statistics.median(v) for k, v in times.items()}

    def overhead(variant: str, ref: str) -> dict:
        per_round = [a / b - 1 for a, b in zip(times[variant], times[ref], strict=True)]
        return {
            "ratio_of_medians_minus_1": med[variant] / med[ref] - 1,
            "median_of_round_ratios_minus_1": statistics.median(per_round),
            "ratio_of_minimums_minus_1": min(times[variant]) / min(times[ref]) - 1,
        }

    tokens = batch * seq
    return {
        "model": name,
        "arch": arch,
        "batch": [batch, seq],
        "rounds": rounds,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "overhead": {
            "record": overhead("record", "plain"),
            "replay": overhead("replay", "plain"),
            "replay+bwd": overhead("replay+bwd", "plain+bwd"),
        },
        "routing_shape": list(recorded.shape),
        "routing_dtype": str(recorded.dtype).removeprefix("torch."),
        "routing_bytes_per_token": recorded.numel() * recorded.element_size() / tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [bench(name, arch, args.batch, args.seq, args.rounds) for name, arch in CONFIGS.items()]
    published = {
        name: {
            "layers": layers,
            "experts": experts,
            "top_k": k,
            "dtype": str(routing_dtype(experts)).removeprefix("torch."),
            "bytes_per_token": layers * k * torch.empty((), dtype=routing_dtype(experts)).element_size(),
        }
        for name, (layers, experts, k) in PUBLISHED.items()
    }
    out = {
        "machine": {
            "cpu": cpu_description(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_1min": os.getloadavg()[0],
        },
        "results": results,
        "published_bytes_per_token": published,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe_routing.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Routing Replay overhead (benchmarks/moe_routing.py)",
        "",
        f"Machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, 1 torch thread, torch "
        f"{torch.__version__}; 1-min load average at the end {out['machine']['loadavg_1min']:.2f}.",
        f"Batch {args.batch} × {args.seq} tokens, float32, {args.rounds} rounds, rotating order.",
        "",
        "| model | plain fwd (ms) | record | replay | plain fwd+bwd (ms) | replay fwd+bwd | routing bytes/token |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(o: dict) -> str:
        return (
            f"{100 * o['median_of_round_ratios_minus_1']:+.1f} % "
            f"({100 * o['ratio_of_medians_minus_1']:+.1f} / {100 * o['ratio_of_minimums_minus_1']:+.1f})"
        )

    for r in results:
        o, m = r["overhead"], r["median_ms"]
        lines.append(
            f"| {r['model']} (L={r['routing_shape'][2]}, K={r['routing_shape'][3]}, E={r['arch']['num_experts']}) "
            f"| {m['plain']:.1f} | {cell(o['record'])} | {cell(o['replay'])} | {m['plain+bwd']:.1f} "
            f"| {cell(o['replay+bwd'])} | {r['routing_bytes_per_token']:.0f} ({r['routing_dtype']}) |"
        )
    lines += [
        "",
        "Each overhead: the median over rounds of (variant / plain of the same round) − 1, then in",
        "brackets the ratio of medians and the ratio of minimums. On this shared virtual machine the",
        "three differ by several percent: differences of that size are noise.",
        "",
        "Stored routing for published configurations (L · K · itemsize, computed, not measured):",
        "",
        "| model | MoE layers | experts | top-k | dtype | bytes/token |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in published.items():
        lines.append(
            f"| {name} | {p['layers']} | {p['experts']} | {p['top_k']} | {p['dtype']} | {p['bytes_per_token']} |"
        )
    (RESULTS / "moe_routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
