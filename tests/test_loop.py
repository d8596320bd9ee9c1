"""The reference loop (:func:`gspo_components.rollout.loop.train`) end to end, on the CPU.

A tiny Qwen3 (1 layer, hidden 64, head_dim 32) over the character alphabet ``0123456789+=`` is
built in a temporary folder and warmed up with a short supervised run on ``a+b=`` → ``c<eos>``
(one-digit operands), so that it answers right about one time in five: groups then hold both
rewards, advantages are non-zero and an RL step really moves the weights. Responses are sampled by
the real :class:`TransformersSampler` and scored by the real math-verify
(:class:`MathAnswerReward`).

What is checked:

- a short run with ``gspo()`` and with ``grpo(kl_coef=0.01)`` and a reference model returns one
  metrics dict per step with the documented names (``kl`` exactly when the recipe has a KL
  term), finite and in range; the policy's weights change (AdamW without weight decay, so only a
  gradient can move them) and the reference's do not; the JSON-lines log holds one line per
  step, equal to the returned metrics;
- checkpoint / resume: 3 steps in one go against 2 steps, then a fresh policy and optimizer
  resuming from the checkpoint folder to step 3: identical final weights, optimizer state and
  history (timings aside), with the global RNG disturbed in between as a new process would have
  it; both with a sampler on the global RNG (built anew on resume) and with a seeded sampler kept
  across the restart;
- a reward function that fails on some samples: the loop goes on, ``reward_failures`` counts
  them, and those rows reach the loss with their ``response_mask`` cleared and Â = 0, so that
  each minibatch's loss equals the loss of the same minibatch without them.

The models are tiny, so the module runs torch on one thread: on a shared 2-core machine two
threads spin against each other and every step takes several times longer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict import TensorDictBase

import gspo_components as gc
from gspo_components.loss.recipes import Recipe
from gspo_components.rollout.loop import PromptBatch, RLConfig, train
from gspo_components.rollout.rewards import MathAnswerReward
from gspo_components.rollout.sampling import TransformersSampler
from gspo_components.testing.tiny import build_char_tokenizer, build_tiny_qwen3, supervised_step

ALPHABET = "0123456789+="
PAIRS = [(a, b) for a in range(1, 10) for b in range(1, 10)]
PROMPTS_PER_STEP = 4
GROUP = 4
MAX_TOKENS = 3  # two answer digits and <eos>
WARMUP_STEPS = 150
TIMING_KEYS = {"tokens_per_s", "sample_tokens_per_s", "seconds"}
DOCUMENTED = {
    "step",
    "lr",
    "reward",
    "accuracy",
    "reward_failures",
    "clip_fraction",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "tokens_per_s",
    "loss",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A warmed-up tiny Qwen3 and its tokenizer, saved together."""
    path = tmp_path_factory.mktemp("tiny_adder")
    tok = build_char_tokenizer(ALPHABET, path)
    model = build_tiny_qwen3(
        len(tok),
        tokenizer=tok,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        max_position_embeddings=32,
        seed=0,
    )
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(WARMUP_STEPS):
        supervised_step(model, tok, optimizer, [(prompt_of(p), answer_of(p)) for p in rng.sample(PAIRS, 32)])
    model.eval()
    model.save_pretrained(str(path))
    return path


def prompt_of(pair: tuple[int, int]) -> str:
    return f"{pair[0]}+{pair[1]}="


def answer_of(pair: tuple[int, int]) -> str:
    return str(pair[0] + pair[1])


def next_prompts(step: int) -> PromptBatch:
    """The prompts of a step depend on the step only (so a resumed run sees the same ones)."""
    batch = random.Random(1000 + step).sample(PAIRS, PROMPTS_PER_STEP)
    return PromptBatch([prompt_of(p) for p in batch], {"answer": [answer_of(p) for p in batch]})


def load_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def policy_sampler(policy: torch.nn.Module, model_dir: Path, seed: int | None) -> TransformersSampler:
    """A sampler that samples from the policy object itself (sync_weights is then a no-op)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return TransformersSampler(policy, n=GROUP, max_tokens=MAX_TOKENS, seed=seed, tokenizer=tokenizer)


def make_optimizer(policy: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)


def config(steps: int, **kwargs: Any) -> RLConfig:
    return RLConfig(steps=steps, minibatches=2, epochs=1, progress=False, **kwargs)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def without_timings(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def as_logged(metrics: dict[str, float]) -> dict[str, Any]:
    """A metrics dict as the JSON-lines log stores it (NaN as null)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# a short run


@pytest.mark.parametrize("recipe_name", ["gspo", "grpo_kl"])
def test_short_run_metrics_and_update(model_dir: Path, tmp_path: Path, recipe_name: str) -> None:
    steps = 3
    torch.manual_seed(0)
    policy = load_model(model_dir)
    reference = None
    recipe = gc.gspo()
    if recipe_name == "grpo_kl":
        recipe = gc.grpo(kl_coef=0.01)
        reference = load_model(model_dir)
        reference.requires_grad_(False)
    before = snapshot(policy)
    ref_before = snapshot(reference) if reference is not None else None
    log = tmp_path / "metrics.jsonl"
    history = train(
        policy,
        policy_sampler(policy, model_dir, seed=0),
        MathAnswerReward(),
        recipe,
        make_optimizer(policy),
        next_prompts,
        config(steps, log_path=log),
        samples_per_prompt=GROUP,
        reference=reference,
    )

    assert len(history) == steps
    assert [m["step"] for m in history] == [1.0, 2.0, 3.0]
    expected_names = DOCUMENTED | ({"kl"} if reference is not None else set())
    for m in history:
        assert expected_names <= set(m), sorted(expected_names - set(m))
        if reference is None:
            assert "kl" not in m
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["clip_fraction"] <= 1.0
        assert m["ratio_min"] <= m["ratio_mean"] <= m["ratio_max"]
        assert m["ratio_min"] > 0.0
        assert m["reward_failures"] == 0.0
        assert m["tokens_per_s"] > 0.0
        assert 0.0 <= m["reward"] <= 1.0
        if reference is not None:
            assert m["kl"] >= 0.0  # k3 is non-negative
    # A precondition of a meaningful update: some samples right, some wrong.
    assert any(0.0 < m["accuracy"] < 1.0 for m in history), [m["accuracy"] for m in history]
    if reference is not None:
        assert history[-1]["kl"] > 0.0  # the policy has left the reference

    after = policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no weight of the policy changed"
    if reference is not None and ref_before is not None:
        assert all(torch.equal(ref_before[k], v) for k, v in reference.state_dict().items())

    # JSON lines: one line per step, equal to the returned metrics.
    assert read_jsonl(log) == [as_logged(m) for m in history]


