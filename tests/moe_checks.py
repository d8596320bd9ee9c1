"""Shared by the mixture-of-experts tests: read the routing a forward really used, independently
of ``gspo_components.moe``, from what each MoE block's experts module receives."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def experts_used(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yields a list filled, per forward, with each MoE layer's top_k_index [n, K] as the experts
    module (``model.model.layers[l].mlp.experts``, called as ``experts(hidden, top_k_index,
    top_k_weights)``) received it."""
    seen: list[torch.Tensor] = []
    handles = [
        layer.mlp.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
        for layer in model.model.layers
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
