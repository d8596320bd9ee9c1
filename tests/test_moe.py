"""Routing Replay on real transformers mixture-of-experts models (tiny configs, float32).

Every family the installed transformers has among Qwen3-MoE, Qwen2-MoE, OLMoE and Mixtral is built
from a config inside the test. The references are written here, independently of
``gspo_components.moe``:

- the routing a forward uses is read by the test's own hooks on each MoE block's *experts*
  module, which receives ``(hidden, top_k_index, top_k_weights)``;
- the recorded routing is checked against top-k(softmax(h Wᵀ)) computed by the test from each
  MoE block's input h;
- the replayed forward is checked against a replay written in the test: each router's forward
  is swapped for a function that gathers softmax(h Wᵀ) at the recorded experts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_checks import experts_used

from gspo_components.moe import (
    RoutingReplay,
    rerouted_pairs,
    routing_dtype,
    routing_mask,
    routing_metrics,
    to_scorer_layout,
)

COMMON = dict(
    vocab_size=64,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=None,
)
E, K, L = 8, 2, 2


def _family(name: str) -> tuple[Callable[[], torch.nn.Module], bool]:
    """(model factory, normalises top-k weights) of one family."""
    tf = pytest.importorskip("transformers")
    if name == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **COMMON,
            head_dim=16,
            moe_intermediate_size=32,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=True,
        )
        return lambda: tf.Qwen3MoeForCausalLM(cfg), True
    if name == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **COMMON,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=E,
            num_experts_per_tok=K,
            norm_topk_prob=False,
        )
        return lambda: tf.Qwen2MoeForCausalLM(cfg), False
    if name == "olmoe":
        cfg = tf.OlmoeConfig(**COMMON, num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)
        return lambda: tf.OlmoeForCausalLM(cfg), False
    if name == "mixtral":
        cfg = tf.MixtralConfig(**COMMON, num_local_experts=E, num_experts_per_tok=K, router_jitter_noise=0.0)
        return lambda: tf.MixtralForCausalLM(cfg), True
    raise AssertionError(name)


def _available(name: str) -> bool:
    try:
        importlib.import_module(f"transformers.models.{name}")
    except ImportError:
        return False
    return True


FAMILIES = [
    pytest.param(
        n,
        marks=pytest.mark.skipif(not _available(n), reason=f"the installed transformers has no {n} model"),
    )
    for n in ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")
]


def _moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp for layer in model.model.layers]


def _build(name: str, seed: int = 0) -> tuple[torch.nn.Module, bool]:
    factory, normalises = _family(name)
    torch.manual_seed(seed)
    model = factory().float().eval()
    return model, normalises


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    attn[2, 3:] = 0
    return ids, attn


@contextmanager
def _block_inputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    seen: list[torch.Tensor] = []
    handles = [
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        for block in _moe_blocks(model)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.gate for block in _moe_blocks(model)]


def _perturb_routers(model: torch.nn.Module, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for router in _routers(model):
            router.weight.add_(scale * torch.randn(router.weight.shape, generator=g))


def _sets_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of [..., K]: the two index sets are equal (written without the library)."""
    return (a.long().sort(-1).values == b.long().sort(-1).values).all(-1)


@contextmanager
def _test_replay(model: torch.nn.Module, routed: torch.Tensor, normalises: bool) -> Iterator[None]:
    """The test's own replay: swap each router's forward for one that uses ``routed``."""
    originals = []
    for layer, router in enumerate(_routers(model)):

        def forward(hidden, router=router, layer=layer):
            hidden = hidden.reshape(-1, router.weight.shape[1])
            logits = hidden @ router.weight.T
            probs = torch.softmax(logits.double(), dim=-1).float()
            idx = routed[:, :, layer].reshape(-1, K).long()
            w = probs.gather(-1, idx)
            if normalises:
                w = w / w.sum(-1, keepdim=True)
            return logits, w.to(logits.dtype), idx

        originals.append((router, router.forward))
        router.forward = forward
    try:
        yield
    finally:
        for router, original in originals:
            router.forward = original