def test_renamed_objective_outputs_are_trained_and_logged(model_dir: Path) -> None:
    """An Objective whose outputs are renamed (e.g. to fit a trainer's key schema) still drives
    the loop: its loss is back-propagated and its metrics are logged under their canonical
    names, equal to those of the same recipe with the default names."""
    renamed = {"loss": "objective_loss", "clip_fraction": ("metrics", "clip"), "ratio_max": "rmax"}
    base = gc.gspo()
    recipe = Recipe(
        "gspo-renamed",
        base.advantage,
        gc.PolicyLoss(gc.SequenceLogRatio(), gc.PPOClip(3e-4, 4e-4), gc.Objective(out_keys=renamed)),
    )
    histories, weights = [], []
    for r in (base, recipe):
        torch.manual_seed(0)
        policy = load_model(model_dir)
        sampler = policy_sampler(policy, model_dir, seed=0)
        history = train(
            policy, sampler, MathAnswerReward(), r, make_optimizer(policy), next_prompts, config(2),
            samples_per_prompt=GROUP,
        )  # fmt: skip
        histories.append(without_timings(history))
        weights.append(snapshot(policy))
    assert {"loss", "clip_fraction", "ratio_max"} <= set(histories[1][0])
    assert histories[1] == histories[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --------------------------------------------------------------------------------------------
# checkpoint / resume


def run_resumable(
    model_dir: Path,
    ckpt: Path,
    steps: int,
    sampler: TransformersSampler | None,
    log: Path,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[dict[str, float]]]:
    """A fresh policy, optimizer and decaying learning-rate schedule (and, without ``sampler``, a
    fresh global-RNG sampler on the policy), trained with ``gspo()`` to ``steps``, checkpointing
    every step into ``ckpt``."""
    policy = load_model(model_dir)
    optimizer = make_optimizer(policy)
    # The rate changes every step, so a resume that lost the schedule's position would differ.
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))
    if sampler is None:
        sampler = policy_sampler(policy, model_dir, seed=None)
    history = train(
        policy,
        sampler,
        MathAnswerReward(),
        gc.gspo(),
        optimizer,
        next_prompts,
        config(steps, checkpoint_dir=ckpt, checkpoint_every=1, log_path=log),
        samples_per_prompt=GROUP,
        lr_scheduler=lr_scheduler,
    )
    return policy, optimizer, history


def path_sampler(model_dir: Path) -> TransformersSampler:
    """A seeded sampler with a model of its own, kept in step by ``sync_weights``."""
    return TransformersSampler(str(model_dir), n=GROUP, max_tokens=MAX_TOKENS, seed=0, dtype="float32")


