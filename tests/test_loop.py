"""The reference loop (:func:`gspo_components.loop.train`) end to end, on the CPU.

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
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict import TensorDictBase

import gspo_components as gc
from gspo_components.loop import PromptBatch, RLConfig, train
from gspo_components.recipes import Recipe
from gspo_components.rewards import MathAnswerReward
from gspo_components.sampling import TransformersSampler
from gspo_components.tiny import build_char_tokenizer, build_tiny_qwen3, supervised_step

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
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    torch.manual_seed(987654321)  # a new process: whatever global RNG state; the checkpoint restores it
    if sampling == "seeded-sampler-rebuilt":
        # ... and a new sampler with the same seed, whose seed generator starts over; the
        # checkpoint's sampler state puts it where the interrupted run left it.
        sampler_b = path_sampler(model_dir)
    policy_b, opt_b, history_b = run_resumable(model_dir, tmp_path / "b", 3, sampler_b, tmp_path / "b.jsonl")

    assert len(history_a) == len(history_b) == 3
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["step"] == 3
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 3
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
