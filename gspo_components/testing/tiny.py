"""Tiny models and character tokenizers, built locally (nothing is downloaded).

Two helpers make a folder that both transformers and vLLM load, and a third warms a model up:

- :func:`build_char_tokenizer`: a character-level tokenizer. Ids are ``<pad>`` = 0, ``<eos>`` = 1,
  ``<unk>`` = 2, then one id per character of ``alphabet`` in the order given. Text is split into
  single characters and decoded by concatenation, so ``decode(encode(s)) == s`` for any ``s``
  drawn from the alphabet. No BOS token is added.
- :func:`build_tiny_qwen3`: a randomly initialised ``Qwen3ForCausalLM`` (by default 2 layers,
  hidden 128, 4 heads, 2 KV heads, head_dim 32; vLLM's CPU attention needs head_dim ≥ 32).
- :func:`build_tiny_qwen3_moe`: the same with a mixture-of-experts MLP in every layer
  (``Qwen3MoeForCausalLM``; by default 8 experts, top-2, expert width 64, normalised top-k
  weights as in Qwen3-30B-A3B).
- :func:`supervised_step`: one optimizer step of cross-entropy on ``(prompt, answer)`` pairs, the
  short supervised warm-up that gives RL a model that is sometimes right.

Example (the demo's model)::

    tok = build_char_tokenizer("0123456789+= ", path)
    model = build_tiny_qwen3(len(tok), tokenizer=tok, path=path)
    # `path` now holds config.json, model.safetensors, generation_config.json and the
    # tokenizer files: VLLMSampler(str(path), ...) and AutoModelForCausalLM.from_pretrained(path)
    # see the same weights and the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM, Qwen3MoeForCausalLM

__all__ = [
    "SPECIAL_TOKENS",
    "build_char_tokenizer",
    "build_tiny_qwen3",
    "build_tiny_qwen3_moe",
    "supervised_step",
]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
"""The special tokens of :func:`build_char_tokenizer`, with ids 0, 1, 2."""


def build_char_tokenizer(
    alphabet: str | Sequence[str], path: str | PathLike[str] | None = None
) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` over ``alphabet``; saved to ``path`` if given.

    Args:
        alphabet: the characters, each one token (duplicates are an error; order fixes the ids,
            which start at ``len(SPECIAL_TOKENS)`` = 3).
        path: a folder to ``save_pretrained`` into (created if missing), or ``None``.

    Returns:
        The tokenizer; ``len(tokenizer)`` = 3 + number of characters. ``pad_token_id`` = 0,
        ``eos_token_id`` = 1, ``unk_token_id`` = 2 (characters outside the alphabet).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(alphabet)
    if not chars:
        raise ValueError("build_char_tokenizer: alphabet must hold at least one character, got none")
    bad = [c for c in chars if len(c) != 1]
    if bad:
        raise ValueError(f"build_char_tokenizer: every alphabet entry must be one character, got {bad!r}")
    dupes = sorted({c for c in chars if chars.count(c) > 1})
    if dupes:
        raise ValueError(f"build_char_tokenizer: alphabet repeats {dupes!r}")
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()  # join characters without the WordLevel default's spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.padding_side = "right"
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(path))
    return tokenizer


def build_tiny_qwen3(
    vocab_size: int,
    path: str | PathLike[str] | None = None,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Qwen3ForCausalLM:
    """A randomly initialised ``Qwen3ForCausalLM``; saved (with ``tokenizer``) to ``path`` if given.

    Args:
        vocab_size: output size; use ``len(tokenizer)``.
        path: a folder to ``save_pretrained`` the model (safetensors, config, generation config)
            and the tokenizer into, or ``None``.
        hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
        intermediate_size: the architecture. vLLM's CPU attention needs ``head_dim`` ≥ 32.
        max_position_embeddings: the context length; the samplers refuse longer prompts and
            vLLM uses it as ``max_model_len``.
        tie_word_embeddings: share the input embedding and the LM head.
        pad_token_id, eos_token_id: written into the config and the generation config (taken
            from ``tokenizer`` when one is given).
        seed: ``torch.manual_seed`` for the initialisation (the global RNG is restored after).
        dtype: parameter dtype, saved as the config's ``dtype`` (vLLM's default dtype).
        tokenizer: saved alongside the model when ``path`` is given.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(
        "build_tiny_qwen3",
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
        ),
        path=path,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        seed=seed,
        dtype=dtype,
        tokenizer=tokenizer,
    )


