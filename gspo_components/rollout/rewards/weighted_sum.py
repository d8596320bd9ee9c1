"""WeightedSum: r_i = Σ_k w_k r_{k,i}, each term also written under ``("reward_terms", name)``.

A sample is valid only if every term scored it: a failure in any term leaves it out with reward
0, as for any failed sample (its terms that did score are still logged under ``reward_terms``).
A failed sample counts once in ``last_failures`` and ``failures_total``, however many of its
terms failed: the entry holds the first failing term's error and names that term. Weights must be
finite real numbers (a NaN weight would mark NaN rewards valid).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from tensordict import TensorDictBase

from .base import RewardFailure, RewardFn

__all__ = ["WeightedSum"]


class WeightedSum(RewardFn):
    """Args:
    terms: ``{name: reward_fn}`` or ``{name: (reward_fn, weight)}`` (weight 1.0 by default; a
        finite real number, else ``ValueError``). Each term keeps its own ``timeout``.
    """

    fields = ()

    def __init__(self, terms: Mapping[str, RewardFn | tuple[RewardFn, float]], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not terms:
            raise ValueError("WeightedSum: terms must name at least one reward function")
        self.names: list[str] = []
        self.weights: list[float] = []
        fns = []
        for name, term in terms.items():
            fn, weight = term if isinstance(term, tuple) else (term, 1.0)
            if not isinstance(fn, RewardFn):
                raise ValueError(f"WeightedSum: term {name!r} must be a RewardFn, got {type(fn).__name__}")
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(
                    f"WeightedSum: the weight of term {name!r} must be a finite real number, "
                    f"got {type(weight).__name__} {weight!r}"
                )
            self.names.append(name)
            self.weights.append(float(weight))
            fns.append(fn)
        self.terms = torch.nn.ModuleList(fns)
        in_keys = []
        for fn in fns:
            in_keys += [k for k in fn.in_keys if k not in in_keys]
        self.in_keys = in_keys
        self.out_keys = [*self.out_keys, *[("reward_terms", n) for n in self.names]]

    def score_batch(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(tensordict.shape[0], dtype=torch.float32)
        valid = torch.ones(tensordict.shape[0], dtype=torch.bool)
        first: dict[int, RewardFailure] = {}  # one failure per sample: its first failing term
        for name, weight, fn in zip(self.names, self.weights, self.terms, strict=True):
            work = fn(tensordict.copy())
            r = work.get(fn.key("rewards")).cpu()
            v = work.get(fn.key("reward_valid")).cpu()
            tensordict.set(("reward_terms", name), r.to(tensordict.device) if tensordict.device else r)
            total += weight * torch.where(v, r, torch.zeros_like(r))
            valid &= v
            for failure in fn.last_failures:
                first.setdefault(failure.index, RewardFailure(failure.index, failure.error, term=name))
        self.last_failures += [first[i] for i in sorted(first)]
        return torch.where(valid, total, torch.zeros_like(total)), valid  # failed samples: 0
