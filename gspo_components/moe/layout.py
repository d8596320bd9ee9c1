"""The ``routed_experts`` key: routing aligned to the token sequence the Scorer forwards.

The Scorer forwards, for row i, ``cat(prompt_ids[i], response_ids[i])``: P prompt columns (the
prompt right-padded to the batch's longest, P) followed by T response columns (right-padded). So

    routed_experts [N, P + T, L, K]:  column j < P       → prompt token j        (valid if j < p_i),
                                      column P + t       → response token t      (valid if t < r_i),

with p_i and r_i the row's prompt and response lengths, L the MoE layers in depth order and K the
experts per token. Padding columns may hold anything.

Samplers see each row as one contiguous sequence x_0 .. x_{p_i + r_i − 1} and report routing for
its first positions (vLLM: ``[seq_len − 1, L, K]``, every token but the last, which is sampled but
never fed back). :func:`to_scorer_layout` moves position j < p_i to column j and position
p_i + t to column P + t.

The replay mask (:func:`routing_mask`) is every valid prompt and response column except each
row's last response token: that token's routing reaches no scored log-prob (no later valid
position attends to it) and no engine reports it, so it routes freely and is not counted in the
routing metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["routing_mask", "to_scorer_layout"]


def routing_mask(prompt_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N, P + T] bool: the columns whose routing is replayed and measured (module doc)."""
    response_mask = response_mask.bool()
    t = torch.arange(response_mask.shape[1], device=response_mask.device)
    lengths = response_mask.long().sum(-1, keepdim=True)
    last = t.unsqueeze(0) == lengths - 1
    return torch.cat([prompt_mask.bool(), response_mask & ~last], dim=1)


def to_scorer_layout(
    routing: Sequence[torch.Tensor],
    prompt_lengths: Sequence[int],
    prompt_width: int,
    response_width: int,
    *,
    num_layers: int,
    top_k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[N, P + T, L, K] ``routed_experts`` from per-row contiguous routing.

    Args:
        routing: row i's routing, [m_i, L, K] for its first m_i positions (prompt, then response).
        prompt_lengths: p_i.
        prompt_width: P, the batch's padded prompt width.
        response_width: T, the batch's padded response width.
        num_layers, top_k: L and K (the shape of an empty batch).
        dtype: the storage dtype.

    Positions beyond a row's prompt + T response columns are dropped; columns with no reported
    routing hold 0.
    """
    out = torch.zeros(len(routing), prompt_width + response_width, num_layers, top_k, dtype=dtype)
    for i, (rows, p) in enumerate(zip(routing, prompt_lengths, strict=True)):
        rows = torch.as_tensor(rows)
        if rows.dim() != 3 or rows.shape[1:] != (num_layers, top_k):
            raise ValueError(
                f"to_scorer_layout: row {i}'s routing must have shape [m, {num_layers}, {top_k}], got "
                f"{list(rows.shape)}"
            )
        if p > prompt_width:
            raise ValueError(f"to_scorer_layout: prompt {i} has {p} tokens, wider than P = {prompt_width}")
        head = rows[:p]
        out[i, : head.shape[0]] = head.to(dtype)
        tail = rows[p : p + response_width]
        out[i, prompt_width : prompt_width + tail.shape[0]] = tail.to(dtype)
    return out
