"""Weight sync: after an optimizer step on the transformers policy, the engine samples from the
new weights.

One real vLLM engine (float32) on a tiny Qwen3 built in a temporary folder. Each test updates
the policy with AdamW on a REINFORCE-style loss over a fresh rollout, pushes the weights with
``sampler.sync_weights(policy)`` (both transports, "file" and "rpc"), samples again, and checks that the engine's
``rollout_log_probs`` equal the trainer's recomputation (the Scorer, fused head, float32) to
``LOGPROB_ATOL``, while before the sync they were off by far more: the check sees the update.
"""

from __future__ import annotations

import copy

import pytest
import torch
from sync_checks import max_logprob_gap, reinforce_update

from gspo_components.rollout.sampling import TransformersSampler, VLLMSampler
from gspo_components.rollout.scoring import Scorer
from gspo_components.testing.tiny import build_char_tokenizer, build_tiny_qwen3

ALPHABET = "0123456789+-*= "
TEMPERATURE = 0.9
PROMPTS = ["12+34=", "7*8=", "5-9=", "3"]
# Measured in float32 on this module's model: max |engine − Scorer| over sampled tokens was 3e-6
# to 2.2e-5 across ten successive aggressive updates (AdamW, lr 3e-2; larger weights, larger
# rounding differences). Before a sync the same comparison is off by more than 1e-2.
LOGPROB_ATOL = 1e-4


def _update(policy: torch.nn.Module, rollout, steps: int = 3) -> None:
    reinforce_update(policy, rollout, TEMPERATURE, steps)


