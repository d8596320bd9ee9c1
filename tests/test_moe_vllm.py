"""A mixture-of-experts policy through the real vLLM engine (CPU build): sample, update the
transformers policy, sync its weights into the engine, sample again.

The policy is a tiny Qwen3-MoE (2 layers, 8 experts, top-2, hidden 128, head_dim 32). transformers
holds its experts fused in memory; the sync must send vLLM the per-expert checkpoint layout. The
check is the one of ``test_weight_sync.py``: after the sync the engine's ``rollout_log_probs``
equal the trainer's recomputation (the Scorer, fused head, float32), while before it they are off
by far more.

Rollout routing capture from vLLM (``return_routed_experts=True``) needs vLLM's GPU build; its
test runs only where a CUDA GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from sync_checks import max_logprob_gap, reinforce_update

from gspo_components.moe import RoutingReplay, routing_mask
from gspo_components.rollout.sampling import VLLMSampler
from gspo_components.rollout.sampling.vllm_sampler import checkpoint_state_dict
from gspo_components.rollout.scoring import Scorer
from gspo_components.testing.tiny import build_char_tokenizer, build_tiny_qwen3_moe

ALPHABET = "0123456789+-*= "
TEMPERATURE = 0.9
PROMPTS = ["12+34=", "7*8=", "5-9=", "3"]
# Measured on this module's model (float32): the largest |engine − Scorer| over sampled tokens is
# about 1e-6 right after a sync; before a sync the gap exceeds 1e-2.
LOGPROB_ATOL = 1e-4


def _update(policy: torch.nn.Module, rollout, steps: int = 3) -> None:
    reinforce_update(policy, rollout, TEMPERATURE, steps)


def _max_gap(policy: torch.nn.Module, rollout) -> float:
    return max_logprob_gap(policy, rollout, TEMPERATURE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3_moe_sync")
    tok = build_char_tokenizer(ALPHABET, path)
    build_tiny_qwen3_moe(len(tok), path, tokenizer=tok, max_position_embeddings=64, seed=1)
    return path


@pytest.fixture(scope="module")
def policy(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def sampler(model_dir):
    s = VLLMSampler(
        str(model_dir), n=4, max_tokens=12, temperature=TEMPERATURE, seed=0, dtype="float32",
        kv_cache_memory_bytes=64 << 20,
    )  # fmt: skip
    yield s
    s.close()


def test_checkpoint_state_dict_is_the_saved_layout(model_dir, policy):
    from safetensors import safe_open

    state = checkpoint_state_dict(policy)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert set(state) == set(saved)
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in state
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("transport", ["file", "rpc"])
def test_moe_engine_follows_the_policy_after_sync(sampler, policy, transport):
    sampler.weight_sync = transport
    sampler.sync_weights(policy)
    before = sampler(PROMPTS)
    assert _max_gap(policy, before) < LOGPROB_ATOL
    routers = [layer.mlp.gate.weight.detach().clone() for layer in policy.model.layers]
    _update(policy, before)
    assert all(
        not torch.equal(r, layer.mlp.gate.weight)
        for r, layer in zip(routers, policy.model.layers, strict=True)
    )
    stale = sampler(PROMPTS)
    gap = _max_gap(policy, stale)
    assert gap > 1e-2, f"the update should be visible before the sync, max gap {gap:.3g}"
    sampler.sync_weights(policy)
    fresh = sampler(PROMPTS)
    assert _max_gap(policy, fresh) < LOGPROB_ATOL


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="vLLM returns routed experts only from its Model Runner V2, which needs Triton on a CUDA GPU",
)
def test_vllm_rollout_routing_matches_a_teacher_forced_forward(model_dir):  # pragma: no cover - GPU only
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda()
    with VLLMSampler(
        str(model_dir), n=2, max_tokens=8, seed=0, dtype="float32", return_routed_experts=True,
        gpu_memory_utilization=0.2,
    ) as sampler:  # fmt: skip
        td = sampler(PROMPTS)
    replay = RoutingReplay(policy)
    assert td["routed_experts"].shape[2:] == (replay.num_layers, replay.top_k)
    recorded = Scorer(policy, grad=False, routing="record")(td.clone().to("cuda"))["routed_experts"].cpu()
    mask = routing_mask(td["prompt_mask"], td["response_mask"])
    same = (recorded.long().sort(-1).values == td["routed_experts"].long().sort(-1).values).all(-1)
    # Engine and trainer kernels differ in rounding; a near-tie may flip. Nearly all must agree.
    assert same[mask].float().mean() > 0.99
