"""RewardFn: a rollout TensorDict → ``rewards`` [N] (float32) and ``reward_valid`` [N] (bool).

A reward function scores each response on its own (:meth:`RewardFn.score`) or a whole batch
(:meth:`RewardFn.score_batch`). If scoring raises for one sample, the batch goes on: that sample
gets ``reward_valid = False`` (and reward 0), the advantage estimators leave it out of its
group's statistics, the reference loop leaves it out of the loss, and the failure is counted
(``failures_total``) and kept with its exception (``last_failures``) for the log.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDictBase

from .._module import KeyedModule, KeyOverrides

__all__ = ["RewardFailure", "RewardFn", "as_list"]


def as_list(value: Any, n: int, key: object) -> list[Any]:
    """A per-sample list from a NonTensorStack, a list, a tensor or a broadcast scalar."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"reward input {key!r} has {len(value)} entries for a batch of {n}")
    return list(value)


class RewardFailure:
    """One sample whose reward could not be computed."""

    def __init__(self, index: int, error: BaseException) -> None:
        self.index = index
        self.error = error

    def __repr__(self) -> str:
        return f"RewardFailure(index={self.index}, error={type(self.error).__name__}: {self.error})"


class RewardFn(KeyedModule):
    """Base class. Subclasses set ``fields`` (the keys they read) and implement ``score``.

    ``score(sample)`` receives a dict of the declared fields for one sample (strings for
    non-tensor entries, Python scalars or lists for tensors) and returns a float. Override
    ``score_batch`` instead for vectorised rewards; it returns a float tensor [N] and may
    raise, which fails the whole batch's valid flags only if ``per_sample_fallback`` is off.
    """

    fields: tuple[str, ...] = ("response_text",)

    def __init__(
        self,
        *,
        out_key: str | tuple[str, ...] = "rewards",
        in_keys: KeyOverrides = None,
        warn: bool = True,
    ) -> None:
        super().__init__()
        self._setup_keys(self.fields, ("rewards", "reward_valid"), in_keys, {"rewards": out_key})
        self.warn = warn
        self.failures_total = 0
        self.last_failures: list[RewardFailure] = []

    def score(self, sample: dict[str, Any]) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement score() or score_batch()")

    def score_batch(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample scoring with failure capture; returns (rewards [N] float32, valid [N])."""
        n = tensordict.shape[0]
        columns = {name: as_list(self._read(tensordict, name), n, name) for name in self.fields}
        rewards = torch.zeros(n, dtype=torch.float32)
        valid = torch.ones(n, dtype=torch.bool)
        for i in range(n):
            sample = {name: col[i] for name, col in columns.items()}
            try:
                value = float(self.score(sample))
                if value != value or value in (float("inf"), float("-inf")):
                    raise ValueError(f"reward is not finite: {value}")
                rewards[i] = value
            except Exception as error:  # a verifier may raise anything; the batch goes on
                valid[i] = False
                self.last_failures.append(RewardFailure(i, error))
        return rewards, valid

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        self.last_failures = []
        rewards, valid = self.score_batch(td)
        device = td.device
        if device is not None:
            rewards, valid = rewards.to(device), valid.to(device)
        td.set(self._out_map["rewards"], rewards)
        td.set(self._out_map["reward_valid"], valid)
        if self.last_failures:
            self.failures_total += len(self.last_failures)
            if self.warn:
                warnings.warn(
                    f"{type(self).__name__}: {len(self.last_failures)} of {td.shape[0]} samples failed "
                    f"and were left out (first: {self.last_failures[0]!r})",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return td
