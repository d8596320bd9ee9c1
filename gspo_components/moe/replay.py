"""RoutingReplay: record the experts a mixture-of-experts model routes each token to, and force
the same experts in later forwards.

Why. Under a policy update the router of every MoE layer moves, so the same token can be served
by other experts under π_θ than under π_old (or under the inference engine). A per-token
importance ratio π_θ/π_old then compares two different sub-networks. Routing Replay removes that
source of noise by making the training forward use the recorded experts:

- **R2** records the routing in the π_old forward and replays it in the π_θ forwards;
- **R3** ("Rollout Routing Replay", Ma et al., arXiv 2510.11370) records it in the inference
  engine at rollout time and replays it in every training-side forward.

GSPO (Zheng et al., arXiv 2507.18071, §4.3) argues that its sequence-level ratio does not need
either. This module gives both to transformers MoE models.

Replay semantics (those of Megatron-Core's router replay). Inside :meth:`RoutingReplay.replay`,
MoE layer l of token (b, s) uses the given experts e = routed_experts[b, s, l] [K], with weights
taken from the router's *own* softmax probabilities p = softmax(z) at those experts,

    w_k = p[e_k],  or  w_k = p[e_k] / Σ_j p[e_j]  when the router normalises its top-k weights,

so the router still receives a gradient through z. With unchanged weights and the recorded
experts, the replayed forward is bit for bit the recorded one.

Usage::

    replay = RoutingReplay(model)                 # ValueError naming the class of a dense model
    with replay.record() as rec:
        model(input_ids=ids, attention_mask=attn)
    rec.routed_experts                            # [B, S, L, K], uint8 for up to 256 experts
    with replay.replay(rec.routed_experts) as cmp:
        out = model(input_ids=ids, attention_mask=attn)
    cmp.rerouted                                  # [B, S, L] bool: router's own top-k set differs

On leaving a context, every hook is removed, also when an exception escapes the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .routers import RouterInfo, find_routers, replay_weights, routing_dtype

__all__ = ["RoutingComparison", "RoutingRecord", "RoutingReplay"]


def _shape(t: torch.Tensor | tuple[int, ...]) -> str:
    dims = t.shape if isinstance(t, torch.Tensor) else t
    return "[" + ", ".join(str(int(d)) for d in dims) + "]"


def _join(where: str, what: str, forwards: list[torch.Tensor]) -> torch.Tensor:
    """One forward's tensor, or several joined along the sequence dimension (dim 1)."""
    if not forwards:
        raise ValueError(f"{where}: no forward of the model ran inside the block, so there is no {what}")
    if len(forwards) == 1:
        return forwards[0]
    batch = {f.shape[0] for f in forwards}
    if len(batch) != 1:
        raise ValueError(
            f"{where}: the block ran {len(forwards)} forwards of different batch sizes {sorted(batch)}; "
            f"their {what} cannot be joined along the sequence; read .per_forward instead"
        )
    return torch.cat(forwards, dim=1)


class RoutingRecord:
    """What :meth:`RoutingReplay.record` captured.

    ``per_forward`` holds one [B, S, L, K] tensor per forward of the model inside the block.
    ``routed_experts`` is that tensor when one forward ran. When several ran with the same batch
    size (a prefill followed by KV-cached decoding steps, as in ``generate``) they are joined along
    the sequence dimension, in the order they ran: position j of the result is the j-th token the
    model was fed.
    """

    def __init__(self) -> None:
        self.per_forward: list[torch.Tensor] = []

    @property
    def routed_experts(self) -> torch.Tensor:
        """[B, S, L, K] integer (the smallest dtype that holds the expert ids)."""
        return _join("RoutingRecord", "routed_experts", self.per_forward)


class RoutingComparison:
    """What :meth:`RoutingReplay.replay` and :meth:`RoutingReplay.compare` measured.

    ``rerouted`` [B, S, L] bool: at (token, layer), the router's own top-k expert *set* in this
    forward differs from the given one (order within the K does not count). Positions outside the
    replay mask are ``False``. Several forwards are joined as in :class:`RoutingRecord`.
    """

    def __init__(self) -> None:
        self.per_forward: list[torch.Tensor] = []

    @property
    def rerouted(self) -> torch.Tensor:
        return _join("RoutingComparison", "rerouted", self.per_forward)


