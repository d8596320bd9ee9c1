"""VLLMSampler: rollouts from a vLLM engine, as a TensorDict in the library's key schema.

Log-probs. vLLM 0.32 reports, by default (``logprobs_mode="raw_logprobs"``), the log-softmax of
the model's *raw* logits: before temperature, top-k/top-p and penalties. That is not the
distribution a token was drawn from when τ ≠ 1. This sampler starts the engine with
``logprobs_mode="processed_logprobs"``, in which vLLM's sampler returns
``log_softmax(logits / τ)`` computed in float32 from the very logits it then samples from
(``vllm/v1/sample/sampler.py`` and ``ops/topk_topp_sampler.py``). So ``rollout_log_probs`` is

    ℓ^rollout_{i,t} = log softmax(z_{i,t} / τ)[y_{i,t}],

the same quantity :class:`~gspo_components.rollout.scoring.Scorer` computes with ``temperature=τ`` (no top-k,
top-p, min-p or penalties are applied; the model's ``generation_config`` sampling defaults are
ignored).

Weight sync. :meth:`VLLMSampler.sync_weights` copies a transformers model's ``state_dict`` into
the engine in place, through vLLM's own in-place reload (``Worker.reload_weights``: the model's
``load_weights`` between ``initialize_layerwise_reload`` and ``finalize_layerwise_reload``, which
redoes the CPU kernels' weight repacking), then clears the prefix cache, whose KV entries were
computed with the old weights. Two transports:

- ``weight_sync="file"`` (default): the tensors are written as one safetensors file to a
  temporary folder (in ``/dev/shm`` when it has room) and the worker reloads them with
  ``LLM.collective_rpc("reload_weights", kwargs={"weights_path": folder})``, a built-in worker
  method: public API only.
- ``weight_sync="rpc"``: the tensors travel as raw bytes through ``LLM.collective_rpc`` to a
  small worker extension (``worker_extension_cls``, a public engine argument) that rebuilds them
  and calls ``reload_weights(weights_iterator=...)``. No file, but the bytes are copied at each
  process hop (client → engine core → worker); measured slower than "file" beyond small models
  (benchmarks/results/sampler_overhead.md).

Mixture-of-experts models. transformers 5 holds each MoE layer's experts fused in memory
(``mlp.experts.gate_up_proj`` [E, 2·I, H]) while checkpoints, and vLLM's loader, use one tensor per
expert (``mlp.experts.{e}.gate_proj.weight``). Weight sync sends the checkpoint layout: the
state dict goes through transformers' own ``revert_weight_conversion``, as ``save_pretrained``
does.

Routing (R3). ``return_routed_experts=True`` starts the engine with vLLM's
``enable_return_routed_experts`` and turns each completion's ``routed_experts``
([prompt + response − 1, L, K]: every token fed to the model) into the ``routed_experts`` key,
[N, P + T, L, K] in the Scorer's layout (:mod:`gspo_components.moe.layout`). vLLM 0.32 captures
routing only in its Model Runner V2, which needs Triton on a GPU: on the CPU build the sampler
refuses the option with a ``ValueError`` (use ``TransformersSampler(return_routed_experts=True)``
there).

vLLM 0.32's CPU build prepacks MoE expert weights into a blocked layout at first load only; a
reload leaves them unpacked and the engine computes wrong outputs. After each sync of an MoE
model on the CPU build the sampler therefore runs the prepack again
(``WeightSyncExtension.gspo_repack_cpu_moe``), and the test suite checks the engine's log-probs
against the trainer's after a sync.

The extension is installed unless you pass your own ``worker_extension_cls`` (then only "file"
is available).

Defaults for a small CPU machine (each can be overridden through ``engine_kwargs``):
``enforce_eager=True`` (no torch.compile warm-up), ``max_model_len`` = the model's
``max_position_embeddings`` capped at 4096, and an explicit KV-cache size
(``kv_cache_memory_bytes``) large enough for 64 sequences of ``max_model_len`` tokens, clamped to
[64 MiB, 2 GiB], which also bypasses vLLM's CPU check on ``gpu_memory_utilization``. If
``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set, vLLM uses it instead.

vLLM starts its engine in a spawned process: a script that builds a ``VLLMSampler`` needs the
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch
from tensordict import TensorDict

from ._batch import ROLLOUT_KEYS, PromptsLike, build_rollout, check_sampler_args, tokenize_prompts
from ._state import SamplerState

__all__ = ["VLLMSampler", "WeightSyncExtension", "checkpoint_state_dict"]

MAX_MODEL_LEN_CAP = 4096
"""Default upper bound on ``max_model_len`` (the model's own context may be far longer)."""
_KV_SEQS = 64
_KV_MIN, _KV_MAX = 64 << 20, 2 << 30
_EXTENSION = "gspo_components.rollout.sampling.vllm_sampler.WeightSyncExtension"
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


class WeightSyncExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); adds one RPC method.

    It runs in the worker process, so it imports nothing heavier than torch.
    """

    def gspo_load_weights(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], blobs: list[bytes]
    ) -> int:
        """Rebuild tensors from raw bytes and reload them in place; returns how many came."""

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, dtype, shape, blob in zip(names, dtypes, shapes, blobs, strict=True):
                with warnings.catch_warnings():  # read-only bytes: load_weights copies them out
                    warnings.simplefilter("ignore", UserWarning)
                    flat = torch.frombuffer(blob, dtype=torch.uint8)
                yield name, flat.view(getattr(torch, dtype)).reshape(shape)

        self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(names)

    def gspo_repack_cpu_moe(self) -> int:
        """Re-run the CPU build's expert-weight prepacking after an in-place reload; returns the
        number of MoE layers repacked.

        vLLM 0.32's CPU MoE kernel wants its expert weights in a blocked layout, made once by the
        experts' ``process_weights_after_loading`` at first load. On a later reload (an RL weight
        update) the unquantized MoE method deliberately skips that step, so the engine would keep
        the freshly loaded plain weights and read them as if blocked: wrong outputs. Measured
        here: log-probs off by 0.08 after a sync, against 5e-7 before it.
        """
        from vllm.config import set_current_vllm_config
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        count = 0
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            for module in self.get_model().modules():  # type: ignore[attr-defined]
                kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
                experts = getattr(kernel, "fused_experts", None)
                if experts is not None and hasattr(module, "w13_weight"):
                    experts.process_weights_after_loading(module)
                    count += 1
        return count


def _read_config(model: str) -> dict[str, Any]:
    path = Path(model) / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config


def _default_kv_bytes(config: dict[str, Any], max_model_len: int, dtype: Any) -> int:
    """KV-cache bytes for ``_KV_SEQS`` sequences of ``max_model_len`` tokens, clamped."""
    try:
        layers = int(config["num_hidden_layers"])
        kv_heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 1 << 30
    name = str(dtype if dtype not in (None, "auto") else config.get("dtype") or config.get("torch_dtype"))
    per_token = 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(name.removeprefix("torch."), 4)
    return int(min(max(per_token * max_model_len * _KV_SEQS, _KV_MIN), _KV_MAX))


def _check_routed_experts_supported(where: str) -> None:
    """vLLM returns routing only from Model Runner V2, which runs on GPUs (Triton) only."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        raise ValueError(
            f"{where}: return_routed_experts=True needs vLLM's Model Runner V2 "
            "(enable_return_routed_experts), which needs Triton on a GPU; this is vLLM's CPU build, "
            "which refuses it. On the CPU record rollout routing with "
            "TransformersSampler(..., return_routed_experts=True)"
        )