def _max_gap(policy: torch.nn.Module, rollout) -> float:
    return max_logprob_gap(policy, rollout, TEMPERATURE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3_sync")
    tok = build_char_tokenizer(ALPHABET, path)
    build_tiny_qwen3(len(tok), path, tokenizer=tok, max_position_embeddings=64, seed=1)
    return path


@pytest.fixture(scope="module")
def policy(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def sampler(model_dir):
    # block_size=32 (the CPU backend's default is 128) lets the prefix-cache test fill a block.
    s = VLLMSampler(
        str(model_dir), n=4, max_tokens=16, temperature=TEMPERATURE, seed=0, dtype="float32", block_size=32
    )
    yield s
    s.close()


@pytest.mark.parametrize("transport", ["file", "rpc"])
def test_engine_follows_the_policy_after_sync(sampler, policy, transport):
    sampler.weight_sync = transport
    sampler.sync_weights(policy)  # start from the same weights, whatever earlier tests did
    before = sampler(PROMPTS)
    assert _max_gap(policy, before) < LOGPROB_ATOL
    _update(policy, before)
    stale = sampler(PROMPTS)
    gap = _max_gap(policy, stale)
    assert gap > 1e-2, f"the update should be visible before the sync, max gap {gap:.3g}"
    sampler.sync_weights(policy)
    fresh = sampler(PROMPTS)
    assert _max_gap(policy, fresh) < LOGPROB_ATOL


def test_sync_clears_the_prefix_cache(sampler, policy, monkeypatch):
    """Prompts longer than a KV block (32 tokens here) are prefix-cached; their cached KV was
    computed with the old weights, so a sync that kept it would sample from a mix of both."""
    long_prompts = ["1234567890+" * 4, "98765432-1" * 4]  # 44 and 40 tokens
    sampler.weight_sync = "rpc"
    sampler.sync_weights(policy)
    _update(policy, sampler(long_prompts), steps=1)
    with monkeypatch.context() as patch:
        patch.setattr(sampler.llm, "reset_prefix_cache", lambda *args, **kwargs: True)
        sampler.sync_weights(policy)
        stale = _max_gap(policy, sampler(long_prompts))
        assert stale > 1e-2, f"stale cached KV should show, max gap {stale:.3g}"
    sampler.sync_weights(policy)
    assert _max_gap(policy, sampler(long_prompts)) < LOGPROB_ATOL


def test_bf16_transport_casts_to_the_engine_dtype(model_dir, sampler, policy):
    """Weights travel in the engine's dtype; a bf16 copy of the policy syncs like the fp32 one.

    The engine then holds the bf16-rounded weights (in float32). It must match a float32 model
    with exactly those weights, and match it far better than it matches the unrounded policy.
    (How far the rounding moves the sampled tokens' log-probs depends on the model and the
    samples: on one machine it was 3e-3, on another 1.5e-6, so the test compares the two gaps
    instead of bounding one.)"""
    sampler.weight_sync = "rpc"
    rounded = copy.deepcopy(policy).to(torch.bfloat16)
    sampler.sync_weights(rounded)
    rollout = sampler(PROMPTS)
    mask = rollout["response_mask"]
    as_float = copy.deepcopy(rounded).to(torch.float32)

    def gaps(model: torch.nn.Module) -> torch.Tensor:
        scored = Scorer(model, temperature=TEMPERATURE, grad=False)(rollout.clone())
        return (scored["log_probs"] - rollout["rollout_log_probs"]).abs()[mask]

    to_rounded, to_policy = gaps(as_float), gaps(policy)
    assert float(to_rounded.max()) < LOGPROB_ATOL
    assert float(to_policy.sum()) > 2 * float(to_rounded.sum()), (
        float(to_policy.sum()),
        float(to_rounded.sum()),
    )
    sampler.sync_weights(policy)
    assert _max_gap(policy, sampler(PROMPTS)) < LOGPROB_ATOL


def test_unknown_transport_raises(sampler, policy):
    sampler.weight_sync = "carrier-pigeon"
    with pytest.raises(ValueError, match="weight_sync must be 'file' or 'rpc'"):
        sampler.sync_weights(policy)
    sampler.weight_sync = "file"


def test_transformers_sampler_sync(model_dir, policy):
    tok = build_char_tokenizer(ALPHABET)
    sampler = TransformersSampler(policy, n=2, max_tokens=8, temperature=TEMPERATURE, seed=0, tokenizer=tok)
    sampler.sync_weights(policy)  # the same object: nothing to copy
    assert sampler.model is policy
    other = TransformersSampler(str(model_dir), n=2, max_tokens=8, temperature=TEMPERATURE, seed=0)
    other.sync_weights(policy)  # another object: its weights become the policy's
    for (name, a), b in zip(other.model.state_dict().items(), policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert _max_gap(policy, other(PROMPTS)) < LOGPROB_ATOL


def test_resume_with_a_rebuilt_seeded_engine_sampler_is_identical(model_dir, sampler, tmp_path):
    """The loop checkpoints the sampler's seed generator. A run stopped after 2 steps and resumed
    with the generator where a newly built ``VLLMSampler(seed=0)`` has it reproduces step 3 of an
    uninterrupted run: the engine's samples, every logged metric, and the weights."""
    from transformers import AutoModelForCausalLM

    import gspo_components as gc
    from gspo_components.rollout.loop import PromptBatch, RLConfig, train
    from gspo_components.rollout.rewards import FormatReward

    timing_keys = {"seconds", "tokens_per_s", "sample_tokens_per_s"}
    as_new = {"rng": torch.Generator().manual_seed(0).get_state()}  # a rebuilt sampler's state

    def run(ckpt, steps):
        policy = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        if not (ckpt / "checkpoint.json").exists():
            sampler.sync_weights(policy)  # the engine holds whatever earlier tests pushed
        history = train(
            policy,
            sampler,
            FormatReward(r"^\d"),  # about half of this random model's responses start with a digit
            gc.gspo(),
            torch.optim.AdamW(policy.parameters(), lr=1e-2),
            lambda step: PromptBatch(PROMPTS),
            RLConfig(
                steps=steps,
                minibatches=2,
                temperature=TEMPERATURE,
                progress=False,
                checkpoint_dir=ckpt,
                checkpoint_every=1,
            ),
            samples_per_prompt=sampler.n,
        )
        return policy, [{k: v for k, v in m.items() if k not in timing_keys} for m in history]

    sampler.weight_sync = "file"
    sampler.load_state_dict(as_new)
    policy_a, history_a = run(tmp_path / "a", 3)
    sampler.load_state_dict(as_new)
    _, history_b2 = run(tmp_path / "b", 2)
    sampler.load_state_dict(as_new)  # "rebuilt": the checkpoint must move it on
    policy_b, history_b = run(tmp_path / "b", 3)

    assert history_b[:2] == history_b2
    assert history_b == history_a, "the resumed run's metrics differ"
    assert any(0.0 < m["reward"] < 1.0 for m in history_a), [m["reward"] for m in history_a]
    for (name, a), b in zip(policy_a.state_dict().items(), policy_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
