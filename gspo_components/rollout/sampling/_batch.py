"""Shared by the samplers: argument checks, prompt tokenisation and the rollout TensorDict.

The rollout layout (see the key schema in docs/concepts.md), for P prompts and n samples each, N = P·n rows
in prompt-major order (row ``i·n + k`` is sample k of prompt i):

- ``prompt_ids`` [N, P_max] long, ``prompt_mask`` [N, P_max] bool: the prompt, right-padded;
- ``response_ids`` [N, T] long, ``response_mask`` [N, T] bool: the generated tokens, right-padded,
  including the end-of-sequence token when the response stopped on one;
- ``rollout_log_probs`` [N, T] float32: log-prob of each response token under the distribution
  it was sampled from (0 at padding);
- ``truncated`` [N] bool: stopped at the token limit without an end-of-sequence token;
- ``group_ids`` [N] long: i for every sample of prompt i;
- ``prompt_text``, ``response_text`` [N]: strings (NonTensorStack).

Padding positions hold ``pad_id`` in the id tensors and 0 in ``rollout_log_probs``; every part
masks them out. T is the longest response of the batch (at least 1, so that a batch whose
responses are all empty still has a response dimension).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from tensordict import NonTensorStack, TensorDict

PromptsLike = Sequence[str] | Sequence[Sequence[int]]

ROLLOUT_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "response_ids",
    "response_mask",
    "rollout_log_probs",
    "truncated",
    "group_ids",
    "prompt_text",
    "response_text",
)
"""The keys every sampler writes (its ``out_keys``)."""


def check_sampler_args(where: str, n: int, max_tokens: int, temperature: float) -> tuple[int, int, float]:
    """Validate the hyper-parameters shared by both samplers."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: n (samples per prompt) must be an integer >= 1, got {n!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"{where}: max_tokens must be an integer >= 1, got {max_tokens!r}")
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: temperature must be a number, got {temperature!r}") from None
    if not temperature > 0.0 or temperature == float("inf"):
        raise ValueError(
            f"{where}: temperature must be in (0, inf), got {temperature}; greedy decoding (0) has no "
            "sampling distribution to report log-probs of"
        )
    return n, max_tokens, temperature


def tokenize_prompts(
    where: str, prompts: Any, tokenizer: Any, context: int, vocab_size: int
) -> tuple[list[list[int]], list[str]]:
    """Token ids and texts of ``prompts`` (all strings, or all token-id sequences), validated.

    Strings are encoded with ``tokenizer(...)`` (its special tokens included, as vLLM does for a
    string prompt); token ids are kept as given and decoded for the text. Raises ``ValueError``
    for an empty list, an empty prompt, a prompt with ``context`` tokens or more (no room left
    for one response token), ids outside ``[0, vocab_size)``, or a mix of kinds.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"{where}: prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}"
        )
    if len(prompts) == 0:
        raise ValueError(f"{where}: prompts is empty; pass at least one prompt")
    if all(isinstance(p, str) for p in prompts):
        texts = list(prompts)
        ids = [list(x) for x in tokenizer(texts)["input_ids"]]
    elif all(not isinstance(p, (str, bytes)) and isinstance(p, Sequence | torch.Tensor) for p in prompts):
        ids = []
        for i, p in enumerate(prompts):
            row = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
                raise ValueError(f"{where}: prompt {i} must hold integer token ids, got {row[:8]!r}...")
            ids.append(row)
        texts = [tokenizer.decode(row) for row in ids]
    else:
        kinds = sorted({type(p).__name__ for p in prompts})
        raise ValueError(f"{where}: prompts must be all strings or all token-id lists, got a mix of {kinds}")
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise ValueError(
                f"{where}: prompt {i} is empty (0 tokens); every prompt needs at least one token"
            )
        if len(row) >= context:
            raise ValueError(
                f"{where}: prompt {i} has {len(row)} tokens but the model's context is {context} tokens; "
                "a prompt must be shorter than the context to leave room for a response"
            )
        low, high = min(row), max(row)
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{where}: prompt {i} holds token ids outside [0, {vocab_size}): min {low}, max {high}"
            )
    return ids, texts


def _pad(
    rows: Sequence[Sequence[Any]], width: int, fill: Any, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    out = torch.full((len(rows), width), fill, dtype=dtype)
    flat = list(itertools.chain.from_iterable(rows))
    if flat:  # row-major order of the mask's True entries is the order of `flat`
        out.masked_scatter_(mask, torch.tensor(flat, dtype=dtype))
    return out, mask


def build_rollout(
    prompt_ids: Sequence[Sequence[int]],
    prompt_text: Sequence[str],
    n: int,
    response_ids: Sequence[Sequence[int]],
    response_log_probs: Sequence[Sequence[float]],
    truncated: Sequence[bool],
    response_text: Sequence[str],
    pad_id: int,
) -> TensorDict:
    """The rollout TensorDict (see module doc). Prompt lists have one entry per prompt; response
    lists have one entry per row (``len(prompt_ids) * n``), prompt-major."""
    rows = len(prompt_ids) * n
    if not (len(response_ids) == len(response_log_probs) == len(truncated) == len(response_text) == rows):
        raise ValueError(
            f"build_rollout: {len(prompt_ids)} prompts x n = {n} need {rows} responses, got "
            f"{len(response_ids)} ids, {len(response_log_probs)} log-prob rows, {len(truncated)} flags, "
            f"{len(response_text)} texts"
        )
    for i, (ids, lps) in enumerate(zip(response_ids, response_log_probs, strict=True)):
        if len(ids) != len(lps):
            raise ValueError(f"build_rollout: response {i} has {len(ids)} tokens but {len(lps)} log-probs")
    p_ids, p_mask = _pad(prompt_ids, max(len(p) for p in prompt_ids), pad_id, torch.long)
    width = max(1, max((len(r) for r in response_ids), default=0))
    r_ids, r_mask = _pad(response_ids, width, pad_id, torch.long)
    lp, _ = _pad(response_log_probs, width, 0.0, torch.float32)
    group_ids = torch.arange(len(prompt_ids), dtype=torch.long).repeat_interleave(n)
    td = TensorDict(
        {
            "prompt_ids": p_ids.repeat_interleave(n, dim=0),
            "prompt_mask": p_mask.repeat_interleave(n, dim=0),
            "response_ids": r_ids,
            "response_mask": r_mask,
            "rollout_log_probs": lp,
            "truncated": torch.tensor(list(truncated), dtype=torch.bool),
            "group_ids": group_ids,
        },
        batch_size=[rows],
    )
    td.set("prompt_text", NonTensorStack(*[t for t in prompt_text for _ in range(n)]))
    td.set("response_text", NonTensorStack(*response_text))
    return td
