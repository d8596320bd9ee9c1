"""Mixture-of-experts support: Routing Replay (R2 / R3) for transformers MoE models, the
``routed_experts`` key layout, and the routing metrics. See docs/moe.md."""

from .layout import routing_mask, to_scorer_layout
from .metrics import rerouted_pairs, routing_metrics
from .replay import RoutingComparison, RoutingRecord, RoutingReplay
from .routers import RouterInfo, find_routers, routing_dtype

__all__ = [
    "RouterInfo",
    "RoutingComparison",
    "RoutingRecord",
    "RoutingReplay",
    "find_routers",
    "rerouted_pairs",
    "routing_dtype",
    "routing_mask",
    "routing_metrics",
    "to_scorer_layout",
]