def checkpoint_step(folder: Path) -> int:
    """The step of the checkpoint in ``folder``, read from the state file its manifest names."""
    manifest = json.loads((folder / "checkpoint.json").read_text())
    return int(torch.load(folder / manifest["file"], weights_only=True)["step"])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return [v for i in sorted(state) for _, v in sorted(state[i].items()) if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize(
    "sampling", ["global-rng-sampler-rebuilt", "seeded-sampler-kept", "seeded-sampler-rebuilt"]
)
def test_resume_from_checkpoint_is_identical(model_dir: Path, tmp_path: Path, sampling: str) -> None:
    seeded = sampling.startswith("seeded")

    # 3 steps in one go.
    sampler_a = path_sampler(model_dir) if seeded else None
    policy_a, opt_a, history_a = run_resumable(model_dir, tmp_path / "a", 3, sampler_a, tmp_path / "a.jsonl")

    # 2 steps, then a fresh policy and optimizer resume from the checkpoint to step 3.
    sampler_b = path_sampler(model_dir) if seeded else None
    _, _, history_b2 = run_resumable(model_dir, tmp_path / "b", 2, sampler_b, tmp_path / "b.jsonl")
    assert len(history_b2) == 2
    assert checkpoint_step(tmp_path / "b") == 2
    torch.manual_seed(987654321)  # a new process: whatever global RNG state; the checkpoint restores it
    if sampling == "seeded-sampler-rebuilt":
        # ... and a new sampler with the same seed, whose seed generator starts over; the
        # checkpoint's sampler state puts it where the interrupted run left it.
        sampler_b = path_sampler(model_dir)
    policy_b, opt_b, history_b = run_resumable(model_dir, tmp_path / "b", 3, sampler_b, tmp_path / "b.jsonl")

    assert len(history_a) == len(history_b) == 3
    assert checkpoint_step(tmp_path / "a") == 3
    assert checkpoint_step(tmp_path / "b") == 3
    # The resumed history starts with the checkpoint's two steps.
    assert history_b[:2] == history_b2
    # One JSON line per step, across the restart too.
    assert [m["step"] for m in read_jsonl(tmp_path / "a.jsonl")] == [1, 2, 3]
    assert [m["step"] for m in read_jsonl(tmp_path / "b.jsonl")] == [1, 2, 3]

    assert without_timings(history_b) == without_timings(history_a), "the resumed run's metrics differ"
    base_lr = opt_a.defaults["lr"]
    assert [m["lr"] for m in history_a] == pytest.approx([base_lr, base_lr / 2, base_lr / 3])
    weights_a, weights_b = policy_a.state_dict(), policy_b.state_dict()
    differ = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not differ, f"final weights differ after resume: {differ}"
    moments_a, moments_b = optimizer_tensors(opt_a), optimizer_tensors(opt_b)
    assert len(moments_a) == len(moments_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(moments_a, moments_b, strict=True))


def test_sampler_state_round_trip_and_mismatch(model_dir: Path) -> None:
    seeded, other, unseeded = path_sampler(model_dir), path_sampler(model_dir), load_unseeded(model_dir)
    seeded(["1+2="])  # advance the generator past its initial state
    other.load_state_dict(seeded.state_dict())
    assert torch.equal(other.state_dict()["rng"], seeded.state_dict()["rng"])
    a, b = seeded(["3+4=", "5+6="]), other(["3+4=", "5+6="])
    assert torch.equal(a["response_ids"], b["response_ids"])
    assert unseeded.state_dict() == {"rng": None}
    with pytest.raises(ValueError, match=r"TransformersSampler.load_state_dict: this sampler is seeded"):
        seeded.load_state_dict(unseeded.state_dict())
    with pytest.raises(
        ValueError, match=r"this sampler is unseeded \(seed=None\), but the state is a seeded"
    ):
        unseeded.load_state_dict(seeded.state_dict())
    with pytest.raises(ValueError, match=r"expected a dict with key 'rng'"):
        seeded.load_state_dict({})
    with pytest.raises(ValueError, match=r"'rng' must be a torch.uint8 generator state, got int"):
        seeded.load_state_dict({"rng": 3})


def load_unseeded(model_dir: Path) -> TransformersSampler:
    return TransformersSampler(str(model_dir), n=GROUP, max_tokens=MAX_TOKENS, seed=None, dtype="float32")


# --------------------------------------------------------------------------------------------
# a reward function that fails on some samples


def fails_on(text: str) -> bool:
    """The flaky verifier's trigger: responses that are not exactly two characters."""
    return len(text) != 2


class FlakyMathReward(MathAnswerReward):
    """math-verify, except that it raises on the responses ``fails_on`` picks."""

    def score(self, sample: dict[str, Any]) -> float:
        if fails_on(str(sample["response_text"])):
            raise RuntimeError("verifier crashed")
        return super().score(sample)


class AdvantageSpy(torch.nn.Module):
    """Runs the recipe's advantage estimator and keeps what the whole batch looked like."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[dict[str, Any]] = []

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        td = self.inner(td)
        record = {k: td[k].clone() for k in ("rewards", "reward_valid", "response_mask", "advantages")}
        record["response_text"] = list(td["response_text"])
        self.seen.append(record)
        return td


class LossSpy(torch.nn.Module):
    """Runs the recipe's loss, and also the loss of the same minibatch without the failed rows."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[dict[str, Any]] = []

    def forward(self, mb: TensorDictBase) -> TensorDictBase:
        out = self.inner(mb)
        valid = mb["reward_valid"]
        with torch.no_grad():
            alone = self.inner(mb[valid])
        self.seen.append(
            {
                "valid": valid.clone(),
                "mask": mb["response_mask"].clone(),
                "advantages": mb["advantages"].clone(),
                "loss": float(out["loss"].detach()),
                "loss_without_failed": float(alone["loss"]),
            }
        )
        return out


def test_failing_reward_rows_are_counted_and_left_out_of_the_loss(model_dir: Path) -> None:
    steps = 2
    torch.manual_seed(0)
    policy = load_model(model_dir)
    base = gc.grpo()
    advantage_spy, loss_spy = AdvantageSpy(base.advantage), LossSpy(base.loss)
    recipe = dataclasses.replace(base, advantage=advantage_spy, loss=loss_spy)
    assert isinstance(recipe, Recipe)
    reward = FlakyMathReward()
    with pytest.warns(RuntimeWarning, match="FlakyMathReward"):
        history = train(
            policy,
            policy_sampler(policy, model_dir, seed=0),
            reward,
            recipe,
            make_optimizer(policy),
            next_prompts,
            config(steps),
            samples_per_prompt=GROUP,
        )
    assert len(history) == steps  # the loop went on
    assert len(advantage_spy.seen) == steps

    total_failed = 0
    for metrics, batch in zip(history, advantage_spy.seen, strict=True):
        valid = batch["reward_valid"]
        expected_invalid = [fails_on(t) for t in batch["response_text"]]
        assert (~valid).tolist() == expected_invalid
        assert metrics["reward_failures"] == float((~valid).sum())
        total_failed += int((~valid).sum())
        # Failed rows: mask cleared, Â = 0; the other rows keep their tokens.
        assert not bool(batch["response_mask"][~valid].any())
        assert bool((batch["advantages"][~valid] == 0).all())
        assert bool(batch["response_mask"][valid].any(-1).all())
        # reward and accuracy are over the scored samples only.
        rewards = batch["rewards"][valid]
        assert metrics["reward"] == pytest.approx(float(rewards.mean()))
        assert metrics["accuracy"] == pytest.approx(float((rewards >= 0.5).float().mean()))
    # A precondition of the test: some samples failed, and some were scored.
    assert 0 < total_failed < steps * PROMPTS_PER_STEP * GROUP, total_failed
    assert reward.failures_total == total_failed

    assert loss_spy.seen
    saw_failed_row = False
    for mb in loss_spy.seen:
        failed = ~mb["valid"]
        saw_failed_row |= bool(failed.any())
        assert not bool(mb["mask"][failed].any())
        assert bool((mb["advantages"][failed] == 0).all())
        assert mb["loss"] == pytest.approx(mb["loss_without_failed"], rel=1e-5, abs=1e-7)
    assert saw_failed_row
    assert any(mb["loss"] != 0.0 for mb in loss_spy.seen)


def test_warmup_model_is_a_fair_starting_point(model_dir: Path) -> None:
    """The premise of the module: the warm model answers in the task's format, some right and
    some wrong, so that groups carry a learning signal."""
    from tensordict import NonTensorStack

    policy = load_model(model_dir)
    td = policy_sampler(policy, model_dir, seed=0)(next_prompts(0).prompts)
    td.set("answer", NonTensorStack(*[a for a in next_prompts(0).fields["answer"] for _ in range(GROUP)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        td = MathAnswerReward()(td)
    accuracy = float(td["rewards"].mean())
    assert 0.0 < accuracy < 1.0, accuracy
    assert all(set(t) <= set("0123456789") for t in td["response_text"]), list(td["response_text"])


# --------------------------------------------------------------------------------------------
# issue 13: checkpoints (security, integrity, crashes), resume checks, logs, faults, start checks


class Mkdir:
    """A pickle that creates a directory when unpickled (the attack of a crafted checkpoint)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.mkdir, (self.target,))


def run_steps(
    model_dir: Path,
    steps: int,
    *,
    recipe: Recipe | None = None,
    lr_scheduler: bool = True,
    policy: torch.nn.Module | None = None,
    **cfg: Any,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[dict[str, float]]]:
    """``steps`` of ``gspo()`` (by default) with a fresh policy, optimizer, decaying schedule and
    global-RNG sampler (a resume rebuilds them all, as a new process would)."""
    policy = policy if policy is not None else load_model(model_dir)
    optimizer = make_optimizer(policy)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))
        if lr_scheduler
        else None
    )
    prompts = cfg.pop("next_prompts", next_prompts)
    logger = cfg.pop("logger", None)
    history = train(
        policy,
        policy_sampler(policy, model_dir, seed=None),
        MathAnswerReward(),
        recipe if recipe is not None else gc.gspo(),
        optimizer,
        prompts,
        config(steps, **cfg),
        samples_per_prompt=GROUP,
        lr_scheduler=scheduler,
        logger=logger,
    )
    return policy, optimizer, history


@pytest.fixture(scope="module")
def one_step_checkpoint(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the checkpoint of a 1-step run (checkpoint_every=0: written at the end)."""
    folder = tmp_path_factory.mktemp("ckpt1")
    torch.manual_seed(0)
    run_steps(model_dir, 1, checkpoint_dir=folder)
    assert checkpoint_step(folder) == 1
    return folder


def copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def state_file(folder: Path) -> Path:
    return folder / json.loads((folder / "checkpoint.json").read_text())["file"]


def write_manifest(folder: Path, name: str, step: int) -> None:
    """A manifest naming ``name`` with its true size and SHA-256 (as an attacker could write)."""
    import hashlib

    data = (folder / name).read_bytes()
    manifest = {"format": 1, "file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "step": step}  # fmt: skip
    (folder / "checkpoint.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("layout", ["manifest", "legacy-checkpoint.pt"])
def test_crafted_checkpoint_runs_no_code(model_dir: Path, tmp_path: Path, layout: str) -> None:
    """issue 13: a crafted checkpoint whose __reduce__ calls os.mkdir created its directory on
    resume (torch.load(weights_only=False)). It is now refused, and nothing runs."""
    target = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    name = "step-00000001.pt" if layout == "manifest" else "checkpoint.pt"
    torch.save({"policy": Mkdir(str(target)), "step": 1}, folder / name)
    if layout == "manifest":
        write_manifest(folder, name, 1)
    with pytest.raises(
        ValueError, match=rf"checkpoint {folder / name} cannot be loaded with torch.load\(weights_only=True\)"
    ):
        run_steps(model_dir, 2, checkpoint_dir=folder)
    assert not target.exists(), "the crafted pickle ran code"


def test_corrupt_truncated_empty_and_non_finite_checkpoints_are_refused(
    model_dir: Path, tmp_path: Path, one_step_checkpoint: Path
) -> None:
    # 16 bytes overwritten in the middle of the tensor data: the checksum catches it.
    corrupt = copy_checkpoint(one_step_checkpoint, tmp_path / "corrupt")
    data = bytearray(state_file(corrupt).read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(16)
    state_file(corrupt).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"checkpoint {state_file(corrupt)} is corrupt: its SHA-256 is"):
        run_steps(model_dir, 2, checkpoint_dir=corrupt)

    truncated = copy_checkpoint(one_step_checkpoint, tmp_path / "truncated")
    size = state_file(truncated).stat().st_size
    state_file(truncated).write_bytes(state_file(truncated).read_bytes()[: size // 2])
    with pytest.raises(
        ValueError,
        match=rf"checkpoint {state_file(truncated)} is truncated: {size // 2} bytes, but the manifest records {size}",
    ):
        run_steps(model_dir, 2, checkpoint_dir=truncated)

    empty = copy_checkpoint(one_step_checkpoint, tmp_path / "empty")
    state_file(empty).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"checkpoint {state_file(empty)} is empty \(0 bytes"):
        run_steps(model_dir, 2, checkpoint_dir=empty)

    # NaN weights in a file whose checksum matches (corrupted before it was hashed).
    nan = copy_checkpoint(one_step_checkpoint, tmp_path / "nan")
    state = torch.load(state_file(nan), weights_only=True)
    first = next(iter(state["policy"]))
    state["policy"][first] = torch.full_like(state["policy"][first], float("nan"))
    torch.save(state, state_file(nan))
    write_manifest(nan, state_file(nan).name, 1)
    with pytest.raises(
        ValueError,
        match=rf"checkpoint {state_file(nan)} holds non-finite values in \[\"policy\['{first}'\]\"\]",
    ):
        run_steps(model_dir, 2, checkpoint_dir=nan)

    # A manifest that is not JSON.
    bad_manifest = copy_checkpoint(one_step_checkpoint, tmp_path / "bad_manifest")
    (bad_manifest / "checkpoint.json").write_text('{"file": "step-0')
    with pytest.raises(
        ValueError, match=rf"checkpoint manifest {bad_manifest / 'checkpoint.json'} cannot be read"
    ):
        run_steps(model_dir, 2, checkpoint_dir=bad_manifest)


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(
    model_dir: Path, tmp_path: Path, one_step_checkpoint: Path
) -> None:
    """The save of step 2 fails halfway through writing (the file-size limit is reached, a real
    EFBIG from the kernel, as on a full disk): the step-1 checkpoint still loads, and a resume
    from it runs."""
    import resource
    import signal

    folder = copy_checkpoint(one_step_checkpoint, tmp_path / "ckpt")
    before = state_file(folder).read_bytes()
    limit = len(before) // 2  # the step-2 file has the same size: the write stops halfway
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        # torch reports the failed write as OSError (EFBIG) or, from its zip writer, RuntimeError.
        with pytest.raises((OSError, RuntimeError)):
            run_steps(model_dir, 2, checkpoint_dir=folder)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "step-00000001.pt"]
    assert state_file(folder).read_bytes() == before
    _, _, history = run_steps(model_dir, 2, checkpoint_dir=folder)
    assert [m["step"] for m in history] == [1.0, 2.0]
    assert checkpoint_step(folder) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "step-00000002.pt"]


def test_resume_with_another_setup_is_refused(
    model_dir: Path, tmp_path: Path, one_step_checkpoint: Path
) -> None:
    folder = one_step_checkpoint
    where = rf"train: checkpoint in {folder}"
    with pytest.raises(ValueError, match=rf"{where} is of recipe 'gspo', but train\(\) was given 'grpo'"):
        run_steps(model_dir, 2, checkpoint_dir=folder, recipe=gc.grpo())
    with pytest.raises(ValueError, match=rf"{where} is at step 1, beyond RLConfig.steps = 0"):
        run_steps(model_dir, 0, checkpoint_dir=folder)
    with pytest.raises(ValueError, match=rf"{where} has lr_scheduler state, but train\(\) was not given one"):
        run_steps(model_dir, 2, checkpoint_dir=folder, lr_scheduler=False)
    no_scheduler = copy_checkpoint(folder, tmp_path / "no_scheduler")
    state = torch.load(state_file(no_scheduler), weights_only=True)
    state["lr_scheduler"] = None
    torch.save(state, state_file(no_scheduler))
    write_manifest(no_scheduler, state_file(no_scheduler).name, 1)
    with pytest.raises(
        ValueError,
        match=rf"train: checkpoint in {no_scheduler} has no lr_scheduler state, but train\(\) was given one",
    ):
        run_steps(model_dir, 2, checkpoint_dir=no_scheduler)
    assert checkpoint_step(folder) == 1  # nothing was run or written


class Crash(Exception):
    """A crash of the training process between two checkpoints."""


def crashing_prompts(at: int, exc: type[BaseException]) -> Any:
    def prompts(step: int) -> PromptBatch:
        if step == at:
            raise exc("stopped")
        return next_prompts(step)

    return prompts


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_log_is_cut_back_to_the_checkpoint_on_resume(model_dir: Path, tmp_path: Path) -> None:
    """issue 13: after a crash between checkpoints and a resume, metrics.jsonl held step 3 twice.
    Both loggers (JSON lines in a folder that does not exist yet, and TensorBoard through
    ``logger=``) end with steps 1..4 once each, equal to the returned history."""
    pytest.importorskip("tensorboard", reason="TensorBoardLogger needs the tensorboard package")
    from gspo_components.rollout.metrics_log import TensorBoardLogger

    ckpt, log, tb = tmp_path / "ckpt", tmp_path / "new" / "dir" / "metrics.jsonl", tmp_path / "tb"
    torch.manual_seed(0)
    with pytest.raises(Crash):
        run_steps(model_dir, 4, checkpoint_dir=ckpt, checkpoint_every=2, log_path=log,
                  next_prompts=crashing_prompts(3, Crash), logger=TensorBoardLogger(tb))  # fmt: skip
    assert [m["step"] for m in read_jsonl(log)] == [1, 2, 3]  # step 3 was logged, not checkpointed
    assert checkpoint_step(ckpt) == 2
    _, _, history = run_steps(model_dir, 4, checkpoint_dir=ckpt, checkpoint_every=2, log_path=log,
                              logger=TensorBoardLogger(tb))  # fmt: skip
    assert read_jsonl(log) == [as_logged(m) for m in history]
    assert [m["step"] for m in history] == [1.0, 2.0, 3.0, 4.0]
    assert scalars(tb, "reward") == [(i + 1, pytest.approx(m["reward"])) for i, m in enumerate(history)]


def test_keyboard_interrupt_saves_and_the_resume_is_identical(model_dir: Path, tmp_path: Path) -> None:
    """With checkpoint_every=0 a checkpoint is written at the end of the run and on
    KeyboardInterrupt (issue 13: nothing was saved); the interrupted run, resumed, equals an
    uninterrupted one."""
    torch.manual_seed(0)
    policy_a, _, history_a = run_steps(model_dir, 3, checkpoint_dir=tmp_path / "a")
    assert checkpoint_step(tmp_path / "a") == 3
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run_steps(
            model_dir, 3, checkpoint_dir=tmp_path / "b", next_prompts=crashing_prompts(2, KeyboardInterrupt)
        )
    assert checkpoint_step(tmp_path / "b") == 2
    torch.manual_seed(12345)  # a new process
    policy_b, _, history_b = run_steps(model_dir, 3, checkpoint_dir=tmp_path / "b")
    assert without_timings(history_b) == without_timings(history_a)
    for (name, a), b in zip(policy_a.state_dict().items(), policy_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class NonFiniteLoss(torch.nn.Module):
    """The recipe's loss, made NaN on the ``nan_loss`` calls and given a NaN gradient (finite
    loss: + 0·sqrt(w − w), whose derivative is 0·∞) on the ``nan_grad`` calls."""

    def __init__(
        self, inner: torch.nn.Module, weight: torch.nn.Parameter, nan_loss: set, nan_grad: set
    ) -> None:
        super().__init__()
        self.inner, self.weight, self.nan_loss, self.nan_grad = inner, weight, nan_loss, nan_grad
        self.calls = 0

    def forward(self, mb: TensorDictBase) -> TensorDictBase:
        out = self.inner(mb)
        if self.calls in self.nan_loss:
            out["loss"] = out["loss"] * float("nan")
        if self.calls in self.nan_grad:
            w = self.weight.sum()
            out["loss"] = out["loss"] + 0.0 * torch.sqrt(w - w.detach())
        self.calls += 1
        return out


def test_non_finite_loss_or_gradient_never_reaches_the_weights(model_dir: Path, tmp_path: Path) -> None:
    """issue 13: a NaN loss in one minibatch stepped the optimizer and made every weight NaN,
    and the NaN weights overwrote the last good checkpoint. Those minibatches are now skipped and
    counted in ``skipped_updates``; the others update the weights."""
    torch.manual_seed(0)
    policy = load_model(model_dir)
    before = snapshot(policy)
    weight = policy.get_output_embeddings().weight
    base = gc.gspo()
    spy = NonFiniteLoss(base.loss, weight, nan_loss={0}, nan_grad={3})
    recipe = dataclasses.replace(base, loss=spy)
    optimizer = make_optimizer(policy)
    history = train(
        policy, policy_sampler(policy, model_dir, seed=0), MathAnswerReward(), recipe, optimizer, next_prompts,
        config(2, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1), samples_per_prompt=GROUP,
    )  # fmt: skip
    assert spy.calls == 4  # 2 steps x 2 minibatches
    assert [m["skipped_updates"] for m in history] == [1.0, 1.0]
    assert not math.isfinite(history[1]["grad_norm"])  # the NaN gradient shows in the metrics
    assert all(bool(torch.isfinite(v).all()) for v in policy.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    steps_taken = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
    assert steps_taken == {2}  # 2 optimizer steps of 4 minibatches
    assert checkpoint_step(tmp_path / "ckpt") == 2


def test_non_finite_weights_are_never_checkpointed(
    model_dir: Path, tmp_path: Path, one_step_checkpoint: Path
) -> None:
    """A policy whose weights became non-finite (however) is not saved over a good checkpoint."""
    from gspo_components.rollout.checkpoint import save_checkpoint

    folder = copy_checkpoint(one_step_checkpoint, tmp_path / "ckpt")
    policy = load_model(model_dir)
    with torch.no_grad():
        next(policy.parameters())[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to write a checkpoint of step 2 with non-finite values"):
        save_checkpoint(folder, {"policy": policy.state_dict(), "step": 2}, step=2, finite=["policy"])
    assert checkpoint_step(folder) == 1
    with pytest.raises(ValueError, match=r"state\['policy'\] is a Linear; a checkpoint holds only tensors"):
        save_checkpoint(folder, {"policy": torch.nn.Linear(1, 1), "step": 2}, step=2)
    assert checkpoint_step(folder) == 1


# --------------------------------------------------------------------------------------------
# checks when train starts, and what the loop accepts


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("steps", -1, "an int >= 0"),
        ("minibatches", 0, "an int >= 1"),
        ("epochs", 0, "an int >= 1"),
        ("epochs", 1.5, "an int >= 1"),
        ("temperature", float("inf"), "a finite number > 0"),
        ("temperature", 0.0, "a finite number > 0"),
        ("max_grad_norm", -1.0, "None or a finite number > 0"),
        ("checkpoint_every", -2, "an int >= 0"),
        ("accuracy_threshold", float("nan"), "None or a finite number"),
        ("old_from_rollout", "yes", "a bool"),
        ("minibatches", True, "an int >= 1"),
    ],
)
def test_bad_config_values_are_refused(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ValueError, match=rf"RLConfig: {field} must be {re.escape(expected)}, got"):
        RLConfig(**{"steps": 1, field: value})
    cfg = RLConfig(steps=1)
    setattr(cfg, field, value)  # set after construction: train() checks again
    with pytest.raises(ValueError, match=rf"RLConfig: {field} must be {re.escape(expected)}, got"):
        train(None, None, None, gc.gspo(), None, next_prompts, cfg, samples_per_prompt=GROUP)  # type: ignore[arg-type]


class NoN:
    """A sampler without ``n`` / ``temperature`` attributes, wrapping a real one; it can turn the
    response mask into float 0/1 (as some engines return it)."""

    def __init__(self, inner: TransformersSampler, float_mask: bool = False) -> None:
        self.inner, self.float_mask = inner, float_mask

    def __call__(self, prompts: Any) -> TensorDictBase:
        td = self.inner(prompts)
        if self.float_mask:
            td["response_mask"] = td["response_mask"].float()
        return td

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.inner.sync_weights(model)


def test_start_checks(model_dir: Path, tmp_path: Path) -> None:
    policy = load_model(model_dir)

    def run(sampler: Any, recipe: Recipe, samples: int = GROUP, **cfg: Any) -> None:
        train(policy, sampler, MathAnswerReward(), recipe, make_optimizer(policy), next_prompts, config(1, **cfg),
              samples_per_prompt=samples)  # fmt: skip

    sampler = policy_sampler(policy, model_dir, seed=0)
    with pytest.raises(
        ValueError, match=r"samples_per_prompt=2 but the sampler draws n=4 samples per prompt"
    ):
        run(sampler, gc.gspo(), samples=2)
    with pytest.raises(ValueError, match=r"the sampler returned a batch of shape \[16\] for 4 prompts; with "
                       r"samples_per_prompt=2 it must be \[8\]"):  # fmt: skip
        run(NoN(sampler), gc.gspo(), samples=2)
    with pytest.raises(ValueError, match=r"samples_per_prompt must be an int >= 1, got 0"):
        run(sampler, gc.gspo(), samples=0)
    hot = TransformersSampler(policy, n=GROUP, max_tokens=MAX_TOKENS, seed=0, temperature=0.7,
                              tokenizer=sampler.tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match=r"the sampler's temperature is 0.7 but RLConfig.temperature is 1.0"):
        run(hot, gc.gspo())
    with pytest.raises(ValueError, match=r"recipe 'grpo' has a KL term \(kl_coef=0.01\), which needs "
                       r"'ref_log_probs': pass reference="):  # fmt: skip
        run(sampler, gc.grpo(kl_coef=0.01))
    assert not (tmp_path / "log.jsonl").exists()


class RewardsOnly(torch.nn.Module):
    """A reward module that writes only ``rewards`` (no ``reward_valid``): 0.25 for a wrong
    answer, 0.75 for a right one (fractional, so the default accuracy has no meaning)."""

    def __init__(self) -> None:
        super().__init__()
        self.math = MathAnswerReward()

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        right = self.math(td.clone())["rewards"]
        td["rewards"] = 0.25 + 0.5 * right
        return td


def test_reward_without_valid_float_mask_entropy_and_accuracy(model_dir: Path, tmp_path: Path) -> None:
    """issue 13: a reward module writing only ``rewards`` failed with KeyError 'reward_valid'; a
    float 0/1 response mask failed with "bitwise_and_cpu not implemented for 'Float'";
    ``gspo(entropy_coef=...)`` failed with "missing key 'entropy'"; and the default accuracy
    thresholded fractional rewards at 0.5."""
    seen: list[float] = []
    for threshold in (None, 0.5):
        torch.manual_seed(0)
        policy = load_model(model_dir)
        before = snapshot(policy)
        reward = RewardsOnly()
        history = train(
            policy, NoN(policy_sampler(policy, model_dir, seed=0), float_mask=True), reward,
            gc.gspo(entropy_coef=1e-3), make_optimizer(policy), next_prompts,
            config(1, accuracy_threshold=threshold), samples_per_prompt=GROUP,
        )  # fmt: skip
        m = history[0]
        assert m["reward_failures"] == 0.0
        assert "entropy" in m and m["entropy"] > 0.0
        assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
        if threshold is None:
            assert "accuracy" not in m  # fractional rewards: no default accuracy
        else:
            # rewards are 0.25 or 0.75: accuracy = share of 0.75 = the share of right answers
            share = (m["reward"] - 0.25) / 0.5
            assert m["accuracy"] == pytest.approx(share)
        seen.append(m["reward"])
    assert seen[0] == seen[1]  # the same run, but for the threshold


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the policy on the GPU)")
def test_cuda_policy_with_a_cpu_rollout(model_dir: Path) -> None:
    """The loop moves the rollout (built on the CPU by the reward and the prompt fields) to the
    policy's device: no device mix."""
    torch.manual_seed(0)
    policy = load_model(model_dir).cuda()
    reference = load_model(model_dir).cuda().requires_grad_(False)
    before = snapshot(policy)
    history = train(
        policy, policy_sampler(policy, model_dir, seed=0), MathAnswerReward(), gc.grpo(kl_coef=0.01),
        make_optimizer(policy), next_prompts, config(2), samples_per_prompt=GROUP, reference=reference,
    )  # fmt: skip
    assert len(history) == 2
    assert all(math.isfinite(history[-1][k]) for k in ("loss", "kl", "reward", "grad_norm"))
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


class Recorder:
    """A user's own logger: anything with start / log / close."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def start(self, step: int) -> None:
        self.calls.append(("start", step))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("log", (step, dict(metrics))))

    def close(self) -> None:
        self.calls.append(("close", None))


def test_any_object_with_the_logger_protocol(model_dir: Path) -> None:
    recorder = Recorder()
    torch.manual_seed(0)
    _, _, history = run_steps(model_dir, 2, logger=recorder)
    assert recorder.calls == [
        ("start", 0),
        ("log", (1, history[0])),
        ("log", (2, history[1])),
        ("close", None),
    ]
    with pytest.raises(ValueError, match=r"train: 'logger' must have the methods start\(step\), log\(step, "
                       r"metrics\) and close\(\) .*; object lacks \['start', 'log', 'close'\]"):  # fmt: skip
        run_steps(model_dir, 1, logger=object())


def test_keyboard_interrupt_after_the_weights_moved_saves_nothing_stale(
    model_dir: Path, tmp_path: Path
) -> None:
    """Interrupted inside step 4 after its updates (here in ``on_step``): the weights belong to
    no completed step, so they are not saved as step 3; a warning says so, and the step-2
    checkpoint stays."""

    def stop(step: int, metrics: dict[str, float]) -> None:
        if step == 4:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    policy = load_model(model_dir)
    with pytest.warns(RuntimeWarning, match=r"interrupted during step 4 after it had updated the weights; .*"
                      r"\(the checkpoint of step 2 is kept\)"), pytest.raises(KeyboardInterrupt):  # fmt: skip
        train(policy, policy_sampler(policy, model_dir, seed=0), MathAnswerReward(), gc.gspo(),
              make_optimizer(policy), next_prompts, config(5, checkpoint_dir=tmp_path, checkpoint_every=2),
              samples_per_prompt=GROUP, on_step=stop)  # fmt: skip
    assert checkpoint_step(tmp_path) == 2


def test_a_checkpoint_of_the_older_single_file_format_resumes(
    model_dir: Path, tmp_path: Path, one_step_checkpoint: Path
) -> None:
    """Folders written before the manifest hold one ``checkpoint.pt`` (no checksum, no recipe
    name, the CPU RNG state as a bare tensor): still resumed, through weights_only."""
    state = torch.load(state_file(one_step_checkpoint), weights_only=True)
    del state["recipe"]
    state["rng"] = state["rng"]["cpu"]
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save(state, folder / "checkpoint.pt")
    _, _, history = run_steps(model_dir, 2, checkpoint_dir=folder)
    assert [m["step"] for m in history] == [1.0, 2.0]
    assert history[0] == state["history"][0]
    assert checkpoint_step(folder) == 2


# --------------------------------------------------------------------------------------------
# the group filter between rewards and advantages


def _drop_constant_groups(td: TensorDictBase) -> TensorDictBase:
    """DAPO's dynamic-sampling criterion, written here: keep the groups whose rewards differ."""
    keep = torch.zeros(td.shape[0], dtype=torch.bool)
    for g in td["group_ids"].unique():
        rows = td["group_ids"] == g
        keep |= rows & bool(td["rewards"][rows].unique().numel() > 1)
    return td[keep]


def test_group_filter_trains_on_the_kept_groups_only(model_dir: Path) -> None:
    torch.manual_seed(0)
    policy = load_model(model_dir)
    seen: list[TensorDictBase] = []

    def spy(td: TensorDictBase) -> TensorDictBase:
        out = _drop_constant_groups(td)
        seen.append(td.select("rewards", "group_ids").clone())
        seen.append(out.select("rewards", "group_ids").clone())
        return out

    losses: list[TensorDictBase] = []
    recipe = gc.grpo()

    class Spy(torch.nn.Module):
        def forward(self, td: TensorDictBase) -> TensorDictBase:
            losses.append(td.select("group_ids").clone())
            return recipe.loss(td)

    history = train(
        policy,
        policy_sampler(policy, model_dir, seed=0),
        MathAnswerReward(),
        Recipe("grpo", recipe.advantage, Spy()),
        make_optimizer(policy),
        next_prompts,
        config(3),
        samples_per_prompt=GROUP,
        group_filter=spy,
    )
    for step, m in enumerate(history):
        sampled, kept = seen[2 * step], seen[2 * step + 1]
        assert m["filtered_samples"] == sampled.shape[0] - kept.shape[0]
        # reward is over the whole sample, not just the kept groups
        assert m["reward"] == pytest.approx(float(sampled["rewards"].mean()))
    trained = torch.cat([t["group_ids"] for t in losses])
    kept_ids = torch.cat([seen[i]["group_ids"] for i in range(1, len(seen), 2)])
    assert set(trained.tolist()) <= set(kept_ids.tolist())
    assert sum(m["filtered_samples"] for m in history) > 0, (
        "no constant group was drawn: the test saw nothing"
    )


def test_group_filter_must_keep_whole_groups_and_every_key(model_dir: Path) -> None:
    policy = load_model(model_dir)

    def run(fn) -> None:
        train(
            policy,
            policy_sampler(policy, model_dir, seed=0),
            MathAnswerReward(),
            gc.grpo(),
            make_optimizer(policy),
            next_prompts,
            config(1),
            samples_per_prompt=GROUP,
            group_filter=fn,
        )

    with pytest.raises(ValueError, match="keep or drop whole groups"):
        run(lambda td: td[1:])
    with pytest.raises(ValueError, match="dropped the keys"):
        run(lambda td: td.exclude("answer"))
    with pytest.raises(ValueError, match=r"batch size \[M\]"):
        run(lambda td: td["rewards"])
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    history = train(
        policy,
        policy_sampler(policy, model_dir, seed=0),
        MathAnswerReward(),
        gc.grpo(),
        make_optimizer(policy),
        next_prompts,
        config(1),
        samples_per_prompt=GROUP,
        group_filter=lambda td: td[:0],
    )
    assert history[0]["filtered_samples"] == PROMPTS_PER_STEP * GROUP
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items()), "no row, no update"
