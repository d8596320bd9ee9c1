"""Shared by the weight-sync tests (dense and mixture-of-experts): move a policy, and measure how
far an engine's log-probs are from the trainer's recomputation of the same tokens."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from gspo_components.rollout.scoring import Scorer


def reinforce_update(
    policy: torch.nn.Module, rollout: TensorDictBase, temperature: float, steps: int = 3
) -> None:
    """A few AdamW steps of REINFORCE with random ±1 advantages (lr 3e-2: large enough to move,
    routers included)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-2)
    scorer = Scorer(policy, temperature=temperature)
    advantages = torch.randn(rollout.batch_size[0], generator=torch.Generator().manual_seed(0)).sign()
    policy.train()
    for _ in range(steps):
        td = scorer(rollout.clone())
        mask = td["response_mask"]
        per_token = torch.where(mask, td["log_probs"], torch.zeros(()))
        loss = -(advantages * per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()


def max_logprob_gap(policy: torch.nn.Module, rollout: TensorDictBase, temperature: float) -> float:
    """max |ℓ^engine − ℓ^Scorer| over the rollout's sampled tokens (float32 Scorer, fused head)."""
    scored = Scorer(policy, temperature=temperature, grad=False)(rollout.clone())
    mask = rollout["response_mask"]
    return float((scored["log_probs"] - rollout["rollout_log_probs"]).abs()[mask].max())
