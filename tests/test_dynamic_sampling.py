"""DAPO's dynamic sampling in the reference loop (RLConfig.dynamic_sampling; arXiv 2503.14476 §3.2).

A tiny Qwen3 (random weights, character alphabet) is sampled by the real
:class:`TransformersSampler`; the reward makes the groups of prompts ``a+b=`` with ``a <= 4``
constant (0.5 for every sample) and scores the others by the parity of the response's character
codes, so those groups are varied unless all four samples happen to agree. Every rollout the
reward sees and every batch the advantage sees are recorded, and the loop's choices are checked
against them by plain loops:

- each step draws rounds until it holds as many varied groups as its first draw had prompts
  (``next_prompts`` gives two constant prompts out of four, so a second round is always needed;
  later rounds come from ``more_prompts(step, round)``); the trained batch is exactly the first
  varied groups in sampling order, renumbered ``group_ids``, and nothing else (the surplus of a
  round that overfills the batch is cut, which happens in the run);
- ``sampling_rounds``, ``filtered_groups`` and ``kept_groups`` equal the counts in the recorded
  rollouts; ``reward`` is the mean over every sample of every round; the weights move;
- when the round budget is spent (all rewards constant): the step trains on what it has (here
  nothing: no update, weights unchanged) and logs the rounds and groups;
- off by default: no new metrics, one draw per step;
- bad settings are ValueErrors naming the field.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

import gspo_components as gc
from gspo_components.loss.recipes import Recipe
from gspo_components.rollout.loop import PromptBatch, RLConfig, train
from gspo_components.rollout.sampling import TransformersSampler
from gspo_components.testing.tiny import build_char_tokenizer, build_tiny_qwen3

ALPHABET = "0123456789+="
GROUP = 4
PROMPTS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_ds")
    build_char_tokenizer(ALPHABET, path)
    return path


def make_policy(tokenizer_dir: Path) -> tuple[torch.nn.Module, TransformersSampler]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    policy = build_tiny_qwen3(
        len(tok), tokenizer=tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, intermediate_size=64, max_position_embeddings=32, seed=0,
    )  # fmt: skip
    policy.eval()
    return policy, TransformersSampler(policy, n=GROUP, max_tokens=3, seed=0, tokenizer=tok)


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def next_prompts(step: int) -> PromptBatch:
    """Two constant prompts (a <= 4) and two varied ones (a >= 5)."""
    rng = random.Random(step)
    return PromptBatch([prompt(rng.randint(1, 4), rng.randint(1, 9)) for _ in range(2)]
                       + [prompt(rng.randint(5, 9), rng.randint(1, 9)) for _ in range(2)])  # fmt: skip


def more_prompts(step: int, round_: int) -> PromptBatch:
    """One constant prompt (a = 1) and three mostly varied ones: the round usually overfills the batch."""
    rng = random.Random(1000 * step + round_)
    return PromptBatch(
        [prompt(1, rng.randint(1, 9))] + [prompt(rng.randint(5, 9), rng.randint(1, 9)) for _ in range(3)]
    )


class SplitReward(torch.nn.Module):
    """0.5 for prompts with a <= 4 (constant groups); else the parity of the response's character
    codes. Records every rollout it scores."""

    def __init__(self, constant_all: bool = False) -> None:
        super().__init__()
        self.constant_all = constant_all
        self.seen: list[list[tuple[str, str, float]]] = []

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        prompts, responses = list(td["prompt_text"]), list(td["response_text"])
        rewards = []
        for p, r in zip(prompts, responses, strict=True):
            rewards.append(0.5 if self.constant_all or int(p[0]) <= 4 else float(sum(map(ord, r)) % 2))
        td.set("rewards", torch.tensor(rewards, dtype=torch.float32))
        self.seen.append(list(zip(prompts, responses, rewards, strict=True)))
        return td


class RecordingAdvantage(TensorDictModuleBase):
    """The recipe's own advantage, recording the batch it is given."""

    def __init__(self, inner: TensorDictModuleBase) -> None:
        super().__init__()
        self.inner, self.in_keys, self.out_keys = inner, inner.in_keys, inner.out_keys
        self.batches: list[list[tuple[str, str, float, int]]] = []

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        rows = zip(list(td["prompt_text"]), list(td["response_text"]), td["rewards"].tolist(),
                   td["group_ids"].tolist(), strict=True)  # fmt: skip
        self.batches.append(list(rows))
        return self.inner(td)


def recording_recipe() -> tuple[Recipe, RecordingAdvantage]:
    base = gc.grpo()
    advantage = RecordingAdvantage(base.advantage)
    return Recipe(base.name, advantage, base.loss), advantage


