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

Each group's statistics are computed at the group's own power-of-two scale (the rewards divided
exactly by 2^e_g, the power of two above the group's largest |r|), so no sum or square overflows
or underflows for any finite rewards; ordinary rewards give bit-for-bit the unscaled result. The
normalising estimators divide at that scale and are always finite (eps = 0 included); a group-mean
or RLOO advantage that does not fit the dtype (float32 rewards near ±3.4e38) is a ValueError.

An optional ``valid`` mask ([N] bool; key ``reward_valid``) leaves samples out of their group's
statistics and gives them Â = 0: a reward function that failed on a sample marks it so.

For the batch-whitened estimator the batch mean of x is zero by construction (each group's x
sums to zero), so whitening divides by the batch std without re-centring; re-centring would only
add rounding noise and move zero-variance groups off exactly 0.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from ._checks import check_float, check_mask, check_range, compute_dtype
from ._module import KeyedModule, KeyOverrides

__all__ = [
    "AdvantageEstimator",
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
    """Per-sample views of the group statistics, gathered back to each sample.

    Every group is computed at its own power-of-two scale 2^e_g (e_g the exponent of the group's
    largest valid |r|), so nothing overflows or underflows on the way: the ``scaled_*`` fields are
    mean_g / 2^e_g, (r − mean_g) / 2^e_g and std_g / 2^e_g, each of magnitude ≤ 2 (``exponent`` holds
    e_g per sample). ``mean`` and ``std`` are the same numbers at the rewards' scale (±inf where
    that scale overflows the dtype). ``constant`` marks samples of groups whose valid rewards are
    all equal or that have fewer than two valid samples.
    """

    def __init__(
        self,
        rewards: torch.Tensor,
        valid: torch.Tensor,
        scaled_mean: torch.Tensor,
        scaled_centred: torch.Tensor,
        scaled_std: torch.Tensor,
        exponent: torch.Tensor,
        count: torch.Tensor,
        constant: torch.Tensor,
    ) -> None:
        self.rewards, self.valid = rewards, valid
        self.scaled_mean, self.scaled_centred, self.scaled_std = scaled_mean, scaled_centred, scaled_std
        self.exponent = exponent
        self.count, self.constant = count, constant

    @property
    def live(self) -> torch.Tensor:
        """Samples that get a non-zero advantage: valid, in a non-constant group."""
        return self.valid & ~self.constant

    @property
    def mean(self) -> torch.Tensor:
        """mean_g r at the rewards' scale."""
        return _ldexp(self.scaled_mean, self.exponent)

    @property
    def std(self) -> torch.Tensor:
        """std_g r (Bessel) at the rewards' scale; may overflow to inf for rewards near the dtype's max."""
        return _ldexp(self.scaled_std, self.exponent)

    @property
    def centred(self) -> torch.Tensor:
        """r_i − mean_g r, exactly 0 for constant groups and invalid samples (±inf if it overflows)."""
        return _ldexp(self.scaled_centred, self.exponent)


def _ldexp(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x · 2^e, exact unless the result over- or underflows. Applied in two halves, because
    ``torch.ldexp`` forms 2^e in x's dtype first and 2^128 is already inf in float32."""
    half = torch.div(e, 2, rounding_mode="floor")
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return x * torch.pow(2 * one, half) * torch.pow(2 * one, e - half)


def _pow2_exponent(magnitude: torch.Tensor) -> torch.Tensor:
    """e with magnitude / 2^e in [0.5, 1) (e = 0 for 0): dividing by 2^e is exact."""
    return torch.frexp(magnitude).exponent.to(magnitude.dtype)


def group_statistics(
    rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None = None
) -> GroupStatistics:
    """Segment statistics of ``rewards`` per group, gathered back to each sample.

    mean_g = Σ_{i∈g} r_i / n_g, std_g = sqrt(Σ_{i∈g} (r_i − mean_g)² / (n_g − 1)) (Bessel, as in
    TRL and verl). Only samples with ``valid`` set take part.

    Overflow-safe: each group is first divided by 2^e_g, the power of two just above its largest
    valid |r| (exact in floating point), so the sum, the squares and their sum stay in range for
    any finite rewards (e.g. [3e38, −3e38] in float32, whose squares overflow), and rewards as
    small as 1e-30 do not underflow when squared. For rewards of ordinary size the result is
    bit-identical to the unscaled formula, because scaling by a power of two commutes with
    rounding.
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
    elif not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (n,):
        got = (
            f"{valid.dtype} {list(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        )
        raise ValueError(f"{where}: 'reward_valid' must be a bool tensor of shape [{n}], got {got}")
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
    # 2^e_g: the power of two just above the group's largest valid |r| (e_g = 0 for all-zero groups).
    peak = torch.zeros(num_groups, dtype=dtype, device=r.device).scatter_reduce(
        0, index, r_valid.abs(), reduce="amax"
    )
    exponent = _pow2_exponent(peak)[index]
    r_scaled = _ldexp(r_valid, -exponent)  # |r_scaled| < 1, exact
    count = torch.zeros(num_groups, dtype=dtype, device=r.device).index_add_(0, index, valid.to(dtype))
    total = torch.zeros(num_groups, dtype=dtype, device=r.device).index_add_(0, index, r_scaled)
    mean_scaled = (total / count.clamp(min=1))[index]
    dev = torch.where(valid, r_scaled - mean_scaled, zero)  # |dev| < 2
    sq = torch.zeros(num_groups, dtype=dtype, device=r.device).index_add_(0, index, dev * dev)
    std_scaled = torch.sqrt(sq / (count - 1).clamp(min=1))[index]
    inf = torch.tensor(float("inf"), dtype=dtype, device=r.device)
    high = torch.full((num_groups,), -inf.item(), dtype=dtype, device=r.device).scatter_reduce(
        0, index, torch.where(valid, r, -inf), reduce="amax"
    )
    low = torch.full((num_groups,), inf.item(), dtype=dtype, device=r.device).scatter_reduce(
        0, index, torch.where(valid, r, inf), reduce="amin"
    )
    constant = ((high == low) | (count < 2))[index]
    centred_scaled = torch.where(valid & ~constant, dev, zero)
    return GroupStatistics(
        r, valid, mean_scaled, centred_scaled, std_scaled, exponent, count[index], constant
    )


def _finish(where: str, stats: GroupStatistics, adv: torch.Tensor) -> torch.Tensor:
    """Zero for constant groups and invalid samples; a ValueError if a live value overflowed."""
    zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
    out = torch.where(stats.live, adv, zero)
    if not bool(torch.isfinite(out).all()):
        finfo = torch.finfo(adv.dtype)
        raise ValueError(
            f"{where}: an advantage overflows {adv.dtype} (|Â| > {finfo.max:.3g}) for rewards of "
            f"magnitude up to {float(stats.rewards[stats.valid].abs().max()):.3g}; rescale 'rewards' "
            "or pass them as float64"
        )
    return out


def group_normalized_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO's advantage Â_i = (r_i − mean_g r) / (std_g r + eps), Bessel std; 0 for constant groups.

    Computed at the group's scale 2^e_g as ((r_i − mean_g)/2^e_g) / (std_g/2^e_g + eps/2^e_g), the
    same number without overflow. With eps = 0 the result is finite for every non-constant group
    (its std is positive at that scale): the scale-free value, e.g. ±0.7071 for any two distinct
    rewards, also [0, 1e-30].
    """
    where = "group_normalized_advantages"
    eps = check_range(where, "eps", eps, 0.0, None)
    stats = group_statistics(rewards, group_ids, valid)
    eps_scaled = _ldexp(torch.full_like(stats.scaled_std, eps), -stats.exponent)
    return _finish(where, stats, stats.scaled_centred / (stats.scaled_std + eps_scaled))


def group_mean_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Dr.GRPO's advantage Â_i = r_i − mean_g r (no std division); 0 for constant groups.

    A ``ValueError`` if some r_i − mean_g r is beyond the dtype's range (float32 rewards near ±3e38).
    """
    stats = group_statistics(rewards, group_ids, valid)
    return _finish("group_mean_advantages", stats, stats.centred)


def leave_one_out_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """RLOO: Â_i = r_i − mean_{j≠i} r_j = n_g/(n_g − 1) · (r_i − mean_g r); 0 for constant groups.

    A ``ValueError`` if some Â_i is beyond the dtype's range.
    """
    stats = group_statistics(rewards, group_ids, valid)
    scale = stats.count / (stats.count - 1).clamp(min=1)
    return _finish("leave_one_out_advantages", stats, _ldexp(scale * stats.scaled_centred, stats.exponent))


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
    Like the group statistics, x is taken at one batch-wide power-of-two scale (the largest group
    scale), so x and its squares cannot overflow.
    """
    where = "batch_whitened_advantages"
    eps = check_range(where, "eps", eps, 0.0, None)
    stats = group_statistics(rewards, group_ids, valid)
    # the largest scale among groups with a non-zero x (others' exponents could be far larger)
    top = torch.where(stats.live, stats.exponent, float("-inf")).max()
    top = torch.where(torch.isfinite(top), top, 0.0)
    x = _ldexp(stats.scaled_centred, stats.exponent - top)  # x / 2^top, |x| < 2
    n = stats.valid.sum().clamp(min=2).to(x.dtype)
    batch_mean = x.sum() / stats.valid.sum().clamp(min=1).to(x.dtype)
    dev = torch.where(stats.valid, x - batch_mean, torch.zeros((), dtype=x.dtype, device=x.device))
    std = torch.sqrt((dev * dev).sum() / (n - 1))
    eps_scaled = _ldexp(torch.full_like(x[:1], eps), -top)
    return _finish(where, stats, x / (std + eps_scaled))


def _check_eps(where: str, eps: object) -> float:
    try:
        return check_range(where, "eps", eps, 0.0, None)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"{err} (a recipe passes its advantage_eps here)") from None


class AdvantageEstimator(KeyedModule):
    """The AdvantageEstimator role: reads ``rewards`` [N], ``group_ids`` [N] (and ``reward_valid``
    [N] when present); writes ``advantages`` [N].

    A new estimator subclasses this and implements :meth:`estimate`; :func:`group_statistics`
    gives the exact per-group count, mean, Bessel std and centred rewards it will usually need::

        class GroupMedianBaseline(AdvantageEstimator):
            def estimate(self, rewards, group_ids, valid):
                ...

    ``per_token = True`` declares an estimator that writes [N, T] advantages; a recipe refuses it
    with a weighter whose ratio is one number per response.
    """

    per_token: bool = False

    def __init__(self, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None) -> None:
        super().__init__()
        self._setup_keys(
            ("rewards", "group_ids"), ("advantages",), in_keys, out_keys, optional_in_names=("reward_valid",)
        )

    def estimate(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Â [N] from the raw ``rewards`` [N], ``group_ids`` [N] and the optional ``valid`` mask [N]."""
        raise NotImplementedError(f"{type(self).__name__} must implement estimate(rewards, group_ids, valid)")

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        adv = self.estimate(
            self._read(td, "rewards"), self._read(td, "group_ids"), self._read_optional(td, "reward_valid")
        )
        td.set(self._out_map["advantages"], adv)
        return td


class _GroupAdvantageModule(AdvantageEstimator):
    """A stock group estimator, with keys passed positionally."""

    def __init__(self, in_keys: KeyOverrides, out_keys: KeyOverrides) -> None:
        super().__init__(in_keys=in_keys, out_keys=out_keys)

    def estimate(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        return group_mean_advantages(rewards, group_ids, valid=valid)


class GroupNormalizedAdvantage(_GroupAdvantageModule):
    __doc__ = "GRPO's group-normalised advantage.\n\n" + (group_normalized_advantages.__doc__ or "")

    def __init__(
        self, eps: float = 1e-6, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None
    ) -> None:
        super().__init__(in_keys, out_keys)
        self.eps = _check_eps(type(self).__name__, eps)

    def estimate(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
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

    def estimate(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        return leave_one_out_advantages(rewards, group_ids, valid=valid)


class BatchWhitenedAdvantage(_GroupAdvantageModule):
    __doc__ = "REINFORCE++-baseline: group baseline, batch whitening.\n\n" + (
        batch_whitened_advantages.__doc__ or ""
    )

    def __init__(
        self, eps: float = 1e-6, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None
    ) -> None:
        super().__init__(in_keys, out_keys)
        self.eps = _check_eps(type(self).__name__, eps)

    def estimate(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        return batch_whitened_advantages(rewards, group_ids, eps=self.eps, valid=valid)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class PerTokenAdvantage(AdvantageEstimator):
    """Per-token advantages Â_{i,t} for GSPO-token (GSPO eq. 13), passed through unchanged.

    Reads ``token_advantages`` [N, T] (float; checked against ``response_mask``) and writes it,
    cast to float32 (float64 stays float64), under ``advantages``. A NaN or ±inf at a valid
    position (``response_mask`` set) is a ``ValueError`` naming the key and the position. Padding
    values are left as they are, NaN included; every loss-side part masks them.
    """

    per_token = True

    def __init__(self, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None) -> None:
        KeyedModule.__init__(self)
        self._setup_keys(("token_advantages", "response_mask"), ("advantages",), in_keys, out_keys)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        adv = check_float(type(self).__name__, "token_advantages", self._read(td, "token_advantages"))
        mask = check_mask(type(self).__name__, "response_mask", self._read(td, "response_mask"))
        if adv.shape != mask.shape:
            raise ValueError(
                f"{type(self).__name__}: 'token_advantages' must have shape [N, T] = "
                f"{list(mask.shape)} like 'response_mask', got {list(adv.shape)}"
            )
        out = adv.to(compute_dtype(adv))
        bad = mask & ~torch.isfinite(out)
        if bool(bad.any()):
            i, t = (int(k) for k in bad.nonzero()[0])
            raise ValueError(
                f"{type(self).__name__}: 'token_advantages' must be finite where 'response_mask' is "
                f"set, got {float(out[i, t])} at [{i}, {t}] ({int(bad.sum())} non-finite valid entries; "
                "half-precision values beyond the dtype's range arrive as ±inf)"
            )
        td.set(self._out_map["advantages"], out)
        return td
