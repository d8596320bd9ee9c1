"""AdvantageEstimator: from per-response ``rewards`` [N] and ``group_ids`` [N] to ``advantages``.

Groups are any integer ids, in any order, of uneven sizes. Statistics are segment reductions
(``index_add_``, ``scatter_reduce``) over the dense group index that ``torch.unique`` returns; no
Python loop touches a sample.

=====================  ===========================================================  ==============
estimator              Â_i                                                          source
=====================  ===========================================================  ==============
group-normalised       (r_i − mean_g r) / (std_g r + eps), std Bessel-corrected     GRPO,
                                                                                    arXiv 2402.03300
group-mean             r_i − mean_g r                                               Dr.GRPO,
                                                                                    arXiv 2503.20783
leave-one-out (RLOO)   r_i − mean_{j≠i} r_j = G/(G−1) (r_i − mean_g r)              Ahmadian et al.
                                                                                    2024 (RLOO)
batch-whitened         x_i = r_i − mean_g r, then x_i / (std_batch x + eps)         REINFORCE++-
                                                                                    baseline,
                                                                                    arXiv 2501.03262
per-token              Â_{i,t} given by the caller, passed through                  GSPO-token
=====================  ===========================================================  ==============

A group whose valid rewards are all equal (a single sample included) gets Â = 0 *exactly*: the
condition is tested with an exact max == min per group and the advantage set to 0 explicitly,
since the floating-point expression only gives about 1e-2 relative to eps.

An optional ``valid`` mask ([N] bool; key ``reward_valid``) leaves samples out of their group's
statistics and gives them Â = 0: a reward function that failed on a sample marks it so.

For the batch-whitened estimator the batch mean of x is zero by construction (each group's x
sums to zero), so whitening divides by the batch std without re-centring; re-centring would only
add rounding noise and move zero-variance groups off exactly 0.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from ._checks import check_float, check_range, compute_dtype
from ._module import KeyedModule, KeyOverrides

__all__ = [
    "BatchWhitenedAdvantage",
    "GroupMeanAdvantage",
    "GroupNormalizedAdvantage",
    "GroupStatistics",
    "LeaveOneOutAdvantage",
    "PerTokenAdvantage",
    "batch_whitened_advantages",
    "group_mean_advantages",
    "group_normalized_advantages",
    "group_statistics",
    "leave_one_out_advantages",
]


class GroupStatistics:
    """Per-sample views of the group statistics: the sample's group mean, std, size and whether
    its group is constant (all valid rewards equal, or fewer than two valid samples)."""

    def __init__(
        self,
        rewards: torch.Tensor,
        valid: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        count: torch.Tensor,
        constant: torch.Tensor,
    ) -> None:
        self.rewards, self.valid = rewards, valid
        self.mean, self.std, self.count, self.constant = mean, std, count, constant

    @property
    def centred(self) -> torch.Tensor:
        """r_i − mean_g r, exactly 0 for constant groups and invalid samples."""
        zero = torch.zeros((), dtype=self.rewards.dtype, device=self.rewards.device)
        return torch.where(self.valid & ~self.constant, self.rewards - self.mean, zero)


def group_statistics(
    rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None = None
) -> GroupStatistics:
    """Segment statistics of ``rewards`` per group, gathered back to each sample.

    mean_g = Σ_{i∈g} r_i / n_g, std_g = sqrt(Σ_{i∈g} (r_i − mean_g)² / (n_g − 1)) (Bessel, as in
    TRL and verl). Only samples with ``valid`` set take part.
    """
    where = "group_statistics"
    rewards = check_float(where, "rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"{where}: 'rewards' must have shape [N], got {list(rewards.shape)}")
    n = rewards.shape[0]
    if n == 0:
        raise ValueError(f"{where}: 'rewards' is empty (shape [0]); there is nothing to estimate")
    if (
        not isinstance(group_ids, torch.Tensor)
        or group_ids.dtype.is_floating_point
        or group_ids.dtype
        in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        )
    ):
        got = group_ids.dtype if isinstance(group_ids, torch.Tensor) else type(group_ids).__name__
        raise ValueError(f"{where}: 'group_ids' must be an integer tensor of shape [N], got {got}")
    if tuple(group_ids.shape) != (n,):
        raise ValueError(
            f"{where}: 'group_ids' must have shape [N] = [{n}] like 'rewards', got {list(group_ids.shape)}"
        )
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=rewards.device)
    elif valid.dtype != torch.bool or tuple(valid.shape) != (n,):
        raise ValueError(
            f"{where}: 'reward_valid' must be a bool tensor of shape [{n}], "
            f"got {valid.dtype} {list(valid.shape)}"
        )
    dtype = compute_dtype(rewards)
    r = rewards.detach().to(dtype)
    if not bool(torch.isfinite(r[valid]).all()):
        raise ValueError(
            f"{where}: 'rewards' holds NaN or ±inf for a valid sample; mark failed samples in "
            "'reward_valid' instead"
        )
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max()) + 1
    zero = torch.zeros((), dtype=dtype, device=r.device)
    r_valid = torch.where(valid, r, zero)
    count = torch.zeros(num_groups, dtype=dtype, device=r.device).index_add_(0, index, valid.to(dtype))
    total = torch.zeros(num_groups, dtype=dtype, device=r.device).index_add_(0, index, r_valid)
    mean = total / count.clamp(min=1)
    dev = torch.where(valid, r - mean[index], zero)
    sq = torch.zeros(num_groups, dtype=dtype, device=r.device).index_add_(0, index, dev * dev)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    inf = torch.tensor(float("inf"), dtype=dtype, device=r.device)
    high = torch.full((num_groups,), -inf.item(), dtype=dtype, device=r.device).scatter_reduce(
        0, index, torch.where(valid, r, -inf), reduce="amax"
    )
    low = torch.full((num_groups,), inf.item(), dtype=dtype, device=r.device).scatter_reduce(
        0, index, torch.where(valid, r, inf), reduce="amin"
    )
    constant = (high == low) | (count < 2)
    return GroupStatistics(r, valid, mean[index], std[index], count[index], constant[index])


def _finish(stats: GroupStatistics, adv: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
    return torch.where(stats.valid & ~stats.constant, adv, zero)


def group_normalized_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO's advantage Â_i = (r_i − mean_g r) / (std_g r + eps), Bessel std; 0 for constant groups."""
    check_range("group_normalized_advantages", "eps", eps, 0.0, None)
    stats = group_statistics(rewards, group_ids, valid)
    return _finish(stats, stats.centred / (stats.std + eps))