def groups_of(rollout: list[tuple[str, str, float]]) -> list[list[tuple[str, str, float]]]:
    return [rollout[g * GROUP : (g + 1) * GROUP] for g in range(len(rollout) // GROUP)]


def is_varied(group: list[tuple[str, str, float]]) -> bool:
    return len({r for _, _, r in group}) > 1


def run(tokenizer_dir: Path, steps: int, reward: SplitReward, **cfg: object):
    policy, sampler = make_policy(tokenizer_dir)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    recipe, advantage = recording_recipe()
    extra = {"more_prompts": cfg.pop("more_prompts")} if "more_prompts" in cfg else {}
    config = RLConfig(steps=steps, minibatches=1, progress=False, accuracy_key=None, **cfg)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    history = train(policy, sampler, reward, recipe, optimizer, next_prompts, config, samples_per_prompt=GROUP,
                    **extra)  # fmt: skip
    moved = any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    return history, advantage.batches, moved


def test_fills_the_batch_with_varied_groups(tokenizer_dir: Path) -> None:
    reward = SplitReward()
    history, batches, moved = run(tokenizer_dir, 2, reward, dynamic_sampling=True, max_sampling_rounds=6,
                                  more_prompts=more_prompts)  # fmt: skip
    assert moved
    seen = iter(reward.seen)
    trimmed = 0
    for step, (metrics, trained) in enumerate(zip(history, batches, strict=True)):
        rounds = int(metrics["sampling_rounds"])
        assert rounds >= 2  # the first draw has two constant groups out of four
        rollouts = [next(seen) for _ in range(rounds)]
        assert [p for p, _, _ in rollouts[0][::GROUP]] == next_prompts(step).prompts
        for r, rollout in enumerate(rollouts[1:], start=1):
            assert [p for p, _, _ in rollout[::GROUP]] == more_prompts(step, r).prompts
        groups = [g for rollout in rollouts for g in groups_of(rollout)]
        varied = [g for g in groups if is_varied(g)]
        # rounds stop as soon as the batch is full (or the budget is spent)
        per_round = [sum(is_varied(g) for g in groups_of(rollout)) for rollout in rollouts]
        assert all(sum(per_round[:k]) < PROMPTS for k in range(1, rounds))
        assert len(varied) >= PROMPTS or rounds == 6
        assert metrics["filtered_groups"] == len(groups) - len(varied)
        assert metrics["kept_groups"] == min(PROMPTS, len(varied))
        want = [(p, r, w, gid) for gid, g in enumerate(varied[:PROMPTS]) for p, r, w in g]
        assert trained == want  # the first varied groups in sampling order, renumbered
        trimmed += len(varied) > PROMPTS
        every = [w for g in groups for _, _, w in g]
        assert metrics["reward"] == pytest.approx(sum(every) / len(every), rel=1e-6)
    assert next(seen, None) is None
    assert trimmed  # some step drew more varied groups than the batch holds: the surplus was cut


def test_budget_spent_trains_on_what_there_is(tokenizer_dir: Path) -> None:
    reward = SplitReward(constant_all=True)
    history, batches, moved = run(tokenizer_dir, 1, reward, dynamic_sampling=True, max_sampling_rounds=3)
    assert not moved and batches == []  # no varied group: no advantage, no update
    (metrics,) = history
    assert (metrics["sampling_rounds"], metrics["filtered_groups"], metrics["kept_groups"]) == (
        3.0,
        12.0,
        0.0,
    )
    # default more_prompts: the step's prompts again
    assert [[p for p, _, _ in r[::GROUP]] for r in reward.seen] == [next_prompts(0).prompts] * 3


def test_off_by_default(tokenizer_dir: Path) -> None:
    reward = SplitReward()
    history, batches, _ = run(tokenizer_dir, 1, reward)
    assert len(reward.seen) == 1 and len(batches[0]) == PROMPTS * GROUP
    assert not {"sampling_rounds", "filtered_groups", "kept_groups"} & set(history[0])


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"dynamic_sampling": 1}, "dynamic_sampling must be a bool"),
        ({"dynamic_sampling": True, "max_sampling_rounds": 0}, "max_sampling_rounds must be an int >= 1"),
        ({"max_sampling_rounds": 2.0}, "max_sampling_rounds must be an int >= 1"),
    ],
)
def test_bad_settings(cfg: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RLConfig(steps=1, **cfg)


def test_more_prompts_needs_dynamic_sampling(tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"more_prompts is only used with RLConfig\.dynamic_sampling=True"):
        run(tokenizer_dir, 1, SplitReward(), more_prompts=more_prompts)