def checkpoint_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s detached state dict in its checkpoint layout (what ``save_pretrained`` writes):
    transformers' ``revert_weight_conversion`` undoes in-memory fusions such as MoE experts
    stacked into one tensor; a no-op for models loaded as stored, and before transformers 5."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 keeps the checkpoint layout in memory
        return state
    if not hasattr(model, "config"):
        return state
    return {k: v.detach() for k, v in revert_weight_conversion(model, state).items()}


def _sampled_log_probs(token_ids: Sequence[int], logprobs: Any) -> list[float]:
    """The log-prob of each sampled token from a CompletionOutput's ``logprobs``."""
    flat = getattr(logprobs, "logprobs", None)  # FlatLogprobs: one entry per position when logprobs=0
    if isinstance(flat, list) and len(flat) == len(token_ids) and list(logprobs.token_ids) == list(token_ids):
        return list(flat)
    return [float(pos[tok].logprob) for tok, pos in zip(token_ids, logprobs, strict=True)]


class VLLMSampler(SamplerState):
    """Samples ``n`` responses per prompt with vLLM; returns the rollout TensorDict.

    Args:
        model: path to a saved Hugging Face model folder (weights, config and tokenizer).
        n: responses per prompt (the group size G).
        max_tokens: the most tokens per response; a response that reaches it (or the end of
            the context) without an end-of-sequence token has ``truncated = True``.
        temperature: τ > 0; tokens are drawn from softmax(z / τ) and ``rollout_log_probs`` are
            log-probs under that distribution.
        seed: makes the sampler reproducible: each call draws one seed per prompt from a
            generator seeded with ``seed`` (and the engine's global seed is ``seed``). The k-th
            sample of a prompt uses that seed + k (vLLM's rule for ``n > 1``). ``None``: fresh
            randomness every call.
        weight_sync: ``"file"`` or ``"rpc"``, the transport of :meth:`sync_weights` (module doc);
            may be changed later through the ``weight_sync`` attribute.
        **engine_kwargs: passed to ``vllm.LLM`` (``dtype="float32"``, ``max_model_len``,
            ``kv_cache_memory_bytes``, ``enforce_eager``, ...). ``logprobs_mode`` is fixed to
            ``"processed_logprobs"``. vLLM's default ``dtype="auto"`` downcasts a float32
            checkpoint to bf16; ``self.dtype`` is what the engine holds.
        return_routed_experts: also return ``routed_experts`` (R3; module doc). GPU builds only.

    Calling ``sampler(prompts)`` with P prompts (strings, or lists of token ids) returns a
    TensorDict of batch size [P·n] with ``prompt_ids``, ``prompt_mask``, ``response_ids``,
    ``response_mask``, ``rollout_log_probs`` (float32), ``truncated``, ``group_ids``,
    ``prompt_text`` and ``response_text`` (see :mod:`gspo_components.rollout.sampling._batch`). Responses
    include their end-of-sequence token; ``response_text`` omits special tokens.
    """

    out_keys: tuple[str, ...] = ROLLOUT_KEYS

    def __init__(
        self,
        model: str | PathLike[str],
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        seed: int | None = None,
        *,
        weight_sync: Literal["file", "rpc"] = "file",
        return_routed_experts: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        where = "VLLMSampler"
        self.n, self.max_tokens, self.temperature = check_sampler_args(where, n, max_tokens, temperature)
        self.return_routed_experts = bool(return_routed_experts)
        if self.return_routed_experts:
            _check_routed_experts_supported(where)
            engine_kwargs["enable_return_routed_experts"] = True
            self.out_keys = (*ROLLOUT_KEYS, "routed_experts")
        mode = engine_kwargs.pop("logprobs_mode", "processed_logprobs")
        if mode != "processed_logprobs":
            raise ValueError(
                f"{where}: logprobs_mode must be 'processed_logprobs' (log-probs of the tempered "
                f"distribution actually sampled from), got {mode!r}"
            )
        engine_kwargs.setdefault("worker_extension_cls", _EXTENSION)
        self._rpc_available = engine_kwargs["worker_extension_cls"] == _EXTENSION
        self.weight_sync = weight_sync
        self._check_transport()
        model = os.fspath(model)
        config = _read_config(model)
        if "max_model_len" not in engine_kwargs:
            limit = config.get("max_position_embeddings")
            engine_kwargs["max_model_len"] = (
                min(int(limit), MAX_MODEL_LEN_CAP) if limit else MAX_MODEL_LEN_CAP
            )
        if engine_kwargs.get("max_model_len") is not None and not any(
            k in engine_kwargs for k in ("kv_cache_memory_bytes", "gpu_memory_utilization")
        ):
            engine_kwargs["kv_cache_memory_bytes"] = _default_kv_bytes(
                config, int(engine_kwargs["max_model_len"]), engine_kwargs.get("dtype")
            )
        engine_kwargs.setdefault("enforce_eager", True)
        # sync_weights reloads the checkpoint every step; vLLM would draw a progress bar each time.
        engine_kwargs.setdefault("use_tqdm_on_load", False)
        if seed is not None:
            engine_kwargs.setdefault("seed", int(seed))

        from vllm import LLM

        self.model_path = model
        self.engine_kwargs = dict(engine_kwargs)
        self.llm = LLM(model=model, logprobs_mode="processed_logprobs", **engine_kwargs)
        model_config = self.llm.llm_engine.model_config
        self.max_model_len: int = int(model_config.max_model_len)
        self.vocab_size: int = int(model_config.get_vocab_size())
        self.dtype: torch.dtype = model_config.dtype
        self.tokenizer = self.llm.get_tokenizer()
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id: int = int(pad if pad is not None else getattr(self.tokenizer, "eos_token_id", 0) or 0)
        self._rng = None if seed is None else torch.Generator().manual_seed(int(seed))
        self._sync_dir: str | None = None
        from vllm.platforms import current_platform

        self._cpu_moe = current_platform.is_cpu() and int(model_config.get_num_experts() or 0) > 0
        if self._cpu_moe and not self._rpc_available:
            self.close()
            raise ValueError(
                f"{where}: weight sync of a mixture-of-experts model on vLLM's CPU build needs this "
                f"library's worker extension ({_EXTENSION!r}) to repack the expert weights after a "
                "reload; do not pass your own worker_extension_cls"
            )

    def _check_transport(self) -> None:
        if self.weight_sync not in ("file", "rpc"):
            raise ValueError(f"VLLMSampler: weight_sync must be 'file' or 'rpc', got {self.weight_sync!r}")
        if self.weight_sync == "rpc" and not self._rpc_available:
            raise ValueError(
                f"VLLMSampler: weight_sync='rpc' needs worker_extension_cls={_EXTENSION!r}; with your own "
                "extension use weight_sync='file'"
            )

    def sampling_params(self, num_prompts: int) -> Any:
        """The ``SamplingParams`` of one call: one object, or one per prompt when seeded."""
        from vllm import SamplingParams

        # logprobs=0: only the sampled token's log-prob. flat_logprobs: one flat list per
        # response instead of a dict per token. detokenize=False: no per-token decoding in
        # vLLM's output loop (texts are decoded once, in a batch, by the sampler).
        base = dict(
            n=self.n,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            logprobs=0,
            flat_logprobs=True,
            detokenize=False,
        )
        if self._rng is None:
            return SamplingParams(**base)
        seeds = torch.randint(0, 2**31 - 2**16, (num_prompts,), generator=self._rng).tolist()
        return [SamplingParams(**base, seed=s) for s in seeds]

    def __call__(self, prompts: PromptsLike) -> TensorDict:
        """Sample ``n`` responses for each prompt; see the class doc for the keys."""
        ids, texts = tokenize_prompts(
            "VLLMSampler", prompts, self.tokenizer, self.max_model_len, self.vocab_size
        )
        params = self.sampling_params(len(ids))
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        return self._rollout(ids, texts, outputs)

    def _rollout(self, ids: list[list[int]], texts: list[str], outputs: Sequence[Any]) -> TensorDict:
        """The rollout TensorDict from ``LLM.generate``'s outputs (one per prompt, in order)."""
        response_ids: list[list[int]] = []
        log_probs: list[list[float]] = []
        truncated: list[bool] = []
        routing: list[torch.Tensor] = []
        for out in outputs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            if len(completions) != self.n:
                raise RuntimeError(
                    f"VLLMSampler: vLLM returned {len(completions)} completions, expected {self.n}"
                )
            for c in completions:
                tokens = list(c.token_ids)
                response_ids.append(tokens)
                log_probs.append(_sampled_log_probs(tokens, c.logprobs) if tokens else [])
                truncated.append(c.finish_reason == "length")
                if self.return_routed_experts:
                    if getattr(c, "routed_experts", None) is None:
                        raise RuntimeError(
                            "VLLMSampler: the engine returned no routed_experts for a completion"
                        )
                    routing.append(torch.as_tensor(c.routed_experts))
        response_text = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        td = build_rollout(ids, texts, self.n, response_ids, log_probs, truncated, response_text, self.pad_id)
        if self.return_routed_experts:
            from ...moe import routing_dtype, to_scorer_layout

            layers, top_k = (int(routing[0].shape[1]), int(routing[0].shape[2])) if routing else (0, 0)
            experts = int(self.llm.llm_engine.model_config.get_num_experts() or 256)
            td.set(
                "routed_experts",
                to_scorer_layout(
                    routing,
                    [len(p) for p in ids for _ in range(self.n)],
                    td["prompt_ids"].shape[1],
                    td["response_ids"].shape[1],
                    num_layers=layers,
                    top_k=top_k,
                    dtype=routing_dtype(experts),
                ),
            )
        return td

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s weights into the engine (in place), then clear the prefix cache.

        ``model`` is a transformers model of the engine's architecture (its ``state_dict`` names
        are the checkpoint's); tensors are cast to the engine's dtype before they travel. The
        next call samples from the new weights.
        """
        state = checkpoint_state_dict(model)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # vLLM ties it to the embedding itself
        self._check_transport()
        dtype = self.dtype
        tensors = {
            name: t.to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
            for name, t in state.items()
        }
        if self.weight_sync == "rpc":
            names = list(tensors)
            self.llm.collective_rpc(
                "gspo_load_weights",
                args=(
                    names,
                    [str(tensors[k].dtype).removeprefix("torch.") for k in names],
                    [list(tensors[k].shape) for k in names],
                    [memoryview(tensors[k].view(torch.uint8).numpy()) for k in names],
                ),
            )
        else:
            from safetensors.torch import save_file

            seen: set[int] = set()
            for name, t in tensors.items():  # safetensors refuses tensors that share memory
                if t.untyped_storage().data_ptr() in seen:
                    tensors[name] = t.clone()
                seen.add(tensors[name].untyped_storage().data_ptr())
            if self._sync_dir is None:
                need = 2 * sum(t.numel() * t.element_size() for t in tensors.values())
                shm = "/dev/shm"
                root = shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > need else None
                self._sync_dir = tempfile.mkdtemp(prefix="gspo_sync_", dir=root)
            save_file(tensors, os.path.join(self._sync_dir, "model.safetensors"))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._sync_dir})
        if self._cpu_moe:
            self.llm.collective_rpc("gspo_repack_cpu_moe")
        self.llm.reset_prefix_cache()

    def close(self, timeout: float = 2.0) -> None:
        """Shut the engine down and remove the weight-sync folder, if any.

        ``timeout``: seconds the engine processes get to exit before they are killed (vLLM's
        own default, 5 s, is always spent on this CPU build: its worker does not exit on
        SIGTERM while the engine core waits for it).
        """
        if self._sync_dir is not None:
            shutil.rmtree(self._sync_dir, ignore_errors=True)
            self._sync_dir = None
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and callable(getattr(core, "shutdown", None)):
            core.shutdown(timeout=timeout)

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
