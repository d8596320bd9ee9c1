"""Scorer: per-token log-probs of the sampled responses under a transformers causal LM.

For response tokens y_{i,t} after prompt x_i,

    ℓ_{i,t} = log softmax(z_{i,t} / τ)[y_{i,t}],   z_{i,t} = logits of the model at the position
                                                     that predicts y_{i,t},

in float32 whatever the model's dtype, with τ the sampling temperature (so that π_old, π_θ and
the engine's log-probs describe the same distribution). The same module serves

- the policy (with gradient): ``Scorer(model)``;
- π_old (``Scorer(model, out_key="old_log_probs", grad=False)``);
- the reference model (``Scorer(ref_model, out_key="ref_log_probs", grad=False)``).

Layout. Prompts and responses are both right-padded, so each row is ``[prompt | pad | response |
pad]``. The two are concatenated, padding is masked out of attention, and position ids count
valid tokens only, so every row sees exactly ``prompt ++ response``. The first response token is
predicted from the last valid prompt position, token t > 0 from the position before it.

Fused head (default). The model runs to its last hidden state and
:func:`~gspo_components.fused.linear_log_probs` applies the LM head chunk by chunk: no
``[N, T, V]`` logits tensor is ever formed. ``fused=False`` materialises the logits instead
(useful as a reference). Models whose head is not a plain linear map (final logit soft-capping,
scaled logits) are refused on the fused path.

Routing (mixture-of-experts models). ``routing=`` makes the forward record or replay the expert
routing through :class:`~gspo_components.moe.RoutingReplay`, in the ``routed_experts`` layout
[N, P + T, L, K] of :mod:`gspo_components.moe.layout` (the columns of the concatenated
``prompt ++ response`` this Scorer forwards):

- ``"record"`` writes ``routed_experts`` (R2's π_old pass);
- ``"replay"`` reads it and forces those experts on the replay mask (valid tokens but each row's
  last response token), and writes ``rerouted`` [N, P + T, L] bool: where the router's own top-k
  set differs from the replayed one (R2's and R3's π_θ passes, R3's π_old pass);
- ``"compare"`` reads it and writes ``rerouted`` without replaying (routing metrics without replay).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Literal

import torch
from tensordict import TensorDictBase

from ._checks import check_mask, check_range
from ._module import KeyedModule, KeyOverrides
from .fused import linear_log_probs

__all__ = ["Scorer", "response_log_probs"]


def _layout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, position_ids [N, P+T] and the predicting positions [N, T]."""
    p = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([prompt_mask, response_mask], dim=1)
    # Padding tokens may be anything (even out of vocabulary); feed a valid id there.
    input_ids = torch.where(attention, input_ids, torch.zeros_like(input_ids))
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
    prompt_len = prompt_mask.long().sum(-1, keepdim=True)
    t = torch.arange(response_ids.shape[1], device=response_ids.device).unsqueeze(0)
    predict_pos = torch.where(t == 0, prompt_len - 1, p + t - 1)
    return input_ids, attention.long(), position_ids, predict_pos


def _head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"Scorer: {type(model).__name__} has no linear output embedding to fuse")
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(
                f"Scorer: fused=True needs a plain linear head, but config.{attr} = "
                f"{getattr(config, attr)}; use fused=False"
            )
    return head.weight, getattr(head, "bias", None)


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    prefix = getattr(model, "base_model_prefix", "model")
    backbone = getattr(model, prefix, None)
    if backbone is None:
        raise ValueError(f"Scorer: cannot find the backbone '{prefix}' of {type(model).__name__}")
    return backbone