def build_tiny_qwen3_moe(
    vocab_size: int,
    path: str | PathLike[str] | None = None,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 32,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 64,
    norm_topk_prob: bool = True,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Qwen3MoeForCausalLM:
    """A randomly initialised ``Qwen3MoeForCausalLM`` (every layer sparse); saved like
    :func:`build_tiny_qwen3`.

    Args:
        num_experts: E, experts per MoE layer.
        num_experts_per_tok: K, the router's top-k.
        moe_intermediate_size: each expert's MLP width.
        norm_topk_prob: renormalise the K routing weights to sum to 1 (Qwen3-30B-A3B does).
        The other arguments are those of :func:`build_tiny_qwen3`. The router's auxiliary
        load-balancing loss is off (``output_router_logits=False``): RL losses here do not add it.

    ``save_pretrained`` writes the experts in the per-expert checkpoint layout
    (``mlp.experts.{e}.gate_proj.weight``, ...) that vLLM loads; in memory transformers holds
    them fused (``mlp.experts.gate_up_proj`` [E, 2·I, H]).
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    for name, value in (("num_experts", num_experts), ("num_experts_per_tok", num_experts_per_tok)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"build_tiny_qwen3_moe: {name} must be an integer >= 1, got {value!r}")
    if num_experts_per_tok > num_experts:
        raise ValueError(
            f"build_tiny_qwen3_moe: num_experts_per_tok = {num_experts_per_tok} exceeds num_experts = "
            f"{num_experts}"
        )
    return _build(
        "build_tiny_qwen3_moe",
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=moe_intermediate_size * num_experts_per_tok,
            moe_intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            norm_topk_prob=norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
        ),
        path=path,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        seed=seed,
        dtype=dtype,
        tokenizer=tokenizer,
    )


def _build(
    where: str,
    config_cls: type,
    model_cls: type,
    arch: dict,
    *,
    path: str | PathLike[str] | None,
    pad_token_id: int,
    eos_token_id: int,
    seed: int,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerFast | None,
) -> torch.nn.Module:
    """Shared by the builders: config, seeded initialisation, generation config, optional save."""
    from transformers import GenerationConfig

    if arch["head_dim"] < 32:
        raise ValueError(f"{where}: head_dim must be >= 32 for vLLM's CPU attention, got {arch['head_dim']}")
    vocab_size = arch["vocab_size"]
    if tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad_token_id
        eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos_token_id
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"{where}: vocab_size = {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
            )
    config = config_cls(**arch, pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None)
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_cls(config)
    finally:
        torch.set_rng_state(rng)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None
    )
    model.eval()
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
    return model


def supervised_step(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[tuple[str, str]],
    *,
    prompt_loss: bool = False,
) -> float:
    """One optimizer step of next-token cross-entropy on ``prompt + answer + <eos>``; the loss.

    Rows are right-padded and the padding is masked out of attention and loss. Only the answer
    and ``<eos>`` tokens are trained, unless ``prompt_loss=True``, which trains the prompt's too.
    The model is left in training mode.
    """
    rows = [[*tokenizer.encode(prompt + answer), tokenizer.eos_token_id] for prompt, answer in examples]
    prompt_lengths = torch.tensor([len(tokenizer.encode(prompt)) for prompt, _ in examples])
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    positions = torch.arange(width)
    valid = positions < torch.tensor([len(r) for r in rows]).unsqueeze(1)
    trained = valid if prompt_loss else valid & (positions >= prompt_lengths.unsqueeze(1))
    labels = torch.where(trained, ids, -100)
    model.train()
    loss = model(input_ids=ids, attention_mask=valid.long(), labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())
