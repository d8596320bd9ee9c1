"""Samplers: prompts → a rollout TensorDict (``prompt_ids``, ``response_ids``, masks,
``rollout_log_probs``, ``truncated``, ``group_ids``, texts), batch size [prompts × n].

- :class:`VLLMSampler`: a vLLM engine; ``rollout_log_probs`` are vLLM's processed log-probs, the
  log-softmax of the tempered logits it sampled from. ``sync_weights`` reloads a trained
  transformers model's weights into the engine in place.
- :class:`TransformersSampler`: the same contract on ``model.generate``; no engine needed.

Both report ℓ^rollout_{i,t} = log softmax(z_{i,t} / τ)[y_{i,t}] in float32, the quantity the
:class:`~gspo_components.rollout.scoring.Scorer` recomputes with ``temperature=τ``. vLLM is imported only when a
VLLMSampler is built, transformers when a TransformersSampler is.
"""

from __future__ import annotations

from .transformers_sampler import TransformersSampler
from .vllm_sampler import VLLMSampler

__all__ = ["TransformersSampler", "VLLMSampler"]