class RoutingReplay:
    """Record and replay the expert routing of a transformers mixture-of-experts model.

    Args:
        model: a transformers MoE model (``Qwen3MoeForCausalLM``, ``Qwen2MoeForCausalLM``,
            ``OlmoeForCausalLM``, ``MixtralForCausalLM``, ... or their backbones). Its routers are
            found as described in :mod:`gspo_components.moe.routers`.

    Attributes:
        routers: one :class:`~gspo_components.moe.routers.RouterInfo` per MoE layer, depth order.
        num_layers (L), top_k (K), num_experts (E, the largest over layers), dtype (storage dtype of
        recorded routing).

    Raises:
        ValueError: the model has no router this module knows (the message names the class), or
            its MoE layers disagree on K.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.routers: list[RouterInfo] = find_routers(model)
        if not self.routers:
            raise ValueError(
                f"RoutingReplay: {type(model).__name__} has no mixture-of-experts router that returns "
                "(router_logits, routing_weights, selected_experts); dense models have no routing to "
                "record or replay"
            )
        ks = sorted({r.top_k for r in self.routers})
        if len(ks) != 1:
            raise ValueError(
                f"RoutingReplay: the MoE layers of {type(model).__name__} choose different numbers of "
                f"experts per token ({ks}); routed_experts [B, S, L, K] needs one K"
            )
        self.num_layers = len(self.routers)
        self.top_k = ks[0]
        self.num_experts = max(r.num_experts for r in self.routers)
        self.dtype = routing_dtype(self.num_experts)
        self._active = False

    # -- hooks -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _hooks(self, where: str, on_route: Any) -> Iterator[None]:
        """Install a shape-tracking pre-hook on each MoE block and ``on_route`` on each router."""
        if self._active:
            raise ValueError(f"{where}: another record/replay/compare block of this RoutingReplay is open")
        self._active = True
        shapes: dict[int, tuple[int, ...] | None] = {}
        handles = []
        try:
            for info in self.routers:
                if info.block is not None:

                    def pre_hook(module, args, kwargs, layer=info.layer):
                        hidden = args[0] if args else kwargs.get("hidden_states")
                        shapes[layer] = (
                            tuple(hidden.shape[:-1])
                            if isinstance(hidden, torch.Tensor) and hidden.dim() == 3
                            else None
                        )

                    handles.append(info.block.register_forward_pre_hook(pre_hook, with_kwargs=True))

                def hook(module, args, output, info=info):
                    return on_route(info, shapes.get(info.layer), output)

                handles.append(info.module.register_forward_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()
            self._active = False

    @staticmethod
    def _token_shape(shape: tuple[int, ...] | None, n: int) -> tuple[int, int]:
        if shape is not None and len(shape) == 2 and shape[0] * shape[1] == n:
            return shape[0], shape[1]
        return 1, n  # a router called on tokens without a [B, S] layout

    # -- record ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def record(self) -> Iterator[RoutingRecord]:
        """Record the top-k experts of every MoE layer for every forward inside the block."""
        rec = RoutingRecord()
        layers: list[torch.Tensor] = []
        shape_of_forward: list[tuple[int, int]] = []

        def flush() -> None:
            if layers:
                b, s = shape_of_forward[0]
                stacked = torch.stack(layers, dim=1)  # [n, L, K]
                rec.per_forward.append(stacked.reshape(b, s, len(layers), self.top_k))
                layers.clear()
                shape_of_forward.clear()

        def on_route(info: RouterInfo, shape: tuple[int, ...] | None, output: Any) -> None:
            indices = output[2]
            if info.layer == 0:
                flush()
                shape_of_forward.append(self._token_shape(shape, indices.shape[0]))
            elif len(layers) != info.layer:
                raise RuntimeError(
                    f"RoutingReplay.record: MoE layer {info.layer} ({info.name}) ran out of depth order"
                )
            layers.append(indices.detach().to(self.dtype))

        with self._hooks("RoutingReplay.record", on_route):
            try:
                yield rec
            finally:
                flush()

    # -- replay / compare --------------------------------------------------------------------

    def _check_routing(
        self, where: str, routed_experts: Any, mask: Any, force: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(routed_experts, torch.Tensor):
            raise ValueError(
                f"{where}: 'routed_experts' must be an integer torch.Tensor [B, S, L, K], got "
                f"{type(routed_experts).__name__}"
            )
        if (
            routed_experts.dtype.is_floating_point
            or routed_experts.dtype.is_complex
            or (routed_experts.dtype == torch.bool)
        ):
            raise ValueError(
                f"{where}: 'routed_experts' must hold integer expert ids, got {routed_experts.dtype}"
            )
        if routed_experts.dim() != 4 or routed_experts.shape[2:] != (self.num_layers, self.top_k):
            raise ValueError(
                f"{where}: 'routed_experts' must have shape [B, S, L, K] = [B, S, {self.num_layers}, "
                f"{self.top_k}] for this model ({self.num_layers} MoE layers, top-{self.top_k}), got "
                f"{_shape(routed_experts)}"
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != routed_experts.shape[:2]:
                got = _shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"{where}: 'mask' must have shape [B, S] = {_shape(routed_experts.shape[:2])} like "
                    f"'routed_experts', got {got}"
                )
            mask = mask.bool()
        if force:
            for info in self.routers:
                if info.weight_rule is None:
                    raise ValueError(
                        f"{where}: the router {info.name} ({type(info.module).__name__}) does not weight "
                        "experts by its softmax probabilities, so its routing can be recorded but not "
                        "replayed"
                    )
            forced = routed_experts if mask is None else routed_experts[mask]
            if forced.numel() and (int(forced.min()) < 0 or int(forced.max()) >= self.num_experts):
                raise ValueError(
                    f"{where}: 'routed_experts' holds expert ids outside [0, {self.num_experts}) at "
                    f"replayed positions: min {int(forced.min())}, max {int(forced.max())}"
                )
        if getattr(self.model, "is_gradient_checkpointing", False) and self.model.training:
            raise ValueError(
                f"{where}: gradient checkpointing recomputes the forward during backward, outside this "
                "block, where the routing would not be replayed; disable it "
                "(model.gradient_checkpointing_disable()) to replay routing"
            )
        return routed_experts, mask

    @contextlib.contextmanager
    def _replay(self, where: str, routed_experts: Any, mask: Any, force: bool) -> Iterator[RoutingComparison]:
        routed, mask = self._check_routing(where, routed_experts, mask, force)
        device = self.routers[0].module.weight.device
        b, s = routed.shape[:2]
        n = b * s
        # Per layer, once per block: the given experts [n, K] (long, contiguous), their sorted copy
        # for the set comparison, and the replay mask [n, 1].
        flat = routed.to(device=device, dtype=torch.long).reshape(n, self.num_layers, self.top_k)
        given = [flat[:, layer].contiguous() for layer in range(self.num_layers)]
        given_sorted = [g.sort(-1).values for g in given]
        keep = mask.to(device).reshape(n, 1) if mask is not None else None
        cmp = RoutingComparison()
        layers: list[torch.Tensor] = []
        shape_of_forward: list[tuple[int, int]] = []

        def flush() -> None:
            if layers:
                b, s = shape_of_forward[0]
                cmp.per_forward.append(torch.stack(layers, dim=-1).reshape(b, s, len(layers)))
                layers.clear()
                shape_of_forward.clear()

        def on_route(info: RouterInfo, shape: tuple[int, ...] | None, output: Any) -> Any:
            logits, own_weights, own_experts = output
            if (shape is not None and tuple(shape) != (b, s)) or (
                shape is None and own_experts.shape[0] != n
            ):
                runs = f"[{shape[0]}, {shape[1]}]" if shape is not None else str(own_experts.shape[0])
                expected = (
                    f"[{shape[0]}, {shape[1]}, {self.num_layers}, {self.top_k}]"
                    if shape is not None
                    else f"[B, S, {self.num_layers}, {self.top_k}] with B·S = {own_experts.shape[0]}"
                )
                raise ValueError(
                    f"{where}: the forward runs {runs} tokens, so 'routed_experts' must have shape "
                    f"{expected}, got {_shape(routed)}"
                )
            if info.layer == 0:
                flush()
                shape_of_forward.append((b, s))
            own = own_experts.detach().long()
            rerouted = (own.sort(-1).values != given_sorted[info.layer]).any(-1)
            if keep is not None:
                rerouted = rerouted & keep[:, 0]
            layers.append(rerouted)
            if not force:
                return None
            chosen = given[info.layer] if keep is None else torch.where(keep, given[info.layer], own)
            weights = replay_weights(logits, chosen, info.weight_rule, own_weights.dtype)  # type: ignore[arg-type]
            return logits, weights, chosen.to(own_experts.dtype)

        with self._hooks(where, on_route):
            try:
                yield cmp
            finally:
                flush()

    def replay(self, routed_experts: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
        """Context manager: every forward inside uses ``routed_experts`` [B, S, L, K].

        Args:
            routed_experts: the experts of each token (b, s) at each MoE layer l (any integer
                dtype). B and S must be those of every forward inside the block.
            mask: optional [B, S] bool: replay only where ``True``; elsewhere (padding, tokens
                whose routing is unknown) the router routes freely. ``None`` replays everywhere.

        Yields a :class:`RoutingComparison` whose ``rerouted`` says where the router would have
        chosen other experts. Raises ``ValueError`` for a wrong shape (naming the expected and the
        received shape), expert ids outside [0, E), or a router that cannot be replayed.
        """
        return self._replay("RoutingReplay.replay", routed_experts, mask, force=True)

    def compare(self, routed_experts: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
        """Context manager like :meth:`replay`, but the model routes freely: it only measures
        where its routing differs from ``routed_experts`` (the routing metrics without replay)."""
        return self._replay("RoutingReplay.compare", routed_experts, mask, force=False)
