"""TransformersSampler: the VLLMSampler contract on transformers' ``generate`` (no engine needed).

Log-probs. Tokens are drawn from softmax(z / τ) over the full vocabulary: the sampler passes
``do_sample=True, temperature=1.0, top_k=0, top_p=1.0`` to ``generate`` (so none of the model's
``generation_config`` sampling defaults, nor transformers' global ``top_k=50``, applies), with a
logits processor that replaces the scores by ``log_softmax(z / τ)`` in float32 and records them.
``generate`` then samples from exactly that distribution, and ``rollout_log_probs`` is

    ℓ^rollout_{i,t} = log softmax(z_{i,t} / τ)[y_{i,t}],

the quantity :class:`~gspo_components.rollout.scoring.Scorer` computes with ``temperature=τ``. Only one step's
[rows, V] log-probs is kept at a time (not ``output_scores``' [rows, T, V]).

Layout. Prompts are left-padded for ``generate`` (positions count valid tokens only, so padding
changes nothing) and returned right-padded, like :class:`VLLMSampler`. A prompt of length L
gets at most min(max_tokens, context − L) response tokens, as in vLLM.

Randomness. With ``seed`` set, each call draws a seed from the sampler's own
``torch.Generator`` and runs ``generate`` under ``torch.random.fork_rng`` seeded with it: calls
are reproducible and the global RNG is left untouched. With ``seed=None`` the global RNG is used.

Routing (R3 on the CPU). With ``return_routed_experts=True`` (mixture-of-experts models only)
the sampler records, through :class:`~gspo_components.moe.RoutingReplay`, the experts every MoE
layer picked for every token ``generate`` fed to the model (the prompt, then each sampled token
but the last), and returns them as ``routed_experts`` [N, P + T, L, K] in the Scorer's layout
(:mod:`gspo_components.moe.layout`): Rollout Routing Replay's record half.

Weight sync. When the sampler holds the very model object being trained (``model=policy``),
:meth:`~TransformersSampler.sync_weights` does nothing: sampling already sees the latest
weights. Given another module, it copies that module's ``state_dict`` in.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from os import PathLike
from typing import Any

import torch
from tensordict import TensorDict

from ._batch import ROLLOUT_KEYS, PromptsLike, build_rollout, check_sampler_args, tokenize_prompts
from ._state import SamplerState

__all__ = ["TransformersSampler"]


class _TemperedLogProbs:
    """A logits processor: returns log_softmax(scores / τ) (float32) and keeps the sampled
    tokens' entries, one generation step late (step t's token is the last id at step t + 1)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        log_probs = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.pending = log_probs
        return log_probs

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[rows, steps] log-probs, given the tokens sampled at the final step."""
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, last_tokens.unsqueeze(-1)).squeeze(-1))
            self.pending = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(last_tokens.shape[0], 0)


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


class TransformersSampler(SamplerState):
    """Samples ``n`` responses per prompt with ``model.generate``; same contract as VLLMSampler.

    Args:
        model: a path to a saved Hugging Face model folder (with tokenizer), or a transformers
            causal LM object (then pass ``tokenizer``, unless the model's ``name_or_path`` holds
            one).
        n: responses per prompt (the group size G).
        max_tokens: the most tokens per response (``truncated = True`` when reached without an
            end-of-sequence token).
        temperature: τ > 0 (see module doc).
        seed: reproducible sampling (module doc); ``None`` uses the global RNG.
        tokenizer: the tokenizer, when ``model`` is an object.
        dtype: parameter dtype when loading from a path (``None``: the checkpoint's).
        batch_size: rows per ``generate`` call (``None``: all P·n rows at once).
        return_routed_experts: also return ``routed_experts`` (module doc); needs an MoE model.

    Returns (from ``sampler(prompts)``): the TensorDict described in
    :mod:`gspo_components.rollout.sampling._batch`, batch size [P·n].
    """

    out_keys: tuple[str, ...] = ROLLOUT_KEYS

    def __init__(
        self,
        model: str | PathLike[str] | torch.nn.Module,
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        seed: int | None = None,
        *,
        tokenizer: Any = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int | None = None,
        return_routed_experts: bool = False,
    ) -> None:
        where = "TransformersSampler"
        self.n, self.max_tokens, self.temperature = check_sampler_args(where, n, max_tokens, temperature)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"{where}: batch_size must be an integer >= 1 or None, got {batch_size!r}")
        self.batch_size = batch_size
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, torch.nn.Module):
            if dtype is not None:
                raise ValueError(
                    f"{where}: dtype applies only when loading from a path; cast the model yourself"
                )
            self.model = model
            if tokenizer is None:
                source = getattr(getattr(model, "config", None), "name_or_path", "") or ""
                if not source or not os.path.isdir(source):
                    raise ValueError(
                        f"{where}: pass tokenizer= with a model object (its name_or_path has none)"
                    )
                tokenizer = AutoTokenizer.from_pretrained(source)
        else:
            path = os.fspath(model)
            if isinstance(dtype, str) and dtype != "auto":
                dtype = getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype if dtype is not None else "auto"
            )
            self.model.eval()
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        self.tokenizer = tokenizer
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_model_len: int = int(getattr(text_config, "max_position_embeddings", None) or 1 << 30)
        head = self.model.get_output_embeddings()
        self.vocab_size: int = int(head.weight.shape[0] if head is not None else text_config.vocab_size)
        self.eos_ids = _eos_ids(self.model, tokenizer)
        if not self.eos_ids:
            raise ValueError(f"{where}: neither the model nor the tokenizer names an end-of-sequence token")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id: int = int(pad if pad is not None else self.eos_ids[0])
        self._rng = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.routing_replay = None
        if return_routed_experts:
            from ...moe import RoutingReplay

            self.routing_replay = RoutingReplay(self.model)  # ValueError for a dense model
            self.out_keys = (*ROLLOUT_KEYS, "routed_experts")

    def __call__(self, prompts: PromptsLike) -> TensorDict:
        """Sample ``n`` responses for each prompt; see the class doc for the keys."""
        ids, texts = tokenize_prompts(
            "TransformersSampler", prompts, self.tokenizer, self.max_model_len, self.vocab_size
        )
        rows = [p for p in ids for _ in range(self.n)]
        caps = [min(self.max_tokens, self.max_model_len - len(p)) for p in rows]
        step = self.batch_size or len(rows)
        response_ids: list[list[int]] = []
        log_probs: list[list[float]] = []
        truncated: list[bool] = []
        routing: list[torch.Tensor] = []
        for start in range(0, len(rows), step):
            r_ids, r_lps, r_trunc, r_routing = self._generate(
                rows[start : start + step], caps[start : start + step]
            )
            response_ids += r_ids
            log_probs += r_lps
            truncated += r_trunc
            routing += r_routing
        response_text = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        td = build_rollout(ids, texts, self.n, response_ids, log_probs, truncated, response_text, self.pad_id)
        if self.routing_replay is not None:
            from ...moe import to_scorer_layout

            td.set(
                "routed_experts",
                to_scorer_layout(
                    routing,
                    [len(p) for p in rows],
                    td["prompt_ids"].shape[1],
                    td["response_ids"].shape[1],
                    num_layers=self.routing_replay.num_layers,
                    top_k=self.routing_replay.top_k,
                    dtype=self.routing_replay.dtype,
                ),
            )
        return td

    def _generate(
        self, rows: Sequence[list[int]], caps: Sequence[int]
    ) -> tuple[list[list[int]], list[list[float]], list[bool], list[torch.Tensor]]:
        """Responses, their log-probs, truncation flags and (when recording) per-row routing
        [p_i + r_i − 1 or fewer, L, K], prompt first."""
        from transformers import GenerationConfig, LogitsProcessorList

        device = next(self.model.parameters()).device
        width = max(len(p) for p in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max(caps),
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
        )
        recorder = _TemperedLogProbs(self.temperature)
        was_training = self.model.training
        saved_config = getattr(self.model, "generation_config", None)
        # Swap in a neutral generation config: the model's sampling defaults (top_k, top_p,
        # penalties, ...) would otherwise fill every field left unset above.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        self.model.eval()
        record = self.routing_replay.record() if self.routing_replay is not None else contextlib.nullcontext()
        try:
            with (
                record as rec,
                torch.random.fork_rng(
                    devices=[device] if device.type == "cuda" else [], enabled=self._rng is not None
                ),
            ):
                if self._rng is not None:
                    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._rng)))
                out = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList([recorder]),
                )
        finally:
            self.model.generation_config = saved_config
            self.model.train(was_training)
        sequences = out.sequences if hasattr(out, "sequences") else out
        generated = sequences[:, width:].cpu()
        lps = recorder.finish(sequences[:, -1]).cpu()
        eos = torch.isin(generated, torch.tensor(self.eos_ids))
        response_ids, log_probs, truncated, routing = [], [], [], []
        # Recorded columns: the left-padded prompt (width), then one per decoding step fed back.
        routed = rec.routed_experts.cpu() if rec is not None else None
        for i, cap in enumerate(caps):
            hits = eos[i, :cap].nonzero()
            length = int(hits[0]) + 1 if len(hits) else min(cap, generated.shape[1])
            response_ids.append(generated[i, :length].tolist())
            log_probs.append(lps[i, :length].tolist())
            truncated.append(not len(hits))
            if routed is not None:
                prompt = routed[i, width - len(rows[i]) : width]
                routing.append(torch.cat([prompt, routed[i, width : width + length]]))
        return response_ids, log_probs, truncated, routing

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """A no-op when ``model`` is the sampler's own model object (it already samples from the
        current weights); otherwise copies ``model.state_dict()`` into the sampler's model."""
        if model is self.model:
            return
        self.model.load_state_dict(model.state_dict())
