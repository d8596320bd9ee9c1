"""Tiny models and a character tokenizer, built in the test (nothing is downloaded).

The vocabulary is 16 tokens: ``<pad>`` (0), ``<eos>`` (1), the digits, ``+``, ``=``, space and
``-``. A 16-way output makes a random model stop (emit ``<eos>``) often enough that responses have
varied lengths, which the normalisation tests need.
"""

from __future__ import annotations

import os

import pytest
import torch

# Nothing is downloaded: keep the Hub libraries offline and their telemetry off (set before
# transformers / huggingface_hub are imported by the test modules of this directory).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CHARS = list("0123456789+= -")
SPECIAL = ["<pad>", "<eos>"]
VOCAB_SIZE = len(SPECIAL) + len(CHARS)


def make_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_model(seed: int = 0):  # -> transformers.Qwen3ForCausalLM
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).float()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The character tokenizer (``<pad>`` = 0, ``<eos>`` = 1)."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_model():
    """A factory: ``make_tiny_model(seed)`` builds a fresh 1-layer Qwen3 in float32."""
    return make_model