def response_log_probs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    fused: bool = True,
    chunk_size: int | None = None,
    backend: str = "auto",
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ℓ_{i,t} [N, T] (float32, 0 at padding) of ``response_ids`` under ``model`` (see module doc)."""
    where = "response_log_probs"
    temperature = check_range(where, "temperature", temperature, 0.0, None, low_inclusive=False)
    response_mask = check_mask(where, "response_mask", response_mask)
    prompt_mask = check_mask(where, "prompt_mask", prompt_mask)
    if prompt_ids.shape != prompt_mask.shape or response_ids.shape != response_mask.shape:
        raise ValueError(
            f"{where}: ids and masks must match: prompt_ids {list(prompt_ids.shape)} vs prompt_mask "
            f"{list(prompt_mask.shape)}, response_ids {list(response_ids.shape)} vs response_mask "
            f"{list(response_mask.shape)}"
        )
    if prompt_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(
            f"{where}: prompt_ids has {prompt_ids.shape[0]} rows but response_ids has {response_ids.shape[0]}"
        )
    if bool((prompt_mask.sum(-1) == 0).any()):
        raise ValueError(
            f"{where}: every row needs at least one prompt token ('prompt_mask' has an empty row)"
        )
    input_ids, attention, position_ids, predict_pos = _layout(
        prompt_ids, prompt_mask, response_ids, response_mask
    )
    targets = torch.where(response_mask, response_ids, torch.full_like(response_ids, -100))
    if fused:
        weight, bias = _head(model)
        out = _backbone(model)(input_ids=input_ids, attention_mask=attention, position_ids=position_ids)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden = hidden.gather(1, predict_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return linear_log_probs(
            hidden.to(weight.dtype),
            weight,
            targets,
            temperature=temperature,
            bias=bias,
            chunk_size=chunk_size,
            backend=backend,
            return_entropy=return_entropy,
        )
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).logits
    logits = logits.gather(1, predict_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    log_softmax = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = log_softmax.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(response_mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    if not return_entropy:
        return lp
    ent = -(log_softmax.exp() * log_softmax).sum(-1)
    return lp, torch.where(response_mask, ent, torch.zeros((), dtype=ent.dtype, device=ent.device))


class Scorer(KeyedModule):
    """Reads ``prompt_ids``, ``prompt_mask``, ``response_ids``, ``response_mask``; writes
    ``log_probs`` (renamable with ``out_key``) [N, T] float32, and ``entropy`` when asked.

    Args:
        model: a transformers causal LM (or any module with ``get_output_embeddings`` and a
            backbone under ``base_model_prefix`` returning ``last_hidden_state``).
        temperature: τ of the sampler.
        out_key: where to write the log-probs (``"log_probs"``, ``"old_log_probs"``,
            ``"ref_log_probs"``).
        grad: keep the graph (policy) or run under ``torch.no_grad`` (π_old, reference).
        micro_batch_size: score this many rows at a time (``grad=False`` only) to bound memory.
        fused, chunk_size, backend: see :func:`response_log_probs`.
        return_entropy: also write ``entropy`` [N, T].
        routing: ``None``, ``"record"``, ``"replay"`` or ``"compare"`` (module doc; MoE models
            only). Renamable keys: ``routed_experts`` and ``rerouted``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        temperature: float = 1.0,
        out_key: str | tuple[str, ...] = "log_probs",
        grad: bool = True,
        micro_batch_size: int | None = None,
        fused: bool = True,
        chunk_size: int | None = None,
        backend: str = "auto",
        return_entropy: bool = False,
        routing: Literal["record", "replay", "compare"] | None = None,
        in_keys: KeyOverrides = None,
        out_keys: KeyOverrides = None,
    ) -> None:
        super().__init__()
        self.model = model
        if routing not in (None, "record", "replay", "compare"):
            raise ValueError(
                f"Scorer: routing must be None, 'record', 'replay' or 'compare', got {routing!r}"
            )
        self.routing = routing
        self.routing_replay = None
        if routing is not None:
            from .moe import RoutingReplay

            self.routing_replay = RoutingReplay(model)
        self.temperature = check_range("Scorer", "temperature", temperature, 0.0, None, low_inclusive=False)
        self.grad = grad
        if micro_batch_size is not None and (grad or micro_batch_size < 1):
            raise ValueError(
                f"Scorer: micro_batch_size needs grad=False and a value >= 1, got {micro_batch_size} "
                f"with grad={grad}"
            )
        self.micro_batch_size = micro_batch_size
        self.fused, self.chunk_size, self.backend = fused, chunk_size, backend
        self.return_entropy = return_entropy
        in_names = ["prompt_ids", "prompt_mask", "response_ids", "response_mask"]
        out_names = ["log_probs", "entropy"] if return_entropy else ["log_probs"]
        if routing == "record":
            out_names.append("routed_experts")
        elif routing is not None:
            in_names.append("routed_experts")
            out_names.append("rerouted")
        overrides = dict(out_keys) if isinstance(out_keys, Mapping) else {}
        if out_keys is not None and not isinstance(out_keys, Mapping):
            raise ValueError(f"Scorer: out_keys must be a mapping from output name to key, got {out_keys!r}")
        overrides.setdefault("log_probs", out_key)
        self._setup_keys(in_names, out_names, in_keys, overrides)

    def _score(self, td: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(log-probs, entropy or None, recorded routing / rerouted or None) of one chunk."""
        prompt_mask, response_mask = self._read(td, "prompt_mask"), self._read(td, "response_mask")

        def run() -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            return response_log_probs(
                self.model,
                self._read(td, "prompt_ids"),
                prompt_mask,
                self._read(td, "response_ids"),
                response_mask,
                temperature=self.temperature,
                fused=self.fused,
                chunk_size=self.chunk_size,
                backend=self.backend,
                return_entropy=self.return_entropy,
            )

        routing = None
        if self.routing_replay is None:
            out = run()
        elif self.routing == "record":
            with self.routing_replay.record() as rec:
                out = run()
            routing = rec.routed_experts
        else:
            from .moe import routing_mask

            routed = self._read(td, "routed_experts")
            replay = self.routing_replay
            expected = (
                prompt_mask.shape[0],
                prompt_mask.shape[1] + response_mask.shape[1],
                replay.num_layers,
                replay.top_k,
            )
            if not isinstance(routed, torch.Tensor) or tuple(routed.shape) != expected:
                got = list(routed.shape) if isinstance(routed, torch.Tensor) else type(routed).__name__
                raise ValueError(
                    f"Scorer: {self._in_map['routed_experts']!r} must have shape [N, P + T, L, K] = "
                    f"{list(expected)} (the prompt ++ response columns this Scorer forwards, "
                    f"{replay.num_layers} MoE layers, top-{replay.top_k}), got {got}"
                )
            mask = routing_mask(check_mask("Scorer", "prompt_mask", prompt_mask), response_mask.bool())
            context = self.routing_replay.replay if self.routing == "replay" else self.routing_replay.compare
            with context(routed, mask) as cmp:
                out = run()
            routing = cmp.rerouted
        lp, ent = out if isinstance(out, tuple) else (out, None)
        return lp, ent, routing

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        ctx = contextlib.nullcontext() if self.grad else torch.no_grad()
        with ctx:
            if self.micro_batch_size is None:
                lp, ent, routing = self._score(td)
            else:
                parts = [
                    self._score(td[i : i + self.micro_batch_size])
                    for i in range(0, td.shape[0], self.micro_batch_size)
                ]
                lp = torch.cat([p[0] for p in parts])
                ent = torch.cat([p[1] for p in parts]) if self.return_entropy else None
                routing = torch.cat([p[2] for p in parts]) if self.routing is not None else None
        td.set(self._out_map["log_probs"], lp)
        if ent is not None:
            td.set(self._out_map["entropy"], ent)
        if routing is not None:
            name = "routed_experts" if self.routing == "record" else "rerouted"
            td.set(self._out_map[name], routing.to(lp.device))
        return td
