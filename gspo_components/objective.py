"""Objective: per-token losses → one scalar ``loss`` and masked metrics.

    loss = agg(token_loss · is_weights) + β · agg(KL_t) − c_H · agg(H_t)

where ``agg`` is one of :data:`~gspo_components.aggregation.AGGREGATIONS`, ``is_weights`` are the
detached rollout-correction factors when the batch carries them (TIS/MIS, see
:mod:`gspo_components.rollout_correction`), KL_t a per-token estimator (k1/k2/k3, see
:mod:`gspo_components.kl`) with coefficient β (GRPO, arXiv 2402.03300 eq. 3, puts it inside the
same per-sequence mean), and H_t the per-token entropy when the batch carries ``entropy``.

The output is a *new* TensorDict of batch size ``[]``: the differentiable ``loss`` and detached
metrics. Metrics are token-weighted means over the valid tokens of this call (padding and empty
rows never dilute them):

- ``policy_loss``: the aggregated surrogate term alone;
- ``clip_fraction``: the fraction of valid tokens whose gradient was clipped; split by the side of
  1 the ratio lay on into ``clip_fraction_low`` (w < 1) and ``clip_fraction_high`` (w > 1);
- ``seq_clip_fraction``: the fraction of non-empty sequences with at least one clipped token
  (for GSPO, where a sequence is clipped whole, the fraction of clipped sequences);
- ``ratio_mean``/``ratio_min``/``ratio_max``: of w = exp(log_ratio) over valid tokens;
- ``kl`` (when a reference is used), ``entropy`` (when present), ``is_weight_mean`` (when present);
- ``num_tokens``, ``num_sequences``: what this call saw.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase

from ._checks import (
    check_choice,
    check_float,
    check_mask,
    check_nonempty,
    check_range,
    check_token_tensor,
    compute_dtype,
)
from ._module import KeyedModule, KeyOverrides
from .aggregation import AGGREGATIONS, LossNormalizers, aggregate, local_normalizers, reduce_normalizers
from .kl import KL_ESTIMATORS, kl_penalty

__all__ = ["METRIC_NAMES", "Objective", "loss_metrics", "objective_loss"]

METRIC_NAMES = (
    "policy_loss",
    "clip_fraction",
    "clip_fraction_low",
    "clip_fraction_high",
    "seq_clip_fraction",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "kl",
    "entropy",
    "is_weight_mean",
    "num_tokens",
    "num_sequences",
)


def _resolve_normalizers(
    mask: torch.Tensor,
    normalizers: LossNormalizers | None,
    max_length: int | None,
    sync_ranks: bool,
    process_group: object | None,
) -> LossNormalizers:
    if normalizers is not None:
        if not isinstance(normalizers, LossNormalizers):
            raise ValueError(
                f"normalizers must be a LossNormalizers (see step_normalizers), got {type(normalizers).__name__}"
            )
        return normalizers
    local = local_normalizers(mask, max_length=max_length)
    if sync_ranks and dist.is_available() and dist.is_initialized():
        return reduce_normalizers(local, process_group=process_group, device=mask.device)
    return local


def objective_loss(
    token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    aggregation: str = "seq-mean-token-mean",
    normalizers: LossNormalizers | None = None,
    is_weights: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    max_length: int | None = None,
    sync_ranks: bool = True,
    process_group: object | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar loss (see the module docstring) and its terms ``policy_loss``, ``kl``, ``entropy``.

    ``normalizers`` default to this batch's own, summed across ranks when ``torch.distributed``
    is initialised and ``sync_ranks`` is set; pass :func:`~gspo_components.step_normalizers`'
    result for gradient accumulation.
    """
    where = "objective_loss"
    check_choice(where, "aggregation", aggregation, AGGREGATIONS)
    mask = check_mask(where, "response_mask", response_mask)
    if normalizers is None:
        # With the step's normalisers an empty micro-batch is legitimate (a rank whose samples
        # were all filtered must still join the gradient all-reduce): its loss is an exact 0.
        check_nonempty(where, "response_mask", mask)
    token_loss = check_token_tensor(where, "token_loss", token_loss, "response_mask", mask)
    norm = _resolve_normalizers(mask, normalizers, max_length, sync_ranks, process_group)
    dtype = compute_dtype(token_loss)
    zero = torch.zeros((), dtype=dtype, device=token_loss.device)
    per_token = torch.where(mask, token_loss.to(dtype), zero)
    if is_weights is not None:
        is_weights = check_token_tensor(where, "is_weights", is_weights, "response_mask", mask)
        per_token = per_token * torch.where(mask, is_weights.detach().to(dtype), zero)
    policy = aggregate(per_token, mask, aggregation, norm)
    terms = {"policy_loss": policy}
    loss = policy
    if kl is not None:
        kl = check_token_tensor(where, "kl", kl, "response_mask", mask)
        kl_term = aggregate(torch.where(mask, kl.to(dtype), zero), mask, aggregation, norm)
        terms["kl"] = kl_term
        if kl_coef:
            loss = loss + kl_coef * kl_term
    if entropy is not None:
        entropy = check_token_tensor(where, "entropy", entropy, "response_mask", mask)
        h_term = aggregate(torch.where(mask, entropy.to(dtype), zero), mask, aggregation, norm)
        terms["entropy"] = h_term
        if entropy_coef:
            loss = loss - entropy_coef * h_term
    return loss, terms


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(mask, values, zero).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def loss_metrics(
    response_mask: torch.Tensor,
    *,
    log_ratio: torch.Tensor | None = None,
    clipped: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Masked, detached float32 metrics of one call (see the module docstring)."""
    where = "loss_metrics"
    mask = check_mask(where, "response_mask", response_mask)
    f32 = torch.float32
    out: dict[str, torch.Tensor] = {}
    rows = mask.any(-1)
    out["num_tokens"] = mask.sum().to(f32)
    out["num_sequences"] = rows.sum().to(f32)
    if clipped is not None:
        if clipped.shape != mask.shape or clipped.dtype != torch.bool:
            raise ValueError(
                f"{where}: 'clipped' must be a bool tensor of shape {list(mask.shape)}, "
                f"got {clipped.dtype} {list(clipped.shape)}"
            )
        clipped = clipped & mask
        out["clip_fraction"] = _masked_mean(clipped.to(f32), mask)
        seq_clipped = clipped.any(-1) & rows
        out["seq_clip_fraction"] = seq_clipped.sum().to(f32) / rows.sum().clamp(min=1)
    if log_ratio is not None and bool(mask.any()):
        log_ratio = check_token_tensor(where, "log_ratio", log_ratio, "response_mask", mask)
        lr = log_ratio.detach().to(compute_dtype(log_ratio))
        ratio = torch.exp(torch.where(mask, lr, torch.zeros((), dtype=lr.dtype, device=lr.device)))
        inf = torch.tensor(float("inf"), dtype=ratio.dtype, device=ratio.device)
        out["ratio_mean"] = _masked_mean(ratio, mask).to(f32)
        out["ratio_min"] = torch.where(mask, ratio, inf).amin().to(f32)
        out["ratio_max"] = torch.where(mask, ratio, -inf).amax().to(f32)
        if clipped is not None:
            out["clip_fraction_low"] = _masked_mean((clipped & (lr < 0)).to(f32), mask)
            out["clip_fraction_high"] = _masked_mean((clipped & (lr > 0)).to(f32), mask)
    if kl is not None:
        out["kl"] = _masked_mean(kl.detach().to(f32), mask)
    if entropy is not None:
        out["entropy"] = _masked_mean(entropy.detach().to(f32), mask)
    if is_weights is not None:
        out["is_weight_mean"] = _masked_mean(is_weights.detach().to(f32), mask)
    return out


class Objective(KeyedModule):
    """Aggregate ``token_loss`` into ``loss`` and metrics, under one aggregation.

    Reads ``token_loss``, ``response_mask``; when present, ``is_weights`` (multiplies the loss),
    ``log_ratio`` and ``clipped`` (metrics) and ``entropy``; with ``kl_coef > 0``, ``log_probs`` and
    ``ref_log_probs``. Returns a new TensorDict of batch size ``[]`` (see the module docstring).

    Args:
        aggregation: one of :data:`~gspo_components.aggregation.AGGREGATIONS`.
        kl_coef: β ≥ 0; 0 disables the reference term.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        entropy_coef: c_H; the loss subtracts c_H · agg(entropy) (needs an ``entropy`` entry).
        max_length: L_norm for ``seq-mean-token-sum-norm`` (default: the padded width T).
        sync_ranks: sum the normalisers across ranks when ``torch.distributed`` is initialised.
        process_group: the group whose gradients are averaged (default: the world).

    ``forward(td, normalizers=...)`` takes the step's normalisers for gradient accumulation.
    """

    def __init__(
        self,
        aggregation: str = "seq-mean-token-mean",
        *,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        entropy_coef: float = 0.0,
        max_length: int | None = None,
        sync_ranks: bool = True,
        process_group: object | None = None,
        in_keys: KeyOverrides = None,
        out_keys: KeyOverrides = None,
    ) -> None:
        super().__init__()
        where = "Objective"
        check_choice(where, "aggregation", aggregation, AGGREGATIONS)
        check_choice(where, "kl_estimator", kl_estimator, KL_ESTIMATORS)
        self.aggregation = aggregation
        self.kl_coef = check_range(where, "kl_coef", kl_coef, 0.0, None)
        self.kl_estimator = kl_estimator
        self.entropy_coef = check_range(where, "entropy_coef", entropy_coef, float("-inf"), None)
        self.max_length = (
            None
            if max_length is None
            else int(check_range(where, "max_length", max_length, 0, None, low_inclusive=False))
        )
        self.sync_ranks = sync_ranks
        self.process_group = process_group
        required = ["token_loss", "response_mask"]
        if self.kl_coef > 0:
            required += ["log_probs", "ref_log_probs"]
        if self.entropy_coef != 0:
            required.append("entropy")
        optional = ["is_weights", "log_ratio", "clipped", "entropy"]
        self._setup_keys(
            tuple(required), ("loss", *METRIC_NAMES), in_keys, out_keys, optional_in_names=tuple(optional)
        )

    def forward(
        self, tensordict: TensorDictBase, *, normalizers: LossNormalizers | None = None
    ) -> TensorDictBase:
        td = self._check_td(tensordict)
        where = type(self).__name__
        mask = check_mask(where, "response_mask", self._read(td, "response_mask"))
        if normalizers is None:
            check_nonempty(where, "response_mask", mask)
        token_loss = check_float(where, "token_loss", self._read(td, "token_loss"))
        kl = None
        if self.kl_coef > 0:
            kl = kl_penalty(
                self._read(td, "log_probs"), self._read(td, "ref_log_probs"), mask, self.kl_estimator
            )
        entropy = self._read(td, "entropy") if self.entropy_coef != 0 else self._read_optional(td, "entropy")
        is_weights = self._read_optional(td, "is_weights")
        loss, terms = objective_loss(
            token_loss,
            mask,
            aggregation=self.aggregation,
            normalizers=normalizers,
            is_weights=is_weights,
            kl=kl,
            kl_coef=self.kl_coef,
            entropy=entropy,
            entropy_coef=self.entropy_coef,
            max_length=self.max_length,
            sync_ranks=self.sync_ranks,
            process_group=self.process_group,
        )
        metrics = loss_metrics(
            mask,
            log_ratio=self._read_optional(td, "log_ratio"),
            clipped=self._read_optional(td, "clipped"),
            kl=kl,
            entropy=entropy,
            is_weights=is_weights,
        )
        metrics["policy_loss"] = terms["policy_loss"].detach().float()
        out = {self._out_map["loss"]: loss}
        for name, value in metrics.items():
            out[self._out_map[name]] = value
        return TensorDict(out, batch_size=[], device=None)

    def extra_repr(self) -> str:
        return (
            f"aggregation={self.aggregation!r}, kl_coef={self.kl_coef}, "
            f"kl_estimator={self.kl_estimator!r}, entropy_coef={self.entropy_coef}"
        )
