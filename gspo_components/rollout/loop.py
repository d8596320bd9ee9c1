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
minibatches), clip fractions, KL, entropy, ratio statistics, ``skipped_updates`` and tokens/s
through its loggers (:mod:`gspo_components.rollout.metrics_log`: JSON lines for ``log_path``, or any
object passed as ``logger=``) and a progress bar, and saves / resumes checkpoints (policy,
optimizer, learning-rate scheduler, sampler state, step, history, RNG; see
:mod:`gspo_components.rollout.checkpoint`). An optional ``lr_scheduler`` is stepped once per RL step,
after the updates. The sampler's state (its seed generator, when the sampler has
``state_dict``/``load_state_dict``) is checkpointed too, so a resume with a sampler rebuilt
with the same ``seed`` draws the same samples as an uninterrupted run.

Faults:

- a minibatch whose loss or gradient norm is not finite makes no optimizer step (its gradients
  are dropped); the step's ``skipped_updates`` counts such minibatches, and its ``grad_norm``
  shows the non-finite norm;
- with ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps (0: never in
  between), at the end of the run, and on ``KeyboardInterrupt`` (the state of the last completed
  step, when the interrupted step has not yet updated the weights);
- a resume refuses a checkpoint of another recipe, ``steps`` below the checkpoint's step, and a
  learning-rate scheduler present on one side only; the loggers drop what was logged after the
  checkpoint's step, so no step is logged twice.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from tensordict import NestedKey, NonTensorStack, TensorDictBase

from ..loss._checks import check_mask
from ..loss._module import key_of
from ..loss.recipes import Recipe
from ..moe import RoutingReplay, routing_mask, routing_metrics
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .metrics_log import JSONLinesLogger, MetricsLogger, check_logger
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
    """Settings of :func:`train` (checked when ``train`` starts; bad values are ``ValueError``).

    Attributes:
        steps: RL steps to run in all (a resumed run continues to this step); ``>= 0``.
        minibatches: optimizer steps per epoch over each rollout batch; ``>= 1``.
        epochs: passes (μ) over each rollout batch; ``>= 1``.
        temperature: τ, the sampler's temperature; it must equal ``sampler.temperature`` when the
            sampler has one. Finite, ``> 0``.
        max_grad_norm: clip the gradient norm to this (``None``: no clipping); finite, ``> 0``.
        old_from_rollout: take π_old from the sampler's ``rollout_log_probs`` instead of a
            forward of the policy.
        accuracy_key: the key the ``accuracy`` metric reads (``None``: no accuracy).
        accuracy_threshold: ``accuracy`` = fraction of scored samples with value ``>= threshold``.
            ``None`` (default): logged only on steps where every scored value is 0 or 1 (the
            fraction of 1s), since a threshold on fractional rewards means nothing by default.
        checkpoint_dir: where checkpoints are written and resumed from (``None``: none).
        checkpoint_every: also write one every this many steps (0: only at the end and on
            ``KeyboardInterrupt``); ``>= 0``.
        log_path: a JSON-lines metrics file (its folder is created).
        progress: show a tqdm progress bar.
        seed: ``torch.manual_seed`` at the start of a fresh run.
        routing_replay: ``None``, ``"R2"`` or ``"R3"`` (mixture-of-experts policies, docs/moe.md).
        dynamic_sampling: DAPO's dynamic sampling (Yu et al., arXiv 2503.14476, §3.2): drop the
            groups whose valid rewards are all equal (their group-relative advantage is 0) and
            sample more prompts until the step holds as many groups with varied rewards as the
            first draw had prompts; surplus groups are cut off. See :func:`train`.
        max_sampling_rounds: sampling rounds per step at most with ``dynamic_sampling`` (the first
            draw included); when they are spent the step trains on the groups it has (fewer
            than asked, possibly none). ``>= 1``.
    """

    steps: int
    minibatches: int = 4
    epochs: int = 1
    temperature: float = 1.0
    max_grad_norm: float | None = 1.0
    old_from_rollout: bool = False
    accuracy_key: str | tuple[str, ...] | None = "rewards"
    accuracy_threshold: float | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    log_path: Path | None = None
    progress: bool = True
    seed: int = 0
    routing_replay: Literal["R2", "R3"] | None = None
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 10

    def __post_init__(self) -> None:
        _check_config(self)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_config(c: RLConfig) -> None:
    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            value = getattr(c, name)
            raise ValueError(f"RLConfig: {name} must be {expected}, got {value!r} ({type(value).__name__})")

    need(_is_int(c.steps) and c.steps >= 0, "steps", "an int >= 0")
    need(_is_int(c.minibatches) and c.minibatches >= 1, "minibatches", "an int >= 1")
    need(_is_int(c.epochs) and c.epochs >= 1, "epochs", "an int >= 1")
    need(_is_real(c.temperature) and c.temperature > 0, "temperature", "a finite number > 0")
    need(
        c.max_grad_norm is None or (_is_real(c.max_grad_norm) and c.max_grad_norm > 0),
        "max_grad_norm",
        "None or a finite number > 0",
    )
    need(isinstance(c.old_from_rollout, bool), "old_from_rollout", "a bool")
    need(
        c.accuracy_key is None
        or isinstance(c.accuracy_key, str)
        or (isinstance(c.accuracy_key, tuple) and all(isinstance(k, str) for k in c.accuracy_key)),
        "accuracy_key",
        "None, a str or a tuple of str",
    )
    need(c.accuracy_threshold is None or _is_real(c.accuracy_threshold), "accuracy_threshold",
         "None or a finite number")  # fmt: skip
    need(c.checkpoint_dir is None or isinstance(c.checkpoint_dir, (str, Path)), "checkpoint_dir",
         "None or a path")  # fmt: skip
    need(_is_int(c.checkpoint_every) and c.checkpoint_every >= 0, "checkpoint_every", "an int >= 0")
    need(c.log_path is None or isinstance(c.log_path, (str, Path)), "log_path", "None or a path")
    need(isinstance(c.progress, bool), "progress", "a bool")
    need(_is_int(c.seed), "seed", "an int")
    need(c.routing_replay in (None, "R2", "R3"), "routing_replay", "None, 'R2' or 'R3'")
    need(isinstance(c.dynamic_sampling, bool), "dynamic_sampling", "a bool")
    need(_is_int(c.max_sampling_rounds) and c.max_sampling_rounds >= 1, "max_sampling_rounds", "an int >= 1")


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


