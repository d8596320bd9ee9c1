"""The samplers' contract, on a real vLLM engine and on transformers ``generate``.

A tiny Qwen3 (2 layers, hidden 128, head_dim 32) and a character tokenizer are built into a
temporary folder; both samplers load that folder. One vLLM engine serves the whole module (an
engine start costs tens of seconds on 2 cores).

What is checked, for both samplers:

- the keys, shapes and dtypes of the key schema (docs/concepts.md), prompt-major rows and ``group_ids``;
- right padding (masks are prefixes), the end-of-sequence token ending every non-truncated
  response, ``truncated`` exactly for responses that hit the token limit without it;
- ``rollout_log_probs`` equal the Scorer's recomputation of log softmax(z / τ) in float32, and
  differ from the untempered log-probs (so temperature is included);
- the context limit (a long prompt leaves fewer response tokens) and the ValueErrors.
"""

from __future__ import annotations

import pytest
import torch

from gspo_components.rollout.sampling import TransformersSampler, VLLMSampler
from gspo_components.rollout.scoring import response_log_probs
from gspo_components.testing.tiny import build_char_tokenizer, build_tiny_qwen3

ALPHABET = "0123456789+-*= "
TEMPERATURE = 0.8
N = 4
MAX_TOKENS = 12
CONTEXT = 64
PROMPTS = ["12+34=", "7*8=", "1", "99-100="]
# Measured |engine − Scorer| over sampled tokens in float32: at most 4.8e-6 on this module's model,
# 6.7e-6 on a trained tiny Qwen3 (benchmarks/results/logprob_mismatch.md). 2e-5 leaves room for
# other CPUs' summation orders while staying 3 orders of magnitude below the effect of a wrong
# temperature (> 1e-2, checked below).
LOGPROB_ATOL = 2e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    tok = build_char_tokenizer(ALPHABET, path)
    # A larger init scale than Qwen3's 0.02 makes the logits far from uniform, so temperature and
    # token identity visibly change the log-probs.
    model = build_tiny_qwen3(len(tok), tokenizer=tok, max_position_embeddings=CONTEXT, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def policy(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vllm_sampler(model_dir):
    sampler = VLLMSampler(
        str(model_dir), n=N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=0, dtype="float32"
    )
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def hf_sampler(model_dir):
    return TransformersSampler(
        str(model_dir), n=N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=0, dtype="float32"
    )


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def sampler(request):
    return request.getfixturevalue("vllm_sampler" if request.param == "vllm" else "hf_sampler")


@pytest.fixture(scope="module")
def rollout(sampler):
    return sampler(PROMPTS * 3)


def test_schema(sampler, rollout):
    rows = len(PROMPTS) * 3 * N
    assert rollout.batch_size == torch.Size([rows])
    assert set(rollout.keys()) == set(sampler.out_keys)
    for key, dtype in [
        ("prompt_ids", torch.long),
        ("prompt_mask", torch.bool),
        ("response_ids", torch.long),
        ("response_mask", torch.bool),
        ("rollout_log_probs", torch.float32),
    ]:
        assert rollout[key].dtype == dtype, key
        assert rollout[key].dim() == 2 and rollout[key].shape[0] == rows, key
    assert rollout["prompt_ids"].shape == rollout["prompt_mask"].shape
    assert (
        rollout["response_ids"].shape == rollout["response_mask"].shape == rollout["rollout_log_probs"].shape
    )
    assert rollout["truncated"].dtype == torch.bool and rollout["truncated"].shape == (rows,)
    assert torch.equal(rollout["group_ids"], torch.arange(len(PROMPTS) * 3).repeat_interleave(N))
    assert rollout["response_ids"].shape[1] <= MAX_TOKENS
    assert list(rollout["prompt_text"]) == [p for p in PROMPTS * 3 for _ in range(N)]
    assert len(list(rollout["response_text"])) == rows


def test_prompts_right_padded_and_tokenised(sampler, rollout):
    tok = sampler.tokenizer
    for row, text in enumerate(rollout["prompt_text"]):
        mask = rollout["prompt_mask"][row]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        assert rollout["prompt_ids"][row, :length].tolist() == tok(text)["input_ids"]


def test_responses_end_with_eos_or_are_truncated(sampler, rollout):
    eos = sampler.tokenizer.eos_token_id
    mask, ids = rollout["response_mask"], rollout["response_ids"]
    lengths = mask.sum(-1)
    assert torch.equal(mask, torch.arange(mask.shape[1]) < lengths.unsqueeze(1)), "masks must be prefixes"
    for row in range(mask.shape[0]):
        tokens = ids[row, : int(lengths[row])].tolist()
        assert eos not in tokens[:-1], "nothing may follow the end-of-sequence token"
        if rollout["truncated"][row]:
            assert len(tokens) == MAX_TOKENS and tokens[-1] != eos
        else:
            assert tokens[-1] == eos
    assert rollout["truncated"].any() and (~rollout["truncated"]).any(), "need both kinds in this batch"


def test_response_text_is_decoded_ids(sampler, rollout):
    tok = sampler.tokenizer
    lengths = rollout["response_mask"].sum(-1)
    for row, text in enumerate(rollout["response_text"]):
        ids = rollout["response_ids"][row, : int(lengths[row])].tolist()
        assert text == tok.decode(ids, skip_special_tokens=True)


def test_log_probs_match_scorer_at_temperature(policy, rollout):
    mask = rollout["response_mask"]
    lp = rollout["rollout_log_probs"]
    assert torch.isfinite(lp).all() and (lp[mask] <= 0).all() and (lp[~mask] == 0).all()
    args = (rollout["prompt_ids"], rollout["prompt_mask"], rollout["response_ids"], mask)
    with torch.no_grad():
        tempered = response_log_probs(policy, *args, temperature=TEMPERATURE)
        raw = response_log_probs(policy, *args, temperature=1.0)
    diff = (tempered - lp).abs()[mask]
    assert diff.max() < LOGPROB_ATOL, f"max |rollout - scorer| = {diff.max():.3g}"
    # The untempered log-probs are far off: the engine reports the distribution it sampled from.
    assert (raw - lp).abs()[mask].max() > 1e-2


def test_token_id_prompts_equal_string_prompts(sampler):
    ids = [sampler.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    td = sampler(ids)
    assert list(td["prompt_text"]) == [p for p in PROMPTS[:2] for _ in range(N)]
    assert td["prompt_ids"][0, : len(ids[0])].tolist() == ids[0]
    assert td["prompt_ids"][N, : len(ids[1])].tolist() == ids[1]


def test_calls_draw_fresh_samples(sampler):
    a, b = sampler(["1+1="] * 2), sampler(["1+1="] * 2)
    assert not torch.equal(a["response_ids"], b["response_ids"])


def test_vllm_seeded_requests_reproduce(vllm_sampler):
    params = vllm_sampler.sampling_params(2)
    prompts = [{"prompt_token_ids": vllm_sampler.tokenizer(p)["input_ids"]} for p in PROMPTS[:2]]
    first = vllm_sampler.llm.generate(prompts, params, use_tqdm=False)
    again = vllm_sampler.llm.generate(prompts, params, use_tqdm=False)
    tokens = [[list(c.token_ids) for c in o.outputs] for o in first]
    assert tokens == [[list(c.token_ids) for c in o.outputs] for o in again]


def test_transformers_seed_reproduces(model_dir):
    other = TransformersSampler(str(model_dir), n=N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=0)
    mine = TransformersSampler(str(model_dir), n=N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=0)
    state = torch.get_rng_state()
    a, b = mine(PROMPTS), other(PROMPTS)
    assert torch.equal(a["response_ids"], b["response_ids"])
    assert torch.equal(torch.get_rng_state(), state), "a seeded sampler leaves the global RNG alone"


def test_long_prompt_is_capped_by_the_context(sampler):
    prompt = "1" * (CONTEXT - 3)
    td = sampler([prompt])
    lengths = td["response_mask"].sum(-1)
    assert (lengths <= 3).all()
    eos = sampler.tokenizer.eos_token_id
    for row in range(N):
        ends_with_eos = td["response_ids"][row, int(lengths[row]) - 1] == eos
        assert bool(td["truncated"][row]) == (not ends_with_eos)


def test_transformers_ignores_generation_config_sampling_defaults(model_dir, policy):
    """A model whose generation_config asks for top_k=2 still samples from the full softmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.generation_config.top_k = 2
    model.generation_config.repetition_penalty = 3.0
    sampler = TransformersSampler(
        model,
        n=8,
        max_tokens=MAX_TOKENS,
        temperature=TEMPERATURE,
        seed=1,
        tokenizer=build_char_tokenizer(ALPHABET),
    )
    td = sampler(PROMPTS)
    mask = td["response_mask"]
    with torch.no_grad():
        ref = response_log_probs(
            policy, td["prompt_ids"], td["prompt_mask"], td["response_ids"], mask, temperature=TEMPERATURE
        )
    assert (ref - td["rollout_log_probs"]).abs()[mask].max() < LOGPROB_ATOL
    assert model.generation_config.top_k == 2, "the model's own generation config is restored"


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([], "prompts is empty"),
        (["1" * CONTEXT], "context is 64 tokens"),
        ([""], "prompt 0 is empty"),
        (["1", [4, 5]], "all strings or all token-id lists"),
        ([[4, 999]], "outside"),
        ("12+3", "list of strings"),
    ],
)
def test_bad_prompts_raise(sampler, prompts, match):
    with pytest.raises(ValueError, match=match):
        sampler(prompts)


@pytest.mark.parametrize("cls", [VLLMSampler, TransformersSampler])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0, "max_tokens": 4}, "n \\(samples per prompt\\)"),
        ({"n": 2, "max_tokens": 0}, "max_tokens"),
        ({"n": 2, "max_tokens": 4, "temperature": 0.0}, "temperature"),
    ],
)
def test_bad_arguments_raise_before_loading(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls("/nonexistent/model", **kwargs)


def test_vllm_rejects_raw_logprobs_mode(model_dir):
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMSampler(str(model_dir), n=2, max_tokens=4, logprobs_mode="raw_logprobs")
