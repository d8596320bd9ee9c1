"""Loss aggregation, and normalisers that are exact across micro-batches and ranks.

For per-token values v_{i,t} (valid where m_{i,t}), L_i = Σ_t m_{i,t}, and the *step's*
normalisers — the number of tokens Σ_i L_i, the number of non-empty sequences S, and a length
L_norm — the four aggregations are

==========================  ====================================  ================================
aggregation                 value                                 used by
==========================  ====================================  ================================
``token-mean``              Σ_i Σ_t v_{i,t} / Σ_i L_i              DAPO (arXiv 2503.14476), CISPO
``seq-mean-token-mean``     (1/S) Σ_i (1/L_i) Σ_t v_{i,t}          GRPO, GSPO (eqs. 5, 13)
``seq-mean-token-sum``      (1/S) Σ_i Σ_t v_{i,t}                  sequence-sum objectives
``seq-mean-token-sum-norm`` Σ_i Σ_t v_{i,t} / (S · L_norm)         Dr.GRPO (arXiv 2503.20783)
==========================  ====================================  ================================

L_norm is ``max_length`` when given (Dr.GRPO's generation budget), otherwise the padded
response width T (the largest over micro-batches and ranks). Rows with no valid token are not
counted in S: an empty row (a filtered sample) never dilutes the mean.

**Why normalisers are passed in.** Each aggregation is a sum over sequences divided by a
normaliser. If each micro-batch divides by its *own* normaliser, the summed micro-batch gradients
differ from the whole batch's whenever lengths or counts differ between micro-batches (the
recurring "loss changes with gradient accumulation" bug). Dividing every micro-batch by the
step's normaliser makes the sum exact: see :func:`step_normalizers`.

**Ranks.** When ``torch.distributed`` is initialised and gradients are averaged across W ranks
(DDP, FSDP), each rank's loss is multiplied by W after dividing by the global normaliser, so that
the averaged gradient equals the single-process gradient of the whole batch. The mean of the
ranks' loss values is then the whole batch's loss.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._checks import DeferredChecks, check_choice, check_float, check_mask, check_positive_int

__all__ = [
    "AGGREGATIONS",
    "LossNormalizers",
    "aggregate",
    "local_normalizers",
    "reduce_normalizers",
    "step_normalizers",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossNormalizers:
    """The denominators of one optimizer step.

    Attributes:
        num_tokens: Σ_i L_i over the step (all micro-batches, all ranks).
        num_sequences: the number of sequences with L_i ≥ 1 over the step.
        max_length: L_norm for ``seq-mean-token-sum-norm``.
        num_replicas: the number of ranks whose gradients are averaged (the loss is multiplied by
            it so that the average is exact); 1 without ``torch.distributed``.
    """

    num_tokens: float
    num_sequences: float
    max_length: float
    num_replicas: int = 1

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_sequences", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"LossNormalizers: {name} must be a finite number, got {value!r}")
        if isinstance(self.num_replicas, bool) or not isinstance(self.num_replicas, numbers.Integral):
            raise ValueError(f"LossNormalizers: num_replicas must be an integer, got {self.num_replicas!r}")
        if self.num_tokens <= 0 or self.num_sequences <= 0:
            raise ValueError(
                "LossNormalizers: the step selects no token (num_tokens="
                f"{self.num_tokens}, num_sequences={self.num_sequences}); an all-padding step "
                "has nothing to optimise"
            )
        if self.max_length <= 0 or self.num_replicas < 1:
            raise ValueError(
                f"LossNormalizers: max_length must be > 0 and num_replicas >= 1, got "
                f"{self.max_length} and {self.num_replicas}"
            )
        if self.num_sequences > self.num_tokens:
            raise ValueError(
                f"LossNormalizers: num_sequences ({self.num_sequences}) exceeds num_tokens "
                f"({self.num_tokens}); every counted sequence holds at least one token"
            )


def _counts(mask: torch.Tensor) -> tuple[float, float, float]:
    lengths = mask.sum(-1)
    return float(lengths.sum()), float((lengths > 0).sum()), float(mask.shape[-1])


def local_normalizers(response_mask: torch.Tensor, *, max_length: int | None = None) -> LossNormalizers:
    """The normalisers of one batch on its own (no micro-batching, no ranks)."""
    mask = check_mask("local_normalizers", "response_mask", response_mask)
    tokens, seqs, width = _counts(mask)
    if max_length is not None:
        width = float(check_positive_int("local_normalizers", "max_length", max_length))
    return LossNormalizers(tokens, seqs, width)


def _distributed_active(process_group: object | None) -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_normalizers(
    local: LossNormalizers, *, process_group: object | None = None, device: torch.device | None = None
) -> LossNormalizers:
    """Sum token and sequence counts, and take the max length, across the ranks of
    ``process_group`` (the default group when None). A no-op without ``torch.distributed``.

    Every rank must call it (it is a collective), once per call site per step.
    """
    if not _distributed_active(process_group):
        return local
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(process_group) == "nccl"
            else torch.device("cpu")
        )
    sums = torch.tensor([local.num_tokens, local.num_sequences], dtype=torch.float64, device=device)
    width = torch.tensor([local.max_length], dtype=torch.float64, device=device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=process_group)
    world = dist.get_world_size(process_group)
    return LossNormalizers(float(sums[0]), float(sums[1]), float(width[0]), world * local.num_replicas)


def step_normalizers(
    micro_batches: torch.Tensor | Iterable[object],
    *,
    mask_key: object = "response_mask",
    max_length: int | None = None,
    process_group: object | None = None,
    sync_ranks: bool = True,
) -> LossNormalizers:
    """The normalisers of a whole optimizer step, to pass to each micro-batch's loss.

    ``micro_batches`` is the step's response mask [N, T], or an iterable of micro-batch masks or
    TensorDicts (read under ``mask_key``). With ``sync_ranks`` and ``torch.distributed``
    initialised, counts are summed across ranks (a collective: call it on every rank).

    Gradient accumulation, exactly::

        norm = step_normalizers(micro_batches)
        for mb in micro_batches:
            recipe.loss(mb, normalizers=norm)["loss"].backward()
        optimizer.step()   # grad == grad of recipe.loss(whole batch) — for every aggregation
    """
    where = "step_normalizers"
    if isinstance(micro_batches, torch.Tensor):
        masks = [micro_batches]
    elif isinstance(micro_batches, str | bytes) or not isinstance(micro_batches, Iterable):
        raise ValueError(
            f"{where}: micro_batches must be a mask tensor or an iterable of masks or TensorDicts, "
            f"got {type(micro_batches).__name__}"
        )
    else:
        masks = []
        for mb in micro_batches:
            if isinstance(mb, torch.Tensor):
                masks.append(mb)
            elif not hasattr(mb, "get"):
                raise ValueError(
                    f"{where}: micro_batches must be a mask tensor or an iterable of masks or TensorDicts, "
                    f"got an entry of type {type(mb).__name__}"
                )
            else:
                value = mb.get(mask_key, None)  # type: ignore[attr-defined]
                if value is None:
                    raise ValueError(f"{where}: a micro-batch has no key {mask_key!r}")
                masks.append(value)
    if not masks:
        raise ValueError(f"{where}: no micro-batch was given")
    tokens = seqs = width = 0.0
    for m in masks:
        t, s, w = _counts(check_mask(where, str(mask_key), m))
        tokens, seqs, width = tokens + t, seqs + s, max(width, w)
    if max_length is not None:
        width = float(check_positive_int(where, "max_length", max_length))
    if tokens <= 0:
        raise ValueError(f"{where}: '{mask_key}' selects no token in any micro-batch")
    local = LossNormalizers(tokens, seqs, width)
    if sync_ranks:
        return reduce_normalizers(local, process_group=process_group, device=masks[0].device)
    return local


def aggregate(
    values: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: str,
    normalizers: LossNormalizers,
) -> torch.Tensor:
    """Aggregate per-token ``values`` [N, T] into a scalar (see the module table).

    Padding is removed with ``torch.where`` before summing, so NaN or ±inf there changes neither
    the value nor the gradient.
    """
    check_choice("aggregate", "aggregation", aggregation, AGGREGATIONS)
    if not isinstance(normalizers, LossNormalizers):
        raise ValueError(
            f"aggregate: normalizers must be a LossNormalizers, got {type(normalizers).__name__}"
        )
    values = check_float("aggregate", "values", values)
    mask = check_mask("aggregate", "response_mask", response_mask, values.shape, like="values")
    lengths = mask.sum(-1)
    row_sum = torch.where(mask, values, 0.0).sum(-1)
    checks = DeferredChecks("aggregate")
    checks.finite("'values' at valid positions (per-row sums)", row_sum.detach())
    checks.run()
    n = normalizers
    if aggregation == "token-mean":
        total = row_sum.sum() / n.num_tokens
    elif aggregation == "seq-mean-token-mean":
        total = (row_sum / lengths.clamp(min=1).to(row_sum.dtype)).sum() / n.num_sequences
    elif aggregation == "seq-mean-token-sum":
        total = row_sum.sum() / n.num_sequences
    else:
        total = row_sum.sum() / (n.num_sequences * n.max_length)
    return total * n.num_replicas
