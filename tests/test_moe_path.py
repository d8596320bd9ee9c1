"""Mixture-of-experts through the training path: the Scorer's routing options (R2), the
TransformersSampler's rollout routing (R3), the reference loop with each routing mode, and the
refusals. A tiny Qwen3-MoE (``tiny.build_tiny_qwen3_moe``: 2 layers, 8 experts, top-2) over a
character alphabet, float32 (transformers' grouped_mm experts refuse float64).

References are independent of the code under test: log-probs are recomputed here from the full
logits of a plain forward, and the routing of a rollout is compared with a teacher-forced forward
whose routing the test reads with its own hooks on the experts modules.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from moe_checks import experts_used
from tensordict import TensorDict

import gspo_components as gc
from gspo_components.moe import routing_mask
from gspo_components.rollout.loop import PromptBatch, RLConfig, train
from gspo_components.rollout.rewards import RewardFn
from gspo_components.rollout.sampling import TransformersSampler, VLLMSampler
from gspo_components.rollout.scoring import Scorer
from gspo_components.testing.tiny import build_char_tokenizer, build_tiny_qwen3, build_tiny_qwen3_moe

ALPHABET = "0123456789+="
LAYERS, TOP_K = 2, 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ALPHABET)


def moe_model(tokenizer, seed: int = 0) -> torch.nn.Module:
    return build_tiny_qwen3_moe(
        len(tokenizer), tokenizer=tokenizer, hidden_size=64, max_position_embeddings=64, seed=seed
    )


def rollout_td(tokenizer) -> TensorDict:
    """A hand-made right-padded batch: 3 prompts of different lengths, responses with padding."""
    prompts = ["12+7=", "3+4=", "45+45="]
    responses = ["19", "7", "90"]
    p_ids = [tokenizer.encode(p) for p in prompts]
    r_ids = [[*tokenizer.encode(r), tokenizer.eos_token_id] for r in responses]
    p_w, r_w = max(map(len, p_ids)), max(map(len, r_ids))
    td = TensorDict(
        {
            "prompt_ids": torch.tensor([p + [0] * (p_w - len(p)) for p in p_ids]),
            "prompt_mask": torch.tensor(
                [[1] * len(p) + [0] * (p_w - len(p)) for p in p_ids], dtype=torch.bool
            ),
            "response_ids": torch.tensor([r + [0] * (r_w - len(r)) for r in r_ids]),
            "response_mask": torch.tensor(
                [[1] * len(r) + [0] * (r_w - len(r)) for r in r_ids], dtype=torch.bool
            ),
        },
        batch_size=[3],
    )
    return td


def reference_log_probs(model: torch.nn.Module, td: TensorDict) -> torch.Tensor:
    """ℓ [N, T] from one plain forward per row over exactly prompt ++ response (no padding)."""
    out = torch.zeros(td["response_ids"].shape)
    for i in range(td.shape[0]):
        p = td["prompt_ids"][i][td["prompt_mask"][i]]
        r = td["response_ids"][i][td["response_mask"][i]]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([p, r]).unsqueeze(0)).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        for t in range(len(r)):
            out[i, t] = lp[len(p) - 1 + t, r[t]]
    return out


# -- Scorer ------------------------------------------------------------------------------------


def test_scorer_on_moe_matches_plain_forward(tokenizer) -> None:
    model = moe_model(tokenizer)
    td = rollout_td(tokenizer)
    expected = reference_log_probs(model, td)
    for fused in (True, False):
        got = Scorer(model, grad=False, fused=fused)(td.clone())["log_probs"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_r2_unchanged_weights_gives_ratio_exactly_one(tokenizer) -> None:
    model = moe_model(tokenizer)
    td = rollout_td(tokenizer)
    td = Scorer(model, out_key="old_log_probs", grad=False, routing="record")(td)
    assert td["routed_experts"].shape == (
        3,
        td["prompt_ids"].shape[1] + td["response_ids"].shape[1],
        LAYERS,
        TOP_K,
    )
    assert td["routed_experts"].dtype == torch.uint8
    td = Scorer(model, routing="replay")(td)
    mask = td["response_mask"]
    assert torch.equal(td["log_probs"][mask], td["old_log_probs"][mask])
    ratio = torch.exp(td["log_probs"] - td["old_log_probs"])[mask]
    assert torch.equal(ratio, torch.ones_like(ratio))
    assert not td["rerouted"].any()
    out = gc.gspo().loss(
        gc.gspo().advantage(
            td.set("rewards", torch.tensor([1.0, 0.0, 1.0])).set(
                "group_ids", torch.zeros(3, dtype=torch.long)
            )
        )
    )
    assert out["ratio_mean"].item() == 1.0 and out["clip_fraction"].item() == 0.0


def test_scorer_replay_after_update_uses_recorded_experts(tokenizer) -> None:
    model = moe_model(tokenizer)
    td = rollout_td(tokenizer)
    td = Scorer(model, out_key="old_log_probs", grad=False, routing="record", micro_batch_size=2)(td)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.add_(
                torch.randn(layer.mlp.gate.weight.shape, generator=torch.Generator().manual_seed(5))
            )
    free = Scorer(model, grad=False, routing="compare")(td.clone())
    with experts_used(model) as used:
        replayed = Scorer(model, routing="replay")(td.clone())
    s = td["routed_experts"].shape[1]
    used = torch.stack(used, dim=1).reshape(3, s, LAYERS, TOP_K)
    mask = routing_mask(td["prompt_mask"], td["response_mask"])
    recorded = td["routed_experts"].long()
    assert torch.equal(used[mask], recorded[mask])
    assert free["rerouted"].any() and replayed["rerouted"].any()
    assert not free["rerouted"][~mask].any()
    assert not torch.allclose(free["log_probs"], replayed["log_probs"])
    replayed["log_probs"][td["response_mask"]].sum().backward()
    grad = model.model.layers[0].mlp.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_scorer_routing_errors(tokenizer) -> None:
    model = moe_model(tokenizer)
    td = rollout_td(tokenizer)
    with pytest.raises(ValueError, match="missing key 'routed_experts'"):
        Scorer(model, routing="replay")(td)
    td["routed_experts"] = torch.zeros(3, 5, LAYERS, TOP_K, dtype=torch.uint8)  # wrong S
    with pytest.raises(
        ValueError, match=r"must have shape \[N, P \+ T, L, K\] = \[3, 9, 2, 2\] .*got \[3, 5, 2, 2\]"
    ):
        Scorer(model, routing="replay")(td)
    with pytest.raises(ValueError, match="routing must be None, 'record', 'replay' or 'compare'"):
        Scorer(model, routing="R2")
    from gspo_components.moe import RoutingReplay

    shared = RoutingReplay(model)
    assert Scorer(model, routing="record", routing_replay=shared).routing_replay is shared
    with pytest.raises(ValueError, match="routing_replay must be a RoutingReplay of this Scorer's model"):
        Scorer(moe_model(tokenizer, seed=1), routing="record", routing_replay=shared)
    dense = build_tiny_qwen3(len(tokenizer), tokenizer=tokenizer, hidden_size=64)
    with pytest.raises(ValueError, match="Qwen3ForCausalLM has no mixture-of-experts router"):
        Scorer(dense, routing="record")


# -- samplers -------------------------------------------------------------------------------------


def test_transformers_sampler_records_rollout_routing(tokenizer) -> None:
    model = moe_model(tokenizer)
    sampler = TransformersSampler(
        model, n=3, max_tokens=6, temperature=1.0, seed=0, tokenizer=tokenizer, return_routed_experts=True
    )
    td = sampler(["12+7=", "3+4=", "45+45="])
    s = td["prompt_ids"].shape[1] + td["response_ids"].shape[1]
    assert td["routed_experts"].shape == (9, s, LAYERS, TOP_K) and td["routed_experts"].dtype == torch.uint8
    # Teacher-forced forward of the same tokens, its routing read by the test's own hooks.
    with torch.no_grad(), experts_used(model) as used:
        Scorer(model, grad=False)(td.clone())
    forced = torch.stack(used, dim=1).reshape(9, s, LAYERS, TOP_K)
    mask = routing_mask(td["prompt_mask"], td["response_mask"])
    rec = td["routed_experts"].long().sort(-1).values
    assert mask.sum() > 20
    assert torch.equal(rec[mask], forced.sort(-1).values[mask])
    # R3's replay of the rollout routing reproduces the engine's log-probs.
    scored = Scorer(model, grad=False, routing="replay")(td.clone())
    valid = td["response_mask"]
    torch.testing.assert_close(
        scored["log_probs"][valid], td["rollout_log_probs"][valid], rtol=1e-5, atol=1e-5
    )


def test_sampler_routing_refusals(tokenizer, tmp_path: Path) -> None:
    dense = build_tiny_qwen3(len(tokenizer), tokenizer=tokenizer, hidden_size=64)
    with pytest.raises(ValueError, match="Qwen3ForCausalLM has no mixture-of-experts router"):
        TransformersSampler(dense, n=2, max_tokens=4, tokenizer=tokenizer, return_routed_experts=True)
    # vLLM's CPU build refuses routing capture; the sampler says so before starting an engine.
    with pytest.raises(ValueError, match=r"needs vLLM's Model Runner V2.*CPU build"):
        VLLMSampler(str(tmp_path), n=2, max_tokens=4, return_routed_experts=True)


# -- the loop ---------------------------------------------------------------------------------------


class LastDigitReward(RewardFn):
    """1 when the response's first character is the last digit of the sum, else 0."""

    fields = ("response_text", "answer")

    def score(self, sample) -> float:
        return float(sample["response_text"][:1] == sample["answer"][-1:])