# -- record ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_record_shape_dtype_and_values(family: str) -> None:
    model, _ = _build(family)
    replay = RoutingReplay(model)
    assert (replay.num_layers, replay.top_k, replay.num_experts) == (L, K, E)
    ids, attn = _inputs()
    with torch.no_grad(), replay.record() as rec, _block_inputs(model) as hs:
        model(input_ids=ids, attention_mask=attn)
    routed = rec.routed_experts
    assert routed.shape == (3, 9, L, K)
    assert routed.dtype == torch.uint8
    for layer, (h, router) in enumerate(zip(hs, _routers(model), strict=True)):
        probs = torch.softmax((h.reshape(-1, 64) @ router.weight.T).double(), dim=-1)
        expected = probs.topk(K, dim=-1).indices.reshape(3, 9, K)
        assert _sets_equal(routed[:, :, layer], expected).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_unchanged_weights_is_exact(family: str) -> None:
    model, _ = _build(family)
    replay = RoutingReplay(model)
    ids, attn = _inputs()
    with torch.no_grad():
        with replay.record() as rec:
            recorded_logits = model(input_ids=ids, attention_mask=attn).logits
        with replay.replay(rec.routed_experts) as cmp:
            replayed_logits = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(replayed_logits, recorded_logits)
    assert cmp.rerouted.shape == (3, 9, L) and not cmp.rerouted.any()


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_after_router_update(family: str) -> None:
    model, normalises = _build(family)
    replay = RoutingReplay(model)
    ids, attn = _inputs()
    with torch.no_grad(), replay.record() as rec:
        model(input_ids=ids, attention_mask=attn)
    routed = rec.routed_experts
    _perturb_routers(model)

    # Without replay the routing changes.
    with torch.no_grad(), experts_used(model) as free:
        free_logits = model(input_ids=ids, attention_mask=attn).logits
    free_sets = torch.stack(free, dim=1).reshape(3, 9, L, K)
    assert not _sets_equal(free_sets, routed).all()

    # With replay the experts used are the recorded ones, and the logits are the test's replay.
    with torch.no_grad(), experts_used(model) as used, replay.replay(routed) as cmp:
        replayed = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(torch.stack(used, dim=1).reshape(3, 9, L, K), routed.long())
    with torch.no_grad(), _test_replay(model, routed, normalises):
        reference = model(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(replayed, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(replayed, free_logits, atol=1e-4)
    assert cmp.rerouted.any()

    # The router still gets a gradient under replay.
    model.zero_grad()
    with replay.replay(routed):
        model(input_ids=ids, attention_mask=attn).logits.square().mean().backward()
    for router in _routers(model):
        assert router.weight.grad is not None
        assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_contexts_exit_cleanly_on_error(family: str) -> None:
    model, _ = _build(family)
    replay = RoutingReplay(model)
    ids, attn = _inputs()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=attn).logits
        with replay.record() as rec:
            model(input_ids=ids, attention_mask=attn)
        forced = torch.zeros_like(rec.routed_experts)
        forced[..., 1] = 1  # every token to experts {0, 1}
        with pytest.raises(RuntimeError, match="boom"), replay.replay(forced):
            assert not torch.allclose(model(input_ids=ids, attention_mask=attn).logits, base)
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"), replay.record():
            raise RuntimeError("boom")
        after = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(after, base)
    for block in _moe_blocks(model):
        assert not block.gate._forward_hooks and not block._forward_pre_hooks


def test_replay_mask_routes_freely_outside() -> None:
    model, _ = _build("qwen3_moe")
    replay = RoutingReplay(model)
    ids, attn = _inputs()
    with torch.no_grad(), replay.record() as rec:
        model(input_ids=ids, attention_mask=attn)
    own = rec.routed_experts
    forced = torch.zeros_like(own)
    forced[..., 1] = 1
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, :4] = True
    with torch.no_grad(), experts_used(model) as used, replay.replay(forced, mask):
        model(input_ids=ids, attention_mask=attn)
    used_sets = torch.stack(used, dim=1).reshape(3, 9, L, K)
    assert _sets_equal(used_sets[mask], forced[mask]).all()
    # Unforced tokens whose inputs did not change (layer 0, any row but the forced one's later
    # tokens, which attend to the forced ones) route as before.
    assert _sets_equal(used_sets[1:, :, 0], own[1:, :, 0]).all()


def test_compare_measures_without_replaying() -> None:
    model, _ = _build("olmoe")
    replay = RoutingReplay(model)
    ids, attn = _inputs()
    with torch.no_grad(), replay.record() as rec:
        model(input_ids=ids, attention_mask=attn)
    _perturb_routers(model, 0.5)
    with torch.no_grad():
        with replay.record() as now:
            free = model(input_ids=ids, attention_mask=attn).logits
        with replay.compare(rec.routed_experts) as cmp:
            compared = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(compared, free)
    expected = ~_sets_equal(now.routed_experts, rec.routed_experts)
    assert torch.equal(cmp.rerouted, expected)
    assert 0 < expected.float().mean() < 1


def test_record_joins_forwards_along_the_sequence() -> None:
    model, _ = _build("qwen3_moe")
    replay = RoutingReplay(model)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with replay.record() as whole:
            model(input_ids=ids)
        with replay.record() as parts:
            out = model(input_ids=ids[:, :4], use_cache=True)
            model(input_ids=ids[:, 4:], past_key_values=out.past_key_values, use_cache=True)
    assert len(parts.per_forward) == 2
    assert parts.routed_experts.shape == (2, 6, L, K)
    # KV-cached decoding computes the same hidden states up to rounding: same expert sets.
    assert _sets_equal(parts.routed_experts, whole.routed_experts).all()


# -- errors -----------------------------------------------------------------------------------


