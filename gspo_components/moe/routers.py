"""Finding the top-k routers of a transformers mixture-of-experts model, and learning how each
one turns router logits into routing weights.

transformers 5 gives every softmax top-k MoE family one router module (``Qwen3MoeTopKRouter``,
``Qwen2MoeTopKRouter``, ``OlmoeTopKRouter``, ``MixtralTopKRouter``, ...) whose forward maps the
flattened hidden states h [n, H] of one MoE layer to

    (router_logits z [n, E],  routing_weights w [n, K],  selected_experts e [n, K]),

with p = softmax(z) computed in float32, e = top-k(p) and

    w_k = p[e_k]                       (no renormalisation), or
    w_k = p[e_k] / Σ_j p[e_j]          (``norm_topk_prob``; Mixtral always),

cast to the dtype the router returns. The parent MoE block then calls its experts with (e, w).

A router is recognised by what it does, not by its class name: :func:`find_routers` takes every
sub-module whose class name ends in "Router" (any case) and holds a ``weight`` of shape [E, H],
calls it once on a small random input, and keeps it when it returns a 3-tuple (logits [n, E],
weights [n, K] floating, indices [n, K] integer). It then checks which of the two weight rules
above reproduces the router's own weights bit for bit; that rule is what replay applies. A router
that returns the 3-tuple but follows neither rule (sigmoid scores, expert-bias correction,
group-limited routing: DeepSeek-V3, GLM-4-MoE, ...) can be recorded but not replayed, and
replaying it raises a ``ValueError`` that names its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["RouterInfo", "WeightRule", "find_routers", "routing_dtype"]

WeightRule = Literal["softmax", "softmax-renormalized"]


@dataclass(frozen=True)
class RouterInfo:
    """One MoE layer's router.

    Attributes:
        name: the router's qualified name in the model (``model.layers.3.mlp.gate``).
        module: the router module.
        block: the module that owns the router (the MoE block that calls it), or ``None`` when the
            router sits at the top of the model.
        layer: the router's position among the model's MoE layers, in depth order (0-based).
        num_experts: E.
        top_k: K.
        weight_rule: how routing weights follow from the router's softmax probabilities, or
            ``None`` when neither rule reproduces the router's own weights (not replayable).
    """

    name: str
    module: torch.nn.Module
    block: torch.nn.Module | None
    layer: int
    num_experts: int
    top_k: int
    weight_rule: WeightRule | None


def routing_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype that holds expert ids 0 .. E−1: uint8 up to 256 experts, then
    int16 up to 32768, then int32 (as verl and ROLL store routing)."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 1 << 15:
        return torch.int16
    return torch.int32


def replay_weights(
    router_logits: torch.Tensor, experts: torch.Tensor, rule: WeightRule, dtype: torch.dtype
) -> torch.Tensor:
    """w [n, K] = softmax(z)[e] (renormalised over the K chosen experts under
    ``"softmax-renormalized"``), in float32, then cast to ``dtype``; differentiable in z."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights = probs.gather(-1, experts)
    if rule == "softmax-renormalized":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype)


def _probe(module: torch.nn.Module, hidden: int) -> tuple[int, int, WeightRule | None] | None:
    """Call a candidate router on random input: (E, K, weight rule), or None if it is no router."""
    weight = module.weight
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(5, hidden, generator=gen).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        try:
            out = module(x)
        except Exception:  # a module that only looks like a router
            return None
    if not isinstance(out, tuple) or len(out) != 3 or not all(isinstance(t, torch.Tensor) for t in out):
        return None
    logits, weights, indices = out
    if logits.dim() != 2 or weights.dim() != 2 or indices.dim() != 2 or logits.shape[0] != 5:
        return None
    if indices.dtype.is_floating_point or not weights.dtype.is_floating_point:
        return None
    num_experts, top_k = logits.shape[-1], indices.shape[-1]
    if weights.shape != indices.shape or top_k > num_experts:
        return None
    rule: WeightRule | None = None
    for candidate in ("softmax", "softmax-renormalized"):
        if torch.equal(replay_weights(logits, indices.long(), candidate, weights.dtype), weights):
            rule = candidate
            break
    return num_experts, top_k, rule


def find_routers(model: torch.nn.Module) -> list[RouterInfo]:
    """Every top-k router of ``model`` in depth order (module registration order); may be empty."""
    modules = dict(model.named_modules())
    found: list[RouterInfo] = []
    for name, module in modules.items():
        if not type(module).__name__.lower().endswith("router"):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.is_meta:
            continue
        probed = _probe(module, weight.shape[1])
        if probed is None:
            continue
        num_experts, top_k, rule = probed
        parent = modules.get(name.rpartition(".")[0]) if "." in name else None
        found.append(RouterInfo(name, module, parent, len(found), num_experts, top_k, rule))
    return found