def _device_of(module: torch.nn.Module) -> torch.device:
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: Any) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints written before the CUDA state was kept
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sampler_state(sampler: Sampler) -> Any:
    return sampler.state_dict() if hasattr(sampler, "state_dict") else None  # type: ignore[attr-defined]


_FINITE = ("policy", "optimizer")


def _save(
    path: Path,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LRScheduler | None,
    recipe_name: str,
    step: int,
    history: list,
    sampler_state: Any,
    rng: dict[str, Any],
) -> None:
    """Checkpoint of the end of ``step``: ``sampler_state`` and ``rng`` were taken then."""
    save_checkpoint(
        path,
        {
            "policy": policy.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "sampler": sampler_state,
            "recipe": recipe_name,
            "step": step,
            "history": history,
            "rng": rng,
        },
        step=step,
        finite=_FINITE,
    )


def _load(
    path: Path,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LRScheduler | None,
    sampler: Sampler,
    recipe_name: str,
    steps: int,
) -> tuple[int, list]:
    ckpt = load_checkpoint(path, finite=_FINITE)
    where = f"train: checkpoint in {path}"
    saved_recipe = ckpt.get("recipe")
    if saved_recipe is not None and saved_recipe != recipe_name:
        raise ValueError(f"{where} is of recipe {saved_recipe!r}, but train() was given {recipe_name!r}")
    step = int(ckpt["step"])
    if steps < step:
        raise ValueError(
            f"{where} is at step {step}, beyond RLConfig.steps = {steps}; set steps >= {step} to "
            "continue, or use another checkpoint_dir"
        )
    saved_scheduler = ckpt.get("lr_scheduler")
    if (lr_scheduler is None) != (saved_scheduler is None):
        has, given = ("has", "was not given one") if lr_scheduler is None else ("has no", "was given one")
        raise ValueError(f"{where} {has} lr_scheduler state, but train() {given}")
    policy.load_state_dict(ckpt["policy"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(saved_scheduler)
    if ckpt.get("sampler") is not None and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(ckpt["sampler"])  # type: ignore[attr-defined]
    _set_rng_state(ckpt["rng"])
    return step, list(ckpt["history"])


@dataclass(frozen=True)
class _RoutingModes:
    """The Scorers' routing options for one run (all None for a dense policy), and the one
    RoutingReplay of the policy they share."""

    old: Literal["record", "replay"] | None
    policy: Literal["replay", "compare"] | None
    needs_rollout_routing: bool
    replay: RoutingReplay | None = None


def _routing_modes(policy: torch.nn.Module, config: RLConfig) -> _RoutingModes:
    mode = config.routing_replay
    if mode not in (None, "R2", "R3"):
        raise ValueError(f"RLConfig.routing_replay must be None, 'R2' or 'R3', got {mode!r}")
    try:
        replay = RoutingReplay(policy)
    except ValueError as err:
        if mode is not None:
            raise ValueError(
                f"RLConfig.routing_replay={mode!r} needs a mixture-of-experts policy: {err}"
            ) from None
        return _RoutingModes(None, None, False)
    if mode == "R3":
        return _RoutingModes(None if config.old_from_rollout else "replay", "replay", True, replay)
    if config.old_from_rollout:
        if mode == "R2":
            raise ValueError(
                "RLConfig.routing_replay='R2' records the routing in the π_old forward, but "
                "old_from_rollout=True skips that forward; use 'R3' (rollout routing) or "
                "old_from_rollout=False"
            )
        # No π_old forward to record in: measure against the sampler's routing when it has one.
        return _RoutingModes(None, "compare", False, replay)
    return _RoutingModes("record", "replay" if mode == "R2" else "compare", False, replay)


def _check_start(
    policy: torch.nn.Module,
    sampler: Sampler,
    recipe: Recipe,
    config: RLConfig,
    samples_per_prompt: object,
    reference: torch.nn.Module | None,
) -> tuple[bool, NestedKey]:
    """The checks ``train`` makes before its first step; returns (needs entropy, reference key)."""
    _check_config(config)
    if not _is_int(samples_per_prompt) or samples_per_prompt < 1:  # type: ignore[operator]
        raise ValueError(f"train: samples_per_prompt must be an int >= 1, got {samples_per_prompt!r}")
    n = getattr(sampler, "n", None)
    if _is_int(n) and n != samples_per_prompt:
        raise ValueError(
            f"train: samples_per_prompt={samples_per_prompt} but the sampler draws n={n} samples per "
            "prompt; they must be equal (the groups of the advantage are samples_per_prompt rows)"
        )
    tau = getattr(sampler, "temperature", None)
    if _is_real(tau) and float(tau) != float(config.temperature):  # type: ignore[arg-type]
        raise ValueError(
            f"train: the sampler's temperature is {tau} but RLConfig.temperature is "
            f"{config.temperature}; they must be equal (π_old and π_θ must score the distribution "
            "the samples were drawn from)"
        )
    objective = getattr(recipe.loss, "objective", None)
    kl_coef = float(getattr(objective, "kl_coef", 0.0) or 0.0)
    entropy_coef = float(getattr(objective, "entropy_coef", 0.0) or 0.0)
    ref_key = key_of(recipe.loss, "ref_log_probs")
    if kl_coef > 0 and reference is None:
        raise ValueError(
            f"train: recipe {recipe.name!r} has a KL term (kl_coef={kl_coef}), which needs "
            f"{ref_key!r}: pass reference= (a frozen copy of the initial policy)"
        )
    if reference is not None and _device_of(reference) != _device_of(policy):
        raise ValueError(
            f"train: reference is on {_device_of(reference)} but the policy is on {_device_of(policy)}; "
            "put both on the same device"
        )
    entropy_key = key_of(recipe.loss, "entropy")
    needs_entropy = entropy_coef != 0 or entropy_key in getattr(recipe.loss, "required_keys", ())
    return needs_entropy, ref_key


def _accuracy(values: torch.Tensor, threshold: float | None) -> float | None:
    """Fraction of ``values`` >= ``threshold``; with ``None``, of 1s when all are 0 or 1, else None."""
    if values.numel() == 0:
        return float("nan")
    if threshold is None:
        if not bool(((values == 0) | (values == 1)).all()):
            return None
        return float((values == 1).float().mean())
    return float((values >= threshold).float().mean())


def _filter_groups(
    group_filter: Callable[[TensorDictBase], TensorDictBase], td: TensorDictBase
) -> TensorDictBase:
    """Apply a user's group filter and check that it kept whole groups and every key."""
    out = group_filter(td)
    if not isinstance(out, TensorDictBase) or out.batch_dims != 1 or out.shape[0] > td.shape[0]:
        got = (
            f"a TensorDict of batch size {list(out.shape)}"
            if isinstance(out, TensorDictBase)
            else type(out).__name__
        )
        raise ValueError(
            f"train: group_filter must return a TensorDict of batch size [M] with M <= {td.shape[0]} "
            f"(a subset of the rollout's rows), got {got}"
        )
    missing = sorted(str(k) for k in set(td.keys()) - set(out.keys()))
    if missing:
        raise ValueError(f"train: group_filter dropped the keys {missing}; keep every key, drop rows")
    if out.shape[0] and "group_ids" in td.keys():
        before = torch.unique(td["group_ids"], return_counts=True)
        kept, kept_counts = torch.unique(out["group_ids"], return_counts=True)
        full = dict(zip(before[0].tolist(), before[1].tolist(), strict=True))
        partial = [g for g, c in zip(kept.tolist(), kept_counts.tolist(), strict=True) if full.get(g) != c]
        if partial:
            raise ValueError(
                f"train: group_filter must keep or drop whole groups; groups {partial[:8]} were kept in part "
                "(the advantages are computed over whole groups)"
            )
    return out


def _varied_groups(td: TensorDictBase, group_size: int) -> torch.Tensor:
    """[P] bool: the groups (``group_size`` consecutive rows) whose valid rewards hold at least two
    different values. A group with fewer than two valid rows, or a NaN among its valid rewards,
    is not varied."""
    n = td.shape[0]
    rewards = td["rewards"]
    if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (n,):
        got = list(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"train: dynamic sampling needs 'rewards' of shape [N] = [{n}], got {got}")
    r = rewards.detach().to(torch.float64).view(-1, group_size)
    valid = td["reward_valid"].view(-1, group_size)
    hi = torch.where(valid, r, -math.inf).amax(-1)
    lo = torch.where(valid, r, math.inf).amin(-1)
    return hi > lo


def _cat_rows(parts: list[TensorDictBase]) -> TensorDictBase:
    """Stack rollouts row-wise; token tensors ([N, T, ...]) of different widths are right-padded
    with 0 / False (masked out: every consumer reads them through their masks)."""
    if len(parts) == 1:
        return parts[0]
    keys = set(parts[0].keys(include_nested=True, leaves_only=True))
    for part in parts[1:]:
        other = set(part.keys(include_nested=True, leaves_only=True))
        if other != keys:
            raise ValueError(
                "train: dynamic sampling: the rollouts of one step must have the same keys; a later round "
                f"differs by {sorted(map(str, keys ^ other))}"
            )
    for key in keys:
        values = [part.get(key) for part in parts]
        if not all(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in values):
            continue
        width = max(v.shape[1] for v in values)
        for part, v in zip(parts, values, strict=True):
            if v.shape[1] < width:
                padded = v.new_zeros((v.shape[0], width, *v.shape[2:]))
                padded[:, : v.shape[1]] = v
                part.set(key, padded)
    return torch.cat(parts, 0)


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
    logger: MetricsLogger | None = None,
    group_filter: Callable[[TensorDictBase], TensorDictBase] | None = None,
    more_prompts: Callable[[int, int], PromptBatch] | None = None,
) -> list[dict[str, float]]:
    """Run ``config.steps`` RL steps; return the per-step metrics (also resumed history).

    ``on_step(step, metrics)`` may return extra metrics (e.g. a held-out evaluation) to log.
    ``reference`` is scored into ``ref_log_probs`` when the recipe uses a KL term (then it is
    required). ``lr_scheduler`` (any ``torch.optim.lr_scheduler``) is stepped once per RL step;
    the learning rate used by the step is logged as ``lr``. ``logger`` (any object with
    ``start``/``log``/``close``, :mod:`gspo_components.rollout.metrics_log`) receives each step's
    metrics, besides the JSON-lines file of ``config.log_path``.

    ``group_filter(td)``, when given, runs between the rewards and the advantages on the step's
    rollout (rewards, ``reward_valid`` and masks set) and returns the rows to train on: a
    TensorDict of batch size [M] holding whole groups (every row of a kept ``group_ids`` value)
    and every key it was given; e.g. DAPO's dynamic sampling drops the groups whose rewards are
    all equal. ``reward``, ``reward_failures`` and ``accuracy`` describe the whole sample;
    ``filtered_samples`` counts the rows dropped. A step whose filter keeps no row makes no update.

    ``config.dynamic_sampling`` is DAPO's dynamic sampling (arXiv 2503.14476): the groups whose valid
    rewards are all equal (or that have fewer than two valid samples) are dropped, and prompts are
    drawn again, ``more_prompts(step, round)`` for round 1, 2, ... (default: ``next_prompts(step)``
    again, i.e. new samples of the same prompts), until the step holds as many groups with varied
    rewards as ``next_prompts(step)`` had prompts, or ``config.max_sampling_rounds`` rounds are spent;
    the first groups in sampling order are kept and the rest cut off, so the batch never exceeds
    its size. The step then trains on the groups it has (fewer when the rounds ran out, none: no
    update). It logs ``sampling_rounds`` (rounds drawn), ``filtered_groups`` (groups dropped for equal
    rewards) and ``kept_groups`` (groups trained on); ``reward``, ``reward_failures``, ``accuracy``
    and ``response_length`` then describe every sample of every round. ``group_filter`` runs after
    it, on the kept groups.

    The rollout is moved to the policy's device. The reward function must write ``rewards``
    [N]; ``reward_valid`` [N] bool is optional (all valid when absent). Float or integer 0/1
    masks from the sampler are accepted.
    """
    needs_entropy, ref_key = _check_start(policy, sampler, recipe, config, samples_per_prompt, reference)
    if more_prompts is not None and not config.dynamic_sampling:
        raise ValueError(
            "train: more_prompts is only used with RLConfig.dynamic_sampling=True, which is False"
        )
    loggers: list[MetricsLogger] = []
    if config.log_path is not None:
        loggers.append(JSONLinesLogger(config.log_path))
    if logger is not None:
        loggers.append(check_logger("train", "logger", logger))
    device = _device_of(policy)
    routing = _routing_modes(policy, config)
    entropy_key = key_of(recipe.loss, "entropy")
    entropy_out = {"entropy": entropy_key} if needs_entropy else None
    scorer = Scorer(
        policy,
        temperature=config.temperature,
        routing=routing.policy,
        routing_replay=routing.replay,
        return_entropy=needs_entropy,
        out_keys=entropy_out,
    )
    plain_scorer = (
        Scorer(policy, temperature=config.temperature, return_entropy=needs_entropy, out_keys=entropy_out)
        if routing.policy == "compare"
        else scorer
    )
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
        policy,
        temperature=config.temperature,
        out_key="old_log_probs",
        grad=False,
        routing=routing.old,
        routing_replay=routing.replay,
    )
    ref_scorer = (
        Scorer(reference, temperature=config.temperature, out_key=ref_key, grad=False)
        if reference is not None
        else None
    )
    start, history = 0, []
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    if ckpt_dir is not None and has_checkpoint(ckpt_dir):
        start, history = _load(ckpt_dir, policy, optimizer, lr_scheduler, sampler, recipe.name, config.steps)
        sampler.sync_weights(policy)
    if start == 0:
        torch.manual_seed(config.seed)  # on resume, the checkpoint's RNG state continues instead
    # The state of the end of the last completed step, for a save after it (KeyboardInterrupt).
    saved_step, done_step = start, start
    done_rng, done_sampler = _rng_state(), _sampler_state(sampler)
    updating = False  # True from the first optimizer step of a step until that step completes

    def save() -> None:
        nonlocal saved_step
        if ckpt_dir is not None and done_step > saved_step:
            _save(ckpt_dir, policy, optimizer, lr_scheduler, recipe.name, done_step, history,
                  done_sampler, done_rng)  # fmt: skip
            saved_step = done_step

    def draw(batch: PromptBatch) -> tuple[TensorDictBase, float]:
        """Sample, attach the prompt fields, score the rewards; the rollout on the policy's device."""
        t = time.perf_counter()
        td = sampler(batch.prompts)
        seconds = time.perf_counter() - t
        expected = len(batch.prompts) * samples_per_prompt
        if td.batch_dims != 1 or td.shape[0] != expected:
            raise ValueError(
                f"train: the sampler returned a batch of shape {list(td.shape)} for "
                f"{len(batch.prompts)} prompts; with samples_per_prompt={samples_per_prompt} it must "
                f"be [{expected}] (prompt-major: the samples of a prompt are consecutive rows)"
            )
        _attach(td, batch.fields, samples_per_prompt)
        td = reward_fn(td)
        if "rewards" not in td.keys():
            raise ValueError(f"train: the reward function {type(reward_fn).__name__} wrote no 'rewards'")
        if "reward_valid" in td.keys():
            valid = _check_valid(td["reward_valid"], "reward_valid", expected)
        else:
            valid = torch.ones(expected, dtype=torch.bool, device=td["rewards"].device)
        td = td.to(device)
        valid = valid.to(device)
        td["reward_valid"] = valid
        td["response_mask"] = check_mask("train", "response_mask", td["response_mask"]) & valid.unsqueeze(-1)
        if "prompt_mask" in td.keys():
            td["prompt_mask"] = check_mask("train", "prompt_mask", td["prompt_mask"])
        return td, seconds

    def dynamic_sampling(
        step: int, batch: PromptBatch, td: TensorDictBase, seconds: float
    ) -> tuple[TensorDictBase, TensorDictBase, float, dict[str, float]]:
        """DAPO's dynamic sampling: (kept groups, every sample, sampling seconds, metrics)."""
        target, group = len(batch.prompts), samples_per_prompt
        rounds, filtered, kept, everything = 1, 0, [], [td]
        while True:
            varied = _varied_groups(td, group)
            filtered += int((~varied).sum())
            rows = varied.repeat_interleave(group).nonzero().squeeze(-1)
            if rows.numel():
                kept.append(td[rows])
            have = sum(part.shape[0] for part in kept) // group
            if have >= target or rounds >= config.max_sampling_rounds:
                break
            more = more_prompts(step, rounds) if more_prompts is not None else next_prompts(step)
            td, more_seconds = draw(more)
            seconds += more_seconds
            everything.append(td)
            rounds += 1
        kept_td = _cat_rows(kept)[: target * group] if kept else everything[0][:0]
        if "group_ids" in kept_td.keys():  # rounds number their groups from 0 each: renumber
            ids = torch.arange(kept_td.shape[0] // group, device=kept_td.device).repeat_interleave(group)
            kept_td["group_ids"] = ids.to(kept_td["group_ids"].dtype)
        metrics = {
            "sampling_rounds": float(rounds),
            "filtered_groups": float(filtered),
            "kept_groups": float(kept_td.shape[0] // group),
        }
        return kept_td, _cat_rows(everything), seconds, metrics

    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=recipe.name, dynamic_ncols=True)
    started: list[MetricsLogger] = []
    try:
        for lg in loggers:
            lg.start(start)
            started.append(lg)
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            batch = next_prompts(step)
            td, t_sample = draw(batch)
            sampled = td
            if config.dynamic_sampling:
                td, sampled, t_sample, sampling = dynamic_sampling(step, batch, td, t_sample)
            valid = sampled["reward_valid"]
            collected = td
            if group_filter is not None:
                td = _filter_groups(group_filter, td)
            has_rows = td.shape[0] > 0
            if has_rows:
                td = recipe.advantage(td)
            if routing.needs_rollout_routing and "routed_experts" not in td.keys():
                raise ValueError(
                    f"train: routing_replay={config.routing_replay!r} needs the sampler to return "
                    "'routed_experts' (TransformersSampler(..., return_routed_experts=True), or "
                    "VLLMSampler(..., return_routed_experts=True) on a GPU build of vLLM)"
                )
            if not has_rows:
                pass
            elif config.old_from_rollout:
                td["old_log_probs"] = td["rollout_log_probs"]
            else:
                td = old_scorer(td)
            if ref_scorer is not None and has_rows:
                td = ref_scorer(td)
            outputs: list[TensorDictBase] = []
            routing_values: list[dict[str, torch.Tensor]] = []
            grad_norms: list[float] = []
            skipped = 0
            # Without a routing to compare against (no π_old record, no rollout routing): no metrics.
            step_scorer = (
                scorer if routing.policy != "compare" or "routed_experts" in td.keys() else plain_scorer
            )
            lr = float(optimizer.param_groups[0]["lr"])
            policy.train()
            for _ in range(config.epochs if has_rows else 0):
                order = torch.randperm(td.shape[0])
                for chunk in order.chunk(config.minibatches):
                    mb = td[chunk.to(device)]
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
                    outputs.append(out.detach())
                    optimizer.zero_grad(set_to_none=True)
                    loss = out[loss_key]
                    if not bool(torch.isfinite(loss.detach()).all()):
                        skipped += 1  # no backward: nothing of this minibatch reaches the weights
                        continue
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        policy.parameters(),
                        config.max_grad_norm if config.max_grad_norm is not None else float("inf"),
                    )
                    grad_norms.append(float(grad_norm))
                    if not math.isfinite(float(grad_norm)):
                        optimizer.zero_grad(set_to_none=True)
                        skipped += 1
                        continue
                    updating = True
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if lr_scheduler is not None:
                lr_scheduler.step()
            policy.eval()
            sampler.sync_weights(policy)
            elapsed = time.perf_counter() - t0
            rewards = sampled["rewards"].float()
            tokens = int(td["response_mask"].sum())
            metrics: dict[str, float] = {
                "step": float(step + 1),
                "reward": float(rewards[valid].mean()) if bool(valid.any()) else float("nan"),
                "reward_failures": float((~valid).sum()),
                "response_length": float(sampled["response_mask"].sum(-1).float().mean()),
                "tokens_per_s": tokens / max(elapsed, 1e-9),
                "sample_tokens_per_s": tokens / max(t_sample, 1e-9),
                "seconds": elapsed,
                "lr": lr,
                "skipped_updates": float(skipped),
            }
            if group_filter is not None:
                metrics["filtered_samples"] = float(collected.shape[0] - td.shape[0])
            if config.dynamic_sampling:
                metrics.update(sampling)
            if config.accuracy_key is not None:
                acc = _accuracy(sampled.get(config.accuracy_key).float()[valid], config.accuracy_threshold)
                if acc is not None:
                    metrics["accuracy"] = acc
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
            done_step, updating = step + 1, False
            done_rng, done_sampler = _rng_state(), _sampler_state(sampler)
            for lg in loggers:
                lg.log(step + 1, metrics)
            if bar is not None:
                shown = {
                    k: f"{metrics[k]:.3g}" for k in ("reward", "accuracy", "clip_fraction") if k in metrics
                }
                bar.set_postfix(shown)
                bar.update(1)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                save()
        save()  # the end of the run
    except KeyboardInterrupt:
        if ckpt_dir is not None and done_step > saved_step:
            if updating:
                kept = f"the checkpoint of step {saved_step} is kept" if saved_step else "none is written"
                warnings.warn(
                    f"train: interrupted during step {done_step + 1} after it had updated the weights; "
                    f"they match no completed step, so no checkpoint of them is saved ({kept})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                save()
        raise
    finally:
        if bar is not None:
            bar.close()
        for lg in started:
            lg.close()
    return history


def _check_valid(values: object, name: str, n: int) -> torch.Tensor:
    """A [n] bool (or 0/1) tensor as bool."""
    if not isinstance(values, torch.Tensor) or values.shape != (n,):
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"train: {name!r} must be a tensor of shape [{n}], got {got}")
    return check_mask("train", name, values.unsqueeze(-1)).squeeze(-1)