def group_mean_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Dr.GRPO's advantage Â_i = r_i − mean_g r (no std division); 0 for constant groups."""
    return group_statistics(rewards, group_ids, valid).centred


def leave_one_out_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """RLOO: Â_i = r_i − mean_{j≠i} r_j = n_g/(n_g − 1) · (r_i − mean_g r); 0 for constant groups."""
    stats = group_statistics(rewards, group_ids, valid)
    scale = stats.count / (stats.count - 1).clamp(min=1)
    return _finish(stats, scale * stats.centred)


def batch_whitened_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE++-baseline: x_i = r_i − mean_g r, then Â_i = x_i / (std_batch x + eps).

    std_batch is the Bessel-corrected std of x over the valid samples of the whole batch. The
    batch mean of x is 0 by construction, so no re-centring is applied (see the module docstring).
    """
    check_range("batch_whitened_advantages", "eps", eps, 0.0, None)
    stats = group_statistics(rewards, group_ids, valid)
    x = stats.centred
    n = stats.valid.sum().clamp(min=2).to(x.dtype)
    batch_mean = x.sum() / stats.valid.sum().clamp(min=1).to(x.dtype)
    dev = torch.where(stats.valid, x - batch_mean, torch.zeros((), dtype=x.dtype, device=x.device))
    std = torch.sqrt((dev * dev).sum() / (n - 1))
    return _finish(stats, x / (std + eps))


class _GroupAdvantageModule(KeyedModule):
    """Reads ``rewards`` [N], ``group_ids`` [N] (and ``reward_valid`` [N] if present); writes
    ``advantages`` [N]."""

    def __init__(self, in_keys: KeyOverrides, out_keys: KeyOverrides) -> None:
        super().__init__()
        self._setup_keys(
            ("rewards", "group_ids"), ("advantages",), in_keys, out_keys, optional_in_names=("reward_valid",)
        )

    def _estimate(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        return group_mean_advantages(rewards, group_ids, valid=valid)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        adv = self._estimate(
            self._read(td, "rewards"), self._read(td, "group_ids"), self._read_optional(td, "reward_valid")
        )
        td.set(self._out_map["advantages"], adv)
        return td


class GroupNormalizedAdvantage(_GroupAdvantageModule):
    __doc__ = "GRPO's group-normalised advantage.\n\n" + (group_normalized_advantages.__doc__ or "")

    def __init__(
        self, eps: float = 1e-6, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None
    ) -> None:
        super().__init__(in_keys, out_keys)
        self.eps = check_range(type(self).__name__, "eps", eps, 0.0, None)

    def _estimate(self, rewards, group_ids, valid):  # type: ignore[no-untyped-def]
        return group_normalized_advantages(rewards, group_ids, eps=self.eps, valid=valid)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class GroupMeanAdvantage(_GroupAdvantageModule):
    __doc__ = "Dr.GRPO's mean-only group baseline.\n\n" + (group_mean_advantages.__doc__ or "")

    def __init__(self, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None) -> None:
        super().__init__(in_keys, out_keys)


class LeaveOneOutAdvantage(_GroupAdvantageModule):
    __doc__ = "RLOO's leave-one-out baseline.\n\n" + (leave_one_out_advantages.__doc__ or "")

    def __init__(self, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None) -> None:
        super().__init__(in_keys, out_keys)

    def _estimate(self, rewards, group_ids, valid):  # type: ignore[no-untyped-def]
        return leave_one_out_advantages(rewards, group_ids, valid=valid)


class BatchWhitenedAdvantage(_GroupAdvantageModule):
    __doc__ = "REINFORCE++-baseline: group baseline, batch whitening.\n\n" + (
        batch_whitened_advantages.__doc__ or ""
    )

    def __init__(
        self, eps: float = 1e-6, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None
    ) -> None:
        super().__init__(in_keys, out_keys)
        self.eps = check_range(type(self).__name__, "eps", eps, 0.0, None)

    def _estimate(self, rewards, group_ids, valid):  # type: ignore[no-untyped-def]
        return batch_whitened_advantages(rewards, group_ids, eps=self.eps, valid=valid)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class PerTokenAdvantage(KeyedModule):
    """Per-token advantages Â_{i,t} for GSPO-token (GSPO eq. 13), passed through unchanged.

    Reads ``token_advantages`` [N, T] (float; checked against ``response_mask``) and writes it,
    cast to float32 (float64 stays float64), under ``advantages``. Padding values are left as they
    are; every loss-side part masks them.
    """

    def __init__(self, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None) -> None:
        super().__init__()
        self._setup_keys(("token_advantages", "response_mask"), ("advantages",), in_keys, out_keys)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        adv = check_float(type(self).__name__, "token_advantages", self._read(td, "token_advantages"))
        mask = self._read(td, "response_mask")
        if adv.shape != mask.shape:
            raise ValueError(
                f"{type(self).__name__}: 'token_advantages' must have shape [N, T] = "
                f"{list(mask.shape)} like 'response_mask', got {list(adv.shape)}"
            )
        td.set(self._out_map["advantages"], adv.to(compute_dtype(adv)))
        return td
