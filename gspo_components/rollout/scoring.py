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
from typing import TYPE_CHECKING, Literal

import torch
from tensordict import TensorDictBase

from ..fused import linear_log_probs
from ..loss._checks import check_mask, check_range
from ..loss._module import KeyedModule, KeyOverrides

if TYPE_CHECKING:
    from ..moe import RoutingReplay

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
    """ℓ_{i,t} [N, T] (float32, 0 at padding) of ``response_ids`` under ``model`` (see module doc).

    For plain-tensor users: the inputs are the prompt and the response as two right-padded id
    tensors with their masks (valid tokens first, then padding; a row's valid tokens must be a
    prefix of it). ``model.generate`` returns ``[prompt | response]`` in one tensor; split it at the
    prompt width P and build the response mask from the first EOS (see docs/rollouts.md). The
    prompt must be right-padded too (``tokenizer.padding_side = "right"``), which is not what
    ``generate`` wants for decoder-only models: re-pad it, or use the samplers, which do.

    Raises ``ValueError`` (naming the argument) for: shapes that do not match, a mask with values
    other than 0/1, a mask that is not right-padded (left padding, or a hole in the middle), a row
    without prompt tokens, token ids outside ``[0, vocab_size)`` at valid positions, and tensors
    or a model on the meta device.
    """
    return _response_log_probs(
        model,
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask,
        temperature=temperature,
        fused=fused,
        chunk_size=chunk_size,
        backend=backend,
        return_entropy=return_entropy,
        where="response_log_probs",
        names=_ARG_NAMES,
    )


_ARG_NAMES = {n: n for n in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}


def _vocab_size(model: torch.nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def _check_inputs(
    where: str,
    names: Mapping[str, object],
    model: torch.nn.Module,
    prompt_ids: object,
    prompt_mask: object,
    response_ids: object,
    response_mask: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the four inputs (see :func:`response_log_probs`); return the two masks as bool."""
    tensors = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
               "response_mask": response_mask}  # fmt: skip
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {names[name]!r} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(
                f"{where}: {names[name]!r} is on the meta device (a tensor without data); scoring "
                "needs real tensors on the model's device"
            )
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type == "meta":
        raise ValueError(
            f"{where}: the model's parameters are on the meta device (no data); load or materialise "
            "the weights first (e.g. model.to_empty(device=...) and load a state dict)"
        )
    assert isinstance(prompt_ids, torch.Tensor) and isinstance(response_ids, torch.Tensor)
    for name, ids in (("prompt_ids", prompt_ids), ("response_ids", response_ids)):
        if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{where}: {names[name]!r} must hold integer token ids, got {ids.dtype}")
    response_mask = check_mask(where, str(names["response_mask"]), response_mask)
    prompt_mask = check_mask(where, str(names["prompt_mask"]), prompt_mask)
    if prompt_ids.shape != prompt_mask.shape or response_ids.shape != response_mask.shape:
        raise ValueError(
            f"{where}: ids and masks must match: {names['prompt_ids']!r} {list(prompt_ids.shape)} vs "
            f"{names['prompt_mask']!r} {list(prompt_mask.shape)}, {names['response_ids']!r} "
            f"{list(response_ids.shape)} vs {names['response_mask']!r} {list(response_mask.shape)}"
        )
    if prompt_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(
            f"{where}: {names['prompt_ids']!r} has {prompt_ids.shape[0]} rows but "
            f"{names['response_ids']!r} has {response_ids.shape[0]}"
        )
    if prompt_ids.shape[0] == 0 or prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(
            f"{where}: {names['prompt_ids']!r} must be [N, P] with N >= 1 and P >= 1, got "
            f"{list(prompt_ids.shape)}; there is nothing to score"
        )
    if bool((prompt_mask.sum(-1) == 0).any()):
        raise ValueError(
            f"{where}: every row needs at least one prompt token ({names['prompt_mask']!r} has an empty row)"
        )
    for name, mask in (("prompt_mask", prompt_mask), ("response_mask", response_mask)):
        # Right-padded: each row's valid tokens are a prefix of it (no left padding, no holes).
        prefix = torch.arange(mask.shape[1], device=mask.device) < mask.sum(-1, keepdim=True)
        bad = (mask != prefix).any(-1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{where}: {names[name]!r} must be right-padded (each row's valid tokens first, then "
                f"padding; no left padding and no holes), got row {row} = "
                f"{mask[row].int().tolist()}"
            )
    vocab = _vocab_size(model)
    if vocab is not None:
        for name, ids, mask in (
            ("prompt_ids", prompt_ids, prompt_mask),
            ("response_ids", response_ids, response_mask),
        ):
            out = mask & ((ids < 0) | (ids >= vocab))
            if bool(out.any()):
                row, col = (int(i) for i in out.nonzero()[0])
                raise ValueError(
                    f"{where}: {names[name]!r} must hold token ids in [0, {vocab}) (the model's "
                    f"vocabulary) at valid positions, got {int(ids[row, col])} at row {row}, "
                    f"column {col} ({int(out.sum())} such ids)"
                )
    return prompt_mask, response_mask


def _response_log_probs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float,
    fused: bool,
    chunk_size: int | None,
    backend: str,
    return_entropy: bool,
    where: str,
    names: Mapping[str, object],
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    temperature = check_range(where, "temperature", temperature, 0.0, None, low_inclusive=False)
    prompt_mask, response_mask = _check_inputs(
        where, names, model, prompt_ids, prompt_mask, response_ids, response_mask
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
        routing_replay: an existing :class:`~gspo_components.moe.RoutingReplay` of ``model`` to
            use (Scorers of one model can share it); by default one is built when ``routing`` is
            set.
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
        routing_replay: RoutingReplay | None = None,
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
        if routing_replay is not None and routing_replay.model is not model:
            raise ValueError("Scorer: routing_replay must be a RoutingReplay of this Scorer's model")
        self.routing_replay = None
        if routing is not None:
            from ..moe import RoutingReplay

            self.routing_replay = routing_replay if routing_replay is not None else RoutingReplay(model)
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
            return _response_log_probs(
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
                where="Scorer",
                names=self._in_map,
            )

        routing = None
        if self.routing_replay is None:
            out = run()
        elif self.routing == "record":
            with self.routing_replay.record() as rec:
                out = run()
            routing = rec.routed_experts
        else:
            from ..moe import routing_mask

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