def test_dense_model_is_refused() -> None:
    tf = pytest.importorskip("transformers")
    dense = tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=16))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM has no mixture-of-experts router"):
        RoutingReplay(dense)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            (2, 9, L, K),
            r"the forward runs \[3, 9\] tokens, so 'routed_experts' must have shape \[3, 9, 2, 2\], got \[2, 9, 2, 2\]",
        ),
        ((3, 8, L, K), r"must have shape \[3, 9, 2, 2\], got \[3, 8, 2, 2\]"),
        ((3, 9, 3, K), r"\[B, S, L, K\] = \[B, S, 2, 2\] .* got \[3, 9, 3, 2\]"),
        ((3, 9, L, 1), r"\[B, S, L, K\] = \[B, S, 2, 2\] .* got \[3, 9, 2, 1\]"),
        ((3, 9, L), r"\[B, S, L, K\] = \[B, S, 2, 2\] .* got \[3, 9, 2\]"),
    ],
)
def test_wrong_shape_names_expected_and_received(shape: tuple[int, ...], message: str) -> None:
    model, _ = _build("qwen3_moe")
    replay = RoutingReplay(model)
    ids, attn = _inputs()
    with (
        pytest.raises(ValueError, match=message),
        torch.no_grad(),
        replay.replay(torch.zeros(shape, dtype=torch.uint8)),
    ):
        model(input_ids=ids, attention_mask=attn)
    with torch.no_grad():  # hooks are gone after the error
        model(input_ids=ids, attention_mask=attn)
    assert all(not r._forward_hooks for r in _routers(model))


def test_bad_values_and_dtypes() -> None:
    model, _ = _build("qwen3_moe")
    replay = RoutingReplay(model)
    with pytest.raises(ValueError, match=r"outside \[0, 8\).*max 8"):
        with replay.replay(torch.full((3, 9, L, K), 8, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match=r"integer expert ids, got torch\.float32"):
        with replay.replay(torch.zeros(3, 9, L, K)):
            pass
    with pytest.raises(ValueError, match=r"'mask' must have shape \[B, S\] = \[3, 9\]"):
        with replay.replay(torch.zeros(3, 9, L, K, dtype=torch.long), torch.ones(3, 8, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="another record/replay/compare block"):
        with replay.record(), replay.record():
            pass


def test_storage_dtype() -> None:
    assert routing_dtype(8) == torch.uint8
    assert routing_dtype(256) == torch.uint8
    assert routing_dtype(257) == torch.int16
    assert routing_dtype(32768) == torch.int16
    assert routing_dtype(32769) == torch.int32


# -- layout and metrics --------------------------------------------------------------------------


def test_to_scorer_layout_places_prompt_then_response() -> None:
    # Row 0: prompt 2 tokens, 3 reported positions (prompt + first response token).
    # Row 1: prompt 3 tokens, 5 reported positions. P = 3, T = 4.
    r0 = torch.arange(3 * 1 * 2).reshape(3, 1, 2)
    r1 = 100 + torch.arange(5 * 1 * 2).reshape(5, 1, 2)
    out = to_scorer_layout([r0, r1], [2, 3], 3, 4, num_layers=1, top_k=2, dtype=torch.int32)
    assert out.shape == (2, 7, 1, 2) and out.dtype == torch.int32
    assert out[0, :2].tolist() == r0[:2].tolist()
    assert out[0, 3].tolist() == r0[2].tolist()
    assert out[1, :3].tolist() == r1[:3].tolist()
    assert out[1, 3:5].tolist() == r1[3:5].tolist()
    assert out[0, 2].abs().sum() == 0 and out[0, 4:].abs().sum() == 0 and out[1, 5:].abs().sum() == 0


def test_routing_mask_excludes_last_response_token() -> None:
    prompt_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    response_mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor(
        [[1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]],
        dtype=torch.bool,
    )
    assert torch.equal(routing_mask(prompt_mask, response_mask), expected)


@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
)
def test_rerouted_and_metrics_match_a_loop(n: int, s: int, layers: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    experts = k + 2
    recorded = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n * s * layers)])
    current = recorded.clone()
    flip = torch.rand(n * s * layers, generator=g) < 0.4
    for row in flip.nonzero().flatten().tolist():
        current[row] = torch.randperm(experts, generator=g)[:k]
    shuffle = torch.stack([torch.randperm(k, generator=g) for _ in range(n * s * layers)])
    current = current.gather(-1, shuffle)  # order inside the K must not count
    recorded = recorded.reshape(n, s, layers, k)
    current = current.reshape(n, s, layers, k)
    mask = torch.rand(n, s, generator=g) < 0.7
    changed = rerouted_pairs(recorded, current)
    pairs = tokens = token_changed = 0
    for i in range(n):
        for j in range(s):
            any_changed = False
            for layer in range(layers):
                differs = set(recorded[i, j, layer].tolist()) != set(current[i, j, layer].tolist())
                assert bool(changed[i, j, layer]) == differs
                any_changed |= differs
                if mask[i, j]:
                    pairs += differs
            if mask[i, j]:
                tokens += 1
                token_changed += any_changed
    metrics = routing_metrics(changed, mask)
    if tokens == 0:
        assert metrics["routing_volatility"].isnan() and metrics["tokens_rerouted"].isnan()
    else:
        assert metrics["routing_volatility"].item() == pytest.approx(pairs / (tokens * layers))
        assert metrics["tokens_rerouted"].item() == pytest.approx(token_changed / tokens)