def next_prompts(step: int) -> PromptBatch:
    pairs = random.Random(step).sample([(a, b) for a in range(10) for b in range(10)], 4)
    return PromptBatch([f"{a}+{b}=" for a, b in pairs], {"answer": [str(a + b) for a, b in pairs]})


@pytest.mark.parametrize("mode", [None, "R2", "R3"])
def test_loop_trains_a_moe_with_each_routing_mode(tokenizer, mode: str | None) -> None:
    torch.manual_seed(0)
    policy = moe_model(tokenizer, seed=3)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    sampler = TransformersSampler(
        policy, n=4, max_tokens=3, seed=0, tokenizer=tokenizer, return_routed_experts=mode == "R3"
    )
    history = train(
        policy,
        sampler,
        LastDigitReward(),
        gc.grpo(),
        torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0),
        next_prompts,
        RLConfig(steps=2, minibatches=2, epochs=2, progress=False, routing_replay=mode),
        samples_per_prompt=4,
    )
    assert len(history) == 2
    for m in history:
        assert 0.0 <= m["routing_volatility"] <= m["tokens_rerouted"] <= 1.0, m
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    # Updates move the routers: later minibatches see routing change, with replay on or off.
    assert any(m["routing_volatility"] > 0.0 for m in history)


def test_loop_routing_refusals(tokenizer) -> None:
    dense = build_tiny_qwen3(len(tokenizer), tokenizer=tokenizer, hidden_size=64)
    args = (LastDigitReward(), gc.grpo())

    def run(policy, mode, sampler=None, **cfg) -> None:
        sampler = sampler or TransformersSampler(policy, n=2, max_tokens=2, seed=0, tokenizer=tokenizer)
        train(
            policy,
            sampler,
            *args,
            torch.optim.SGD(policy.parameters(), lr=0.0),
            next_prompts,
            RLConfig(steps=1, minibatches=1, progress=False, routing_replay=mode, **cfg),
            samples_per_prompt=2,
        )

    with pytest.raises(ValueError, match="routing_replay='R2' needs a mixture-of-experts policy"):
        run(dense, "R2")
    moe = moe_model(tokenizer)
    with pytest.raises(ValueError, match="routing_replay='R3' needs the sampler to return 'routed_experts'"):
        run(moe, "R3")
    with pytest.raises(ValueError, match="old_from_rollout=True skips that forward"):
        run(moe, "R2", old_from_rollout=True)
    with pytest.raises(ValueError, match="routing_replay must be None, 'R2' or 'R3'"):
        run(moe, "R1")
