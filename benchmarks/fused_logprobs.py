"""Benchmark: fused log-probs against eager torch, Liger and the matmul floor.

For each shape (N tokens, hidden H, vocabulary V) and method it records forward+backward time
(median over ``--repeats`` runs after warm-up; CUDA events on a GPU, ``perf_counter`` on the
CPU), the peak *extra* memory of one forward+backward beyond the inputs, and the max absolute
log-prob error against a float64 computation from the same (rounded) inputs.

Methods:
    eager          logits = h Wᵀ materialised, log_softmax in float32, gather, autograd
    torch-chunked  linear_log_probs(backend="torch")
    triton         linear_log_probs(backend="triton")                         (CUDA only)
    liger          LigerFusedLinearGRPOLoss, GSPO settings (sequence level,  (CUDA only, when
                   ε = 3e-4 / 4e-4, loss_type "grpo", β = 0)                  liger-kernel imports)
    matmul-floor   the three bare matmuls of the same shapes: X·Wᵀ, dZ·W, dZᵀ·X

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU each method runs in a
fresh subprocess and the growth of its peak resident set (``ru_maxrss``) over one forward+backward
is reported.

Usage:
    python benchmarks/fused_logprobs.py --device cpu                          # 8192 × 256 × 32768
    python benchmarks/fused_logprobs.py --device cuda                         # the GPU grid
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _machine import cpu_description

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gspo_components.fused import linear_log_probs

GPU_SHAPES = [(n, 4096, v) for n in (4096, 16384) for v in (151936, 128256)]
CPU_SHAPES = [(8192, 256, 32768)]
SEQ_LEN = 1024  # tokens per sequence for Liger's [B, T, H] layout


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) * 1.0).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    grad_out = torch.randn(n, generator=gen).to(device)
    return hidden, weight, targets, grad_out


def eager(hidden, weight, targets):
    logits = hidden @ weight.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def method_fn(name: str):
    if name == "eager":
        return eager
    if name == "torch-chunked":
        return lambda h, w, y: linear_log_probs(h, w, y, backend="torch")
    if name == "triton":
        return lambda h, w, y: linear_log_probs(h, w, y, backend="triton")
    raise ValueError(name)


def liger_step(hidden, weight, targets):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    n, h = hidden.shape
    b = max(1, n // SEQ_LEN)
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=0.0,
        use_ref_model=False,
        epsilon_low=3e-4,
        epsilon_high=4e-4,
        loss_type="grpo",
        importance_sampling_level="sequence",
    )
    x = hidden.view(b, n // b, h)
    y = targets.view(b, n // b)
    mask = torch.ones_like(y)
    adv = torch.randn(b, device=hidden.device)
    with torch.no_grad():
        old = torch.zeros(b, n // b, device=hidden.device)
    out = loss_fn(x, weight, y, mask, adv, old_per_token_logps=old)
    return out[0] if isinstance(out, tuple) else out


def run_once(name: str, hidden, weight, targets, grad_out):
    hidden.grad = None
    weight.grad = None
    if name == "liger":
        liger_step(hidden, weight, targets).backward()
        return None
    if name == "matmul-floor":
        with torch.no_grad():
            z = hidden @ weight.t()
            dz = z  # same shape and dtype as the logits' gradient
            _ = dz @ weight
            _ = dz.t() @ hidden
        return None
    lp = method_fn(name)(hidden, weight, targets)
    (lp * grad_out).sum().backward()
    return lp.detach()


def reference_log_probs(hidden, weight, targets) -> torch.Tensor:
    """float64 log-probs from the same (rounded) inputs, computed in row blocks."""
    out = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    w = weight.detach().double()
    for s in range(0, hidden.shape[0], 1024):
        z = hidden[s : s + 1024].detach().double() @ w.t()
        out[s : s + 1024] = torch.log_softmax(z, -1).gather(-1, targets[s : s + 1024, None]).squeeze(-1)
    return out


def time_method(name, inputs, repeats: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        run_once(name, *inputs)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_once(name, *inputs)
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1000.0)
        else:
            t0 = time.perf_counter()
            run_once(name, *inputs)
            times.append(time.perf_counter() - t0)
    return times


def measure_cpu_child(args: argparse.Namespace) -> None:
    """Run inside a fresh process: one method, one shape; print one JSON line."""
    n, h, v = args.child_shape
    dtype = getattr(torch, args.dtype)
    # Touch every code path once at a tiny size, so that lazy initialisation (autograd threads,
    # kernel dispatch tables) does not count as the method's memory.
    run_once(args.child_method, *make_inputs(16, h, 64, dtype, "cpu", seed=1))
    inputs = make_inputs(n, h, v, dtype, "cpu")
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lp = run_once(args.child_method, *inputs)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = None
    if lp is not None:
        err = float((lp.double() - reference_log_probs(*inputs[:3])).abs().max())
    times = time_method(args.child_method, inputs, args.repeats, args.warmup, "cpu")
    print(
        json.dumps(
            {
                "peak_extra_bytes": (peak_kib - base_kib) * 1024,
                "max_abs_error": err,
                "times_s": times,
            }
        )
    )


def measure_gpu(name, shape, dtype, repeats, warmup) -> dict:
    n, h, v = shape
    inputs = make_inputs(n, h, v, dtype, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp = run_once(name, *inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    err = None
    if lp is not None:
        err = float((lp.double() - reference_log_probs(*inputs[:3])).abs().max())
    times = time_method(name, inputs, repeats, warmup, "cuda")
    del inputs, lp
    torch.cuda.empty_cache()
    return {"peak_extra_bytes": int(peak), "max_abs_error": err, "times_s": times}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["cpu"] = cpu_description()
    info["cpu_count"] = os.cpu_count()
    return info


def write_outputs(results: list[dict], out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": meta, "results": results}, indent=2))
    lines = [
        f"Machine: {meta.get('gpu') or meta.get('cpu')} ({meta['cpu_count']} CPUs), torch {meta['torch']}",
        "",
        "| N | H | V | dtype | method | fwd+bwd median (ms) | × floor | × eager | peak extra (MiB) | % of eager | max abs log-prob error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_shape: dict[tuple, dict] = {}
    for r in results:
        by_shape.setdefault(tuple(r["shape"]), {})[r["method"]] = r
    for shape, rows in by_shape.items():
        floor = rows.get("matmul-floor", {}).get("median_s")
        eager_r = rows.get("eager", {})
        for name, r in rows.items():
            med = r["median_s"]
            xf = f"{med / floor:.2f}" if floor else "–"
            xe = f"{med / eager_r['median_s']:.2f}" if eager_r.get("median_s") else "–"
            mem = r["peak_extra_bytes"] / 2**20
            pe = (
                f"{100 * r['peak_extra_bytes'] / eager_r['peak_extra_bytes']:.1f}%"
                if eager_r.get("peak_extra_bytes")
                else "–"
            )
            err = "–" if r["max_abs_error"] is None else f"{r['max_abs_error']:.2e}"
            lines.append(
                f"| {shape[0]} | {shape[1]} | {shape[2]} | {r['dtype']} | {name} | {1000 * med:.1f} | {xf} | "
                f"{xe} | {mem:.1f} | {pe} | {err} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{s[0]}×{s[1]}×{s[2]}" for s in by_shape]
    methods = sorted({r["method"] for r in results})
    width = 0.8 / max(len(methods), 1)
    for k, name in enumerate(methods):
        xs = [i + k * width for i in range(len(labels))]
        t = [by_shape[s].get(name, {}).get("median_s", 0) * 1000 for s in by_shape]
        m = [by_shape[s].get(name, {}).get("peak_extra_bytes", 0) / 2**20 for s in by_shape]
        axes[0].bar(xs, t, width, label=name)
        axes[1].bar(xs, m, width, label=name)
    for ax, title in zip(
        axes, ("forward+backward time (ms, median)", "peak extra memory (MiB)"), strict=True
    ):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"fused log-probs on {meta.get('gpu') or meta.get('cpu')}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, action="append", help="N H V (repeatable)")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child-method", dest="child_method", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--child-shape", dest="child_shape", type=int, nargs=3, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.child_method:
        measure_cpu_child(args)
        return
    shapes = (
        [tuple(s) for s in args.shape]
        if args.shape
        else (GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    )
    if args.methods is None:
        args.methods = ["eager", "torch-chunked", "matmul-floor"]
        if args.device == "cuda":
            args.methods += ["triton", "liger"]
    out = args.out or Path(__file__).parent / "results" / f"fused_logprobs_{args.device}"
    meta = machine()
    results = []
    for shape in shapes:
        for name in args.methods:
            if args.device == "cuda":
                r = measure_gpu(name, shape, getattr(torch, args.dtype), args.repeats, args.warmup)
            else:
                cmd = [
                    sys.executable, __file__, "--device", "cpu", "--dtype", args.dtype,
                    "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                    "--child-method", name, "--child-shape", *map(str, shape),
                ]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(
                method=name, shape=list(shape), dtype=args.dtype, median_s=statistics.median(r["times_s"])
            )
            print(
                f"{shape} {name:14s} median {1000 * r['median_s']:9.1f} ms  peak extra "
                f"{r['peak_extra_bytes'] / 2**20:9.1f} MiB  err {r['max_abs_error']}",
                flush=True,
            )
            results.append(r)
    write_outputs(results, out, meta)
    print(f"wrote {out.with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    main()
