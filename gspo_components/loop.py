"""The reference loop: one RL step is a few lines of composition, not a framework.

Each step:

1. sample G responses per prompt (``sampler(prompts)``);
2. score the rewards (``reward_fn``); samples whose reward failed leave the loss;
3. compute the advantages once, over whole groups (``recipe.advantage``);
4. compute π_old without gradient (``Scorer(..., grad=False)``), or take the engine's
   ``rollout_log_probs`` with ``old_from_rollout=True``;
5. run ``epochs`` (μ) passes of ``minibatches`` shuffled minibatch updates with ``recipe.loss``
   on log-probs recomputed by the policy through the fused head;
6. push the new weights into the sampler (``sampler.sync_weights(policy)``).

Mixture-of-experts policies (``config.routing_replay``, see docs/moe.md):

- ``None``: no replay. The π_old pass records the routing (or the sampler's ``routed_experts`` is
  used with ``old_from_rollout=True``) and the π_θ passes only compare against it;
- ``"R2"``: the π_old pass records the routing and every π_θ pass replays it;
- ``"R3"``: the sampler's ``routed_experts`` (rollout routing) is replayed in the π_old pass and
  in every π_θ pass.

For MoE policies the loop logs ``routing_volatility`` and ``tokens_rerouted`` per step (means
over the step's minibatches), measured in the π_θ forwards with or without replay.

It logs reward, accuracy, the gradient norm before clipping (``grad_norm``, mean over the
minibatches), clip fractions, KL, ratio statistics and tokens/s to a JSON-lines file
and a progress bar, and saves / resumes checkpoints (policy, optimizer, learning-rate scheduler,
sampler state, step, history, RNG). An optional ``lr_scheduler`` is stepped once per RL step,
after the updates. The sampler's state (its seed generator, when the sampler has
``state_dict``/``load_state_dict``) is checkpointed too, so a resume with a sampler rebuilt
with the same ``seed`` draws the same samples as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from tensordict import NonTensorStack, TensorDictBase

from ._module import key_of
from .moe import RoutingReplay, routing_mask, routing_metrics
from .recipes import Recipe
from .scoring import Scorer

__all__ = ["PromptBatch", "RLConfig", "Sampler", "train"]


class Sampler(Protocol):
    """What the loop needs of a sampler. ``state_dict()`` / ``load_state_dict()`` are optional:
    when present, the sampler's state is saved with each checkpoint and restored on resume."""

    def __call__(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> TensorDictBase: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


@dataclass
class PromptBatch:
    """Prompts for one step and per-prompt fields to attach to every sample (e.g. ``answer``)."""

    prompts: list[str]
    fields: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class RLConfig:
    steps: int
    minibatches: int = 4
    epochs: int = 1
    temperature: float = 1.0
    max_grad_norm: float | None = 1.0
    old_from_rollout: bool = False
    accuracy_key: str | tuple[str, ...] | None = "rewards"
    accuracy_threshold: float = 0.5
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    log_path: Path | None = None
    progress: bool = True
    seed: int = 0
    routing_replay: Literal["R2", "R3"] | None = None


def _attach(td: TensorDictBase, fields: dict[str, list[Any]], repeat: int) -> None:
    for name, values in fields.items():
        per_sample = [v for v in values for _ in range(repeat)]
        if per_sample and isinstance(per_sample[0], (int, float)) and not isinstance(per_sample[0], bool):
            td.set(name, torch.tensor(per_sample))
        else:
            td.set(name, NonTensorStack(*per_sample))


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


LRScheduler = torch.optim.lr_scheduler.LRScheduler


def _save(
    path: Path,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LRScheduler | None,
    sampler: Sampler,
    step: int,
    history: list,
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "checkpoint.pt.tmp"
    torch.save(
        {
            "policy": policy.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
            "step": step,
            "history": history,
            "rng": torch.get_rng_state(),
        },
        tmp,
    )
    tmp.replace(path / "checkpoint.pt")


def _load(
    path: Path,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LRScheduler | None,
    sampler: Sampler,
) -> tuple[int, list]:
    ckpt = torch.load(path / "checkpoint.pt", weights_only=False)
    policy.load_state_dict(ckpt["policy"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if lr_scheduler is not None:
        if ckpt.get("lr_scheduler") is None:
            raise ValueError(
                f"checkpoint {path / 'checkpoint.pt'} has no lr_scheduler state, but train() was given one"
            )
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if ckpt.get("sampler") is not None and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(ckpt["sampler"])
    torch.set_rng_state(ckpt["rng"])
    return int(ckpt["step"]), list(ckpt["history"])


@dataclass(frozen=True)
class _RoutingModes:
    """The Scorers' routing options for one run (all None for a dense policy)."""

    old: Literal["record", "replay"] | None
    policy: Literal["replay", "compare"] | None
    needs_rollout_routing: bool


def _routing_modes(policy: torch.nn.Module, config: RLConfig) -> _RoutingModes:
    mode = config.routing_replay
    if mode not in (None, "R2", "R3"):
        raise ValueError(f"RLConfig.routing_replay must be None, 'R2' or 'R3', got {mode!r}")
    try:
        RoutingReplay(policy)
    except ValueError as err:
        if mode is not None:
            raise ValueError(
                f"RLConfig.routing_replay={mode!r} needs a mixture-of-experts policy: {err}"
            ) from None
        return _RoutingModes(None, None, False)
    if mode == "R3":
        return _RoutingModes(None if config.old_from_rollout else "replay", "replay", True)
    if config.old_from_rollout:
        if mode == "R2":
            raise ValueError(
                "RLConfig.routing_replay='R2' records the routing in the π_old forward, but "
                "old_from_rollout=True skips that forward; use 'R3' (rollout routing) or "
                "old_from_rollout=False"
            )
        # No π_old forward to record in: measure against the sampler's routing when it has one.
        return _RoutingModes(None, "compare", False)
    return _RoutingModes("record", "replay" if mode == "R2" else "compare", False)


def train(
    policy: torch.nn.Module,
    sampler: Sampler,
    reward_fn: torch.nn.Module,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    next_prompts: Callable[[int], PromptBatch],
    config: RLConfig,
    *,
    samples_per_prompt: int,
    on_step: Callable[[int, dict[str, float]], dict[str, float] | None] | None = None,
    reference: torch.nn.Module | None = None,
    lr_scheduler: LRScheduler | None = None,
) -> list[dict[str, float]]:
    """Run ``config.steps`` RL steps; return the per-step metrics (also resumed history).

    ``on_step(step, metrics)`` may return extra metrics (e.g. a held-out evaluation) to log.
    ``reference`` is scored into ``ref_log_probs`` when the recipe uses a KL term.
    ``lr_scheduler`` (any ``torch.optim.lr_scheduler``) is stepped once per RL step; the learning
    rate used by the step is logged as ``lr``.
    """
    routing = _routing_modes(policy, config)
    scorer = Scorer(policy, temperature=config.temperature, routing=routing.policy)
    plain_scorer = Scorer(policy, temperature=config.temperature) if routing.policy == "compare" else scorer
    loss_key = key_of(recipe.loss, "loss", output=True)
    # Each logged loss metric: (canonical name, the key the recipe writes it to, its reduction
    # over the step's minibatches).
    logged = [
        (name, key_of(recipe.loss, name, output=True), reduce)
        for name, reduce in (
            *((n, _mean) for n in ("loss", "clip_fraction", "clip_fraction_low", "clip_fraction_high",
                                   "seq_clip_fraction", "ratio_mean", "kl", "entropy")),
            ("ratio_min", min),
            ("ratio_max", max),
        )
    ]  # fmt: skip
    old_scorer = Scorer(
        policy, temperature=config.temperature, out_key="old_log_probs", grad=False, routing=routing.old
    )
    ref_scorer = (
        Scorer(reference, temperature=config.temperature, out_key="ref_log_probs", grad=False)
        if reference is not None
        else None
    )
    start, history = 0, []
    ckpt_dir = config.checkpoint_dir
    if ckpt_dir is not None and (ckpt_dir / "checkpoint.pt").exists():
        start, history = _load(ckpt_dir, policy, optimizer, lr_scheduler, sampler)
        sampler.sync_weights(policy)
    if start == 0:
        torch.manual_seed(config.seed)  # on resume, the checkpoint's RNG state continues instead
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=recipe.name, dynamic_ncols=True)
    log = open(config.log_path, "a") if config.log_path is not None else None
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            batch = next_prompts(step)
            td = sampler(batch.prompts)
            t_sample = time.perf_counter() - t0
            _attach(td, batch.fields, samples_per_prompt)
            td = reward_fn(td)
            valid = td["reward_valid"]
            td["response_mask"] = td["response_mask"] & valid.unsqueeze(-1)
            td = recipe.advantage(td)
            if routing.needs_rollout_routing and "routed_experts" not in td.keys():
                raise ValueError(
                    f"train: routing_replay={config.routing_replay!r} needs the sampler to return "
                    "'routed_experts' (TransformersSampler(..., return_routed_experts=True), or "
                    "VLLMSampler(..., return_routed_experts=True) on a GPU build of vLLM)"
                )
            if config.old_from_rollout:
                td["old_log_probs"] = td["rollout_log_probs"]
            else:
                td = old_scorer(td)
            if ref_scorer is not None:
                td = ref_scorer(td)
            outputs: list[TensorDictBase] = []
            routing_values: list[dict[str, torch.Tensor]] = []
            grad_norms: list[float] = []
            # Without a routing to compare against (no π_old record, no rollout routing): no metrics.
            step_scorer = (
                scorer if routing.policy != "compare" or "routed_experts" in td.keys() else plain_scorer
            )
            lr = float(optimizer.param_groups[0]["lr"])
            policy.train()
            for _ in range(config.epochs):
                order = torch.randperm(td.shape[0])
                for chunk in order.chunk(config.minibatches):
                    mb = td[chunk]
                    if not bool(mb["response_mask"].any()):
                        continue
                    mb = step_scorer(mb)
                    if step_scorer.routing is not None:
                        routing_values.append(
                            routing_metrics(
                                mb["rerouted"], routing_mask(mb["prompt_mask"], mb["response_mask"])
                            )
                        )
                    out = recipe.loss(mb)
                    optimizer.zero_grad(set_to_none=True)
                    out[loss_key].backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        policy.parameters(),
                        config.max_grad_norm if config.max_grad_norm is not None else float("inf"),
                    )
                    grad_norms.append(float(grad_norm))
                    optimizer.step()
                    outputs.append(out.detach())
            if lr_scheduler is not None:
                lr_scheduler.step()
            policy.eval()
            sampler.sync_weights(policy)
            elapsed = time.perf_counter() - t0
            rewards = td["rewards"].float()
            tokens = int(td["response_mask"].sum())
            metrics: dict[str, float] = {
                "step": float(step + 1),
                "reward": float(rewards[valid].mean()) if bool(valid.any()) else float("nan"),
                "reward_failures": float((~valid).sum()),
                "response_length": float(td["response_mask"].sum(-1).float().mean()),
                "tokens_per_s": tokens / max(elapsed, 1e-9),
                "sample_tokens_per_s": tokens / max(t_sample, 1e-9),
                "seconds": elapsed,
                "lr": lr,
            }
            if config.accuracy_key is not None:
                acc_src = td.get(config.accuracy_key).float()
                metrics["accuracy"] = float((acc_src[valid] >= config.accuracy_threshold).float().mean())
            for name, key, reduce in logged:
                values = [float(o[key]) for o in outputs if key in o.keys(include_nested=True)]
                if values:
                    metrics[name] = reduce(values)
            if grad_norms:  # a plain mean: a non-finite norm must show
                metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
            for name in ("routing_volatility", "tokens_rerouted"):
                if routing_values:
                    metrics[name] = _mean([float(v[name]) for v in routing_values])
            if on_step is not None:
                extra = on_step(step + 1, metrics)
                if extra:
                    metrics.update(extra)
            history.append(metrics)
            if log is not None:
                log.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                      for k, v in metrics.items()}) + "\n")  # fmt: skip
                log.flush()
            if bar is not None:
                shown = {
                    k: f"{metrics[k]:.3g}" for k in ("reward", "accuracy", "clip_fraction") if k in metrics
                }
                bar.set_postfix(shown)
                bar.update(1)
            if ckpt_dir is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                _save(ckpt_dir, policy, optimizer, lr_scheduler, sampler, step + 1, history)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return history
