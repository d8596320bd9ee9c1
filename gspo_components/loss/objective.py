"""Objective: per-token losses → one scalar ``loss`` and masked metrics.

    loss = agg(token_loss · is_weights) + β · agg(KL_t) − c_H · agg(H_t)

where ``agg`` is one of :data:`~gspo_components.loss.aggregation.AGGREGATIONS`, ``is_weights`` are the
detached rollout-correction factors when the batch carries them (TIS/MIS, see
:mod:`gspo_components.loss.rollout_correction`), KL_t a per-token estimator (k1/k2/k3, see
:mod:`gspo_components.loss.kl`) with coefficient β (GRPO, arXiv 2402.03300 eq. 3, puts it inside the
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
    DeferredChecks,
    check_choice,
    check_float,
    check_mask,
    check_nonempty,
    check_positive_int,
    check_range,
    check_token_tensor,
    compute_dtype,
)
from ._module import KeyedModule, KeyOverrides
from .aggregation import AGGREGATIONS, LossNormalizers, local_normalizers, reduce_normalizers
from .kl import KL_ESTIMATORS, _kl
from .numerics import Padding, count, fill_padding

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

Number = float | torch.Tensor


def _normalizer_values(
    where: str,
    pad: Padding,
    aggregation: str,
    normalizers: LossNormalizers | None,
    max_length: int | None,
    sync_ranks: bool,
    process_group: object | None,
    checks: DeferredChecks,
) -> tuple[Number, Number, Number, int]:
    """(Σ L_i, S, L_norm, replicas) for this call.

    Given ``normalizers`` are the step's (Python numbers). Otherwise this batch's counts, as
    tensors (no host synchronisation; an all-padding batch, which validation rejects, then gets
    an exact-0 loss), or summed across ranks when ``torch.distributed`` is initialised and
    ``sync_ranks`` is set (a collective, and host numbers).
    """
    mask, lengths = pad.mask, pad.lengths
    if normalizers is not None:
        if not isinstance(normalizers, LossNormalizers):
            raise ValueError(
                f"{where}: normalizers must be a LossNormalizers (see step_normalizers), "
                f"got {type(normalizers).__name__}"
            )
        if checks.active:
            checks.require(
                f"normalizers count fewer tokens or sequences than this batch holds "
                f"(num_tokens={normalizers.num_tokens}, num_sequences={normalizers.num_sequences}); "
                "pass the step's normalizers, counted over every micro-batch of the step",
                (lengths.sum() <= normalizers.num_tokens)
                & ((lengths > 0).sum() <= normalizers.num_sequences),
            )
        return (
            normalizers.num_tokens,
            normalizers.num_sequences,
            normalizers.max_length,
            normalizers.num_replicas,
        )
    if checks.active and max_length is not None and aggregation == "seq-mean-token-sum-norm":
        checks.require(
            f"a response is longer than max_length = {max_length} (the generation budget must be at "
            "least every response's length)",
            lengths.max() <= max_length,
        )
    if sync_ranks and dist.is_available() and dist.is_initialized():
        local = local_normalizers(mask, max_length=max_length)
        norm = reduce_normalizers(local, process_group=process_group, device=mask.device)
        return norm.num_tokens, norm.num_sequences, norm.max_length, norm.num_replicas
    tokens = lengths.sum().clamp(min=1)
    seqs = count(lengths > 0, 0).clamp(min=1)
    return tokens, seqs, float(mask.shape[-1] if max_length is None else max_length), 1


def _reduce_rows(
    aggregation: str,
    row_sum: torch.Tensor,
    row_mean: torch.Tensor | None,
    norm: tuple[Number, Number, Number, int],
) -> torch.Tensor:
    """The aggregation (module table of :mod:`gspo_components.loss.aggregation`) from per-row sums
    Σ_t v_{i,t} and, for ``seq-mean-token-mean``, per-row means (0 for an empty row)."""
    tokens, seqs, width, replicas = norm
    if aggregation == "token-mean":
        total = row_sum.sum() / tokens
    elif aggregation == "seq-mean-token-mean":
        total = row_mean.sum() / seqs  # type: ignore[union-attr]
    elif aggregation == "seq-mean-token-sum":
        total = row_sum.sum() / seqs
    else:
        total = row_sum.sum() / (seqs * width)
    return total * replicas if replicas != 1 else total


def _rows_of_tokens(
    values: torch.Tensor, lengths: torch.Tensor, aggregation: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σ_t v, Σ_t v / L_i) of [N, T] values that are 0 at padding."""
    row_sum = values.sum(-1)
    row_mean = (
        row_sum / lengths.clamp(min=1).to(row_sum.dtype) if aggregation == "seq-mean-token-mean" else None
    )
    return row_sum, row_mean


def _policy_rows(
    neg: torch.Tensor,
    pad: Padding,
    is_weights: torch.Tensor | None,
    aggregation: str,
    neg_masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row sums (and means) of token_loss · is_weights over the valid tokens.

    ``neg`` is [N, T] (masked here with one ``where``) or [N]: one value per row, constant over
    the row's valid tokens (a sequence-level clipper on sequence-level inputs), whose row sum is
    L_i · v_i and row mean v_i. ``is_weights`` is None, [N, T] (0 at padding) or [N] per row.
    """
    lengths = pad.lengths
    if neg.dim() == 2:
        per_token = neg
        if is_weights is not None:
            per_token = per_token * (is_weights.unsqueeze(-1) if is_weights.dim() == 1 else is_weights)
        return _rows_of_tokens(per_token if neg_masked else pad.zero(per_token), lengths, aggregation)
    # One value v_i per row. The value is summed over the row's tokens exactly as a per-token loss
    # would be (so GSPO equals GSPO-token bit for bit); the gradient flows through the [N] form
    # L_i · v_i, whose value term is an exact 0.
    rows = lengths > 0
    lengths_f = lengths.clamp(min=1).to(neg.dtype)
    if is_weights is not None and is_weights.dim() == 2:
        value = pad.zero(neg.detach().unsqueeze(-1) * is_weights).sum(-1)
        grad_sum = neg * is_weights.sum(-1)
        grad_mean = grad_sum / lengths_f
    else:
        v = neg if is_weights is None else neg * is_weights
        value = pad.zero(v.detach().unsqueeze(-1)).sum(-1)
        grad_sum = torch.where(rows, v * lengths.to(neg.dtype), 0.0)
        grad_mean = torch.where(rows, v, 0.0)
    row_sum = value + (grad_sum - grad_sum.detach())
    row_mean = None
    if aggregation == "seq-mean-token-mean":
        row_mean = value / lengths_f + (grad_mean - grad_mean.detach())
    return row_sum, row_mean


def _loss(
    aggregation: str,
    pad: Padding,
    neg: torch.Tensor,
    is_weights: torch.Tensor | None,
    kl: torch.Tensor | None,
    kl_coef: float,
    entropy: torch.Tensor | None,
    entropy_coef: float,
    norm: tuple[Number, Number, Number, int],
    neg_masked: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """loss, its terms (policy_loss, kl, entropy) and the per-row sums of KL and entropy."""
    lengths = pad.lengths
    row_sum, row_mean = _policy_rows(neg, pad, is_weights, aggregation, neg_masked)
    policy = _reduce_rows(aggregation, row_sum, row_mean, norm)
    terms = {"policy_loss": policy}
    rows: dict[str, torch.Tensor] = {}
    loss = policy
    if kl is not None:
        kl_sum, kl_mean = _rows_of_tokens(kl, lengths, aggregation)
        rows["kl"] = kl_sum
        terms["kl"] = _reduce_rows(aggregation, kl_sum, kl_mean, norm)
        if kl_coef:
            loss = loss + kl_coef * terms["kl"]
    if entropy is not None:
        h_sum, h_mean = _rows_of_tokens(entropy, lengths, aggregation)
        rows["entropy"] = h_sum
        terms["entropy"] = _reduce_rows(aggregation, h_sum, h_mean, norm)
        if entropy_coef:
            loss = loss - entropy_coef * terms["entropy"]
    return loss, terms, rows


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
    kl_coef = check_range(where, "kl_coef", kl_coef, 0.0, None)
    entropy_coef = check_range(where, "entropy_coef", entropy_coef, float("-inf"), None)
    max_length = None if max_length is None else check_positive_int(where, "max_length", max_length)
    mask = check_mask(where, "response_mask", response_mask)
    if normalizers is None:
        # With the step's normalisers an empty micro-batch is legitimate (a rank whose samples
        # were all filtered must still join the gradient all-reduce): its loss is an exact 0.
        check_nonempty(where, "response_mask", mask)
    token_loss = check_token_tensor(where, "token_loss", token_loss, "response_mask", mask)
    checks = DeferredChecks(where)
    pad = Padding(mask)
    norm = _normalizer_values(
        where, pad, aggregation, normalizers, max_length, sync_ranks, process_group, checks
    )
    dtype = compute_dtype(token_loss)
    neg = token_loss.to(dtype)
    if is_weights is not None:
        is_weights = check_token_tensor(where, "is_weights", is_weights, "response_mask", mask)
        is_weights = pad.zero(is_weights.detach().to(dtype))
    if kl is not None:
        kl = pad.zero(check_token_tensor(where, "kl", kl, "response_mask", mask).to(dtype))
    if entropy is not None:
        entropy = check_token_tensor(where, "entropy", entropy, "response_mask", mask)
        entropy = pad.zero(entropy.to(dtype))
    loss, terms, _rows = _loss(aggregation, pad, neg, is_weights, kl, kl_coef, entropy, entropy_coef, norm)
    if checks.active:
        checks.finite(
            "the loss (from 'token_loss', 'is_weights', 'kl', 'entropy' at valid positions)", loss.detach()
        )
        for name in ("kl", "entropy"):  # terms reported even when their coefficient is 0
            if name in terms:
                checks.finite(f"'{name}' at valid positions", terms[name].detach())
        checks.run()
    return loss, terms


@torch.no_grad()
def _metrics(
    pad: Padding,
    *,
    log_ratio: torch.Tensor | None,
    clipped: torch.Tensor | None,
    kl_rows: torch.Tensor | None,
    entropy_rows: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    clipped_high: torch.Tensor | None = None,
    ratio: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Metrics from tensors the loss already holds, without a host synchronisation.

    ``log_ratio`` is [N] (one per row) or [N, T] with 0 at padding; ``clipped`` [N] or [N, T],
    False at padding; ``kl_rows``/``entropy_rows`` per-row sums; ``is_weights`` [N] or [N, T]
    (0 at padding). ``clipped_high``, from a stock clipper, marks the clipped tokens with w > 1;
    every other clipped token has w < 1 (a stock clipper never clips w = 1), so the low side is
    the total minus the high side. Without it both sides are counted from the sign of log_ratio.
    ``ratio``, when given, is exp(log_ratio) already computed (1 at padding).
    """
    f32 = torch.float32
    mask, lengths = pad.mask, pad.lengths
    rows = lengths > 0
    n_tok = lengths.sum().to(f32)
    n_seq = count(rows, 0).to(f32)
    tok = n_tok.clamp(min=1)
    seq = n_seq.clamp(min=1)
    out: dict[str, torch.Tensor] = {"num_tokens": n_tok, "num_sequences": n_seq}
    total = None
    if clipped is not None:
        if clipped.dim() == 2:
            per_row = count(clipped, -1)
            total = per_row.sum().to(f32)
            out["seq_clip_fraction"] = count(per_row > 0, 0).to(f32) / seq
        else:
            total = (lengths * clipped).sum().to(f32)
            out["seq_clip_fraction"] = count(clipped & rows, 0).to(f32) / seq
        out["clip_fraction"] = total / tok
    if log_ratio is not None:
        lr = log_ratio.detach()
        nan = torch.full((), float("nan"), dtype=f32, device=lr.device)
        # the first valid token fills the padding for min/max (index_select/gather: no host sync)
        first_row = rows.view(torch.uint8).argmax().view(1)
        exp_lr = torch.exp(lr) if ratio is None else ratio.detach().view(lr.shape)
        if lr.dim() == 2:
            ratio_sum = (exp_lr.sum(-1) - (lr.shape[-1] - lengths).to(lr.dtype)).sum()
            first_col = mask.index_select(0, first_row).view(torch.uint8).argmax(-1, keepdim=True)
            first = lr.index_select(0, first_row).gather(1, first_col).view(())
            spread = fill_padding(lr, first, pad.padding(lr.dtype))
        else:
            ratio_sum = (exp_lr * lengths.to(lr.dtype)).sum()
            spread = torch.where(rows, lr, lr.index_select(0, first_row).view(()))
        low, high = torch.aminmax(spread)
        some = n_tok > 0
        out["ratio_mean"] = torch.where(some, ratio_sum.to(f32) / tok, nan)
        out["ratio_min"] = torch.where(some, torch.exp(low).to(f32), nan)
        out["ratio_max"] = torch.where(some, torch.exp(high).to(f32), nan)
        if clipped is not None and total is not None:
            if clipped_high is clipped:  # e.g. CISPO without a lower bound: every clip is high
                high_count = total
                low_count = torch.zeros_like(total)
            elif clipped_high is not None:
                high_count = _side_count(clipped_high, rows, lengths)
                low_count = total - high_count
            else:
                high_count = _side_count(clipped, lr > 0, lengths)
                low_count = _side_count(clipped, lr < 0, lengths)
            out["clip_fraction_low"] = low_count / tok
            out["clip_fraction_high"] = high_count / tok
    if kl_rows is not None:
        out["kl"] = kl_rows.detach().sum().to(f32) / tok
    if entropy_rows is not None:
        out["entropy"] = entropy_rows.detach().sum().to(f32) / tok
    if is_weights is not None:
        w = is_weights.detach()
        w_sum = w.sum() if w.dim() == 2 else (w * lengths.to(w.dtype)).sum()
        out["is_weight_mean"] = w_sum.to(f32) / tok
    return out


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The product of two weights, each [N] or [N, T] (0 at padding): [N] when both are."""
    if a.dim() == b.dim():
        return a * b
    return (a.unsqueeze(-1) if a.dim() == 1 else a) * (b.unsqueeze(-1) if b.dim() == 1 else b)


def _side_count(clipped: torch.Tensor, side: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The number of valid tokens that are clipped and on ``side`` (either may be per row)."""
    if clipped.dim() == 1 and side.dim() == 1:
        return (lengths * (clipped & side)).sum().to(torch.float32)
    if side.dim() == 1:
        side = side.unsqueeze(-1)
    if clipped.dim() == 1:
        clipped = clipped.unsqueeze(-1)
    both = clipped & side
    return count(both, -1).sum().to(torch.float32)


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
    """Masked, detached float32 metrics of one call (see the module docstring).

    Means are over the valid tokens; with no valid token they are 0, and the ratio metrics NaN.
    """
    where = "loss_metrics"
    mask = check_mask(where, "response_mask", response_mask)
    if mask.numel() == 0:
        raise ValueError(f"{where}: 'response_mask' is empty (shape {list(mask.shape)}); there are no tokens")
    if clipped is not None:
        if not isinstance(clipped, torch.Tensor):
            raise ValueError(f"{where}: 'clipped' must be a torch.Tensor, got {type(clipped).__name__}")
        if clipped.shape != mask.shape or clipped.dtype != torch.bool:
            raise ValueError(
                f"{where}: 'clipped' must be a bool tensor of shape {list(mask.shape)} like 'response_mask', "
                f"got {clipped.dtype} {list(clipped.shape)}"
            )
        clipped = clipped & mask
    pad = Padding(mask)

    def clean(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = check_token_tensor(where, name, t, "response_mask", mask).detach()
        return pad.zero(t.to(compute_dtype(t)))

    log_ratio = clean("log_ratio", log_ratio)
    kl = clean("kl", kl)
    entropy = clean("entropy", entropy)
    is_weights = clean("is_weights", is_weights)
    checks = DeferredChecks(where)
    if checks.active:
        for name, t in (
            ("log_ratio", log_ratio),
            ("kl", kl),
            ("entropy", entropy),
            ("is_weights", is_weights),
        ):
            if t is not None:
                checks.finite(f"'{name}' at valid positions (per-row sums)", t.sum(-1))
        checks.run()
    return _metrics(
        pad,
        log_ratio=log_ratio,
        clipped=clipped,
        kl_rows=None if kl is None else kl.sum(-1),
        entropy_rows=None if entropy is None else entropy.sum(-1),
        is_weights=is_weights,
    )


class Objective(KeyedModule):
    """Aggregate ``token_loss`` into ``loss`` and metrics, under one aggregation.

    Reads ``token_loss`` ([N, T], or [N]: one loss per response, counted at each of its valid
    tokens), ``response_mask``; when present, ``is_weights`` and ``loss_weights`` (detached
    factors that multiply the loss: rollout correction, and the filters of a PolicyLoss),
    ``log_ratio`` and ``clipped`` (metrics) and ``entropy``; with ``kl_coef > 0``, ``log_probs`` and
    ``ref_log_probs``. Returns a new TensorDict of batch size ``[]`` (see the module docstring).

    Args:
        aggregation: one of :data:`~gspo_components.loss.aggregation.AGGREGATIONS`.
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
        self.max_length = None if max_length is None else check_positive_int(where, "max_length", max_length)
        self.sync_ranks = sync_ranks
        self.process_group = process_group
        required = ["token_loss", "response_mask"]
        if self.kl_coef > 0:
            required += ["log_probs", "ref_log_probs"]
        if self.entropy_coef != 0:
            required.append("entropy")
        optional = ["is_weights", "loss_weights", "log_ratio", "clipped", "entropy"]
        self._setup_keys(
            tuple(required), ("loss", *METRIC_NAMES), in_keys, out_keys, optional_in_names=tuple(optional)
        )

    def forward(
        self, tensordict: TensorDictBase, *, normalizers: LossNormalizers | None = None
    ) -> TensorDictBase:
        td = self._check_td(tensordict)
        where = type(self).__name__
        mask = check_mask(where, "response_mask", self._read(td, "response_mask"))
        token_loss = self._read(td, "token_loss")
        if isinstance(token_loss, torch.Tensor) and token_loss.dim() == 1:  # the per-response slot
            token_loss = check_float(where, "token_loss", token_loss)
            if token_loss.shape[0] != mask.shape[0]:
                raise ValueError(
                    f"{where}: 'token_loss' must have shape [N, T] = {list(mask.shape)}, or [N] = "
                    f"[{mask.shape[0]}] (one loss per response), got {list(token_loss.shape)}"
                )
        else:
            token_loss = check_token_tensor(where, "token_loss", token_loss, "response_mask", mask)
        dtype = compute_dtype(token_loss)
        log_ratio = self._read_optional(td, "log_ratio")
        pad = Padding(mask)
        checks = DeferredChecks(where)
        if log_ratio is not None:
            log_ratio = check_token_tensor(where, "log_ratio", log_ratio, "response_mask", mask)
            log_ratio = pad.zero(log_ratio.detach().to(compute_dtype(log_ratio)))
            if checks.active:
                checks.finite("'log_ratio' at valid positions (per-row sums)", log_ratio.sum(-1))
        clipped = self._read_optional(td, "clipped")
        if clipped is not None:
            if (
                tuple(clipped.shape) not in (tuple(mask.shape), tuple(mask.shape[:1]))
                or clipped.dtype != torch.bool
            ):
                raise ValueError(
                    f"{where}: 'clipped' must be a bool tensor of shape [N, T] = {list(mask.shape)} or "
                    f"[N] = [{mask.shape[0]}], got {clipped.dtype} {list(clipped.shape)}"
                )
            clipped = clipped & (mask if clipped.dim() == 2 else pad.lengths > 0)
        is_weights = self._read_optional(td, "is_weights")
        if is_weights is not None:
            is_weights = self._clean_is_weights(is_weights, pad, dtype)
        loss_weights = self._read_optional(td, "loss_weights")
        if loss_weights is not None:
            loss_weights = self._clean_weights("loss_weights", loss_weights, pad, dtype)
        return self._compute(
            td,
            pad,
            token_loss.to(dtype),
            clipped,
            log_ratio,
            is_weights,
            normalizers,
            checks,
            None,
            loss_weights=loss_weights,
        )

    def _clean_weights(self, name: str, weights: object, pad: Padding, dtype: torch.dtype) -> torch.Tensor:
        """Detached weights [N, T] (0 at padding) or [N] (one per response)."""
        where = type(self).__name__
        if isinstance(weights, torch.Tensor) and weights.dim() == 1:
            weights = check_float(where, name, weights)
            if weights.shape[0] != pad.mask.shape[0]:
                raise ValueError(
                    f"{where}: '{name}' must have shape [N, T] = {list(pad.mask.shape)} or [N] = "
                    f"[{pad.mask.shape[0]}], got {list(weights.shape)}"
                )
            return torch.where(pad.lengths > 0, weights.detach().to(dtype), 0.0)
        weights = check_token_tensor(where, name, weights, "response_mask", pad.mask)
        return pad.zero(weights.detach().to(dtype))

    def _clean_is_weights(self, is_weights: object, pad: Padding, dtype: torch.dtype) -> torch.Tensor:
        is_weights = check_token_tensor(
            type(self).__name__, "is_weights", is_weights, "response_mask", pad.mask
        )
        return pad.zero(is_weights.detach().to(dtype))

    def _compute(
        self,
        td: TensorDictBase,
        pad: Padding,
        neg: torch.Tensor,
        clipped: torch.Tensor | None,
        log_ratio: torch.Tensor | None,
        is_weights: torch.Tensor | None,
        normalizers: LossNormalizers | None,
        checks: DeferredChecks,
        clipped_high: torch.Tensor | None,
        ratio: torch.Tensor | None = None,
        *,
        loss_weights: torch.Tensor | None = None,
        neg_masked: bool | None = None,
    ) -> TensorDictBase:
        """The loss and metrics from clean inputs: ``neg`` (−J) [N, T] (masked here) or [N] per
        row; ``clipped`` False at padding; ``log_ratio`` 0 at padding or [N]; ``is_weights`` 0 at
        padding or [N]. Reads the KL's and the entropy's inputs from ``td``. Resolves ``checks``
        (one host synchronisation when validation is on)."""
        where = type(self).__name__
        mask = pad.mask
        if normalizers is None:
            check_nonempty(where, "response_mask", mask, pad.lengths)
        norm = _normalizer_values(
            where,
            pad,
            self.aggregation,
            normalizers,
            self.max_length,
            self.sync_ranks,
            self.process_group,
            checks,
        )
        if (
            normalizers is not None
            and self.max_length is not None
            and self.aggregation == "seq-mean-token-sum-norm"
            and normalizers.max_length != self.max_length
        ):
            raise ValueError(
                f"{where}: normalizers.max_length = {normalizers.max_length} but this objective's "
                f"max_length = {self.max_length}; count the step with recipe.step_normalizers(...) "
                f"or step_normalizers(..., max_length={self.max_length})"
            )
        kl = None
        if self.kl_coef > 0:
            kl = _kl(
                "kl_penalty",
                self._read(td, "log_probs"),
                self._read(td, "ref_log_probs"),
                pad,
                self.kl_estimator,
                checks,
            )
        entropy = self._read(td, "entropy") if self.entropy_coef != 0 else self._read_optional(td, "entropy")
        if entropy is not None:
            entropy = check_token_tensor(where, "entropy", entropy, "response_mask", mask)
            entropy = pad.zero(entropy.to(compute_dtype(entropy, neg)))
        weights = is_weights
        if loss_weights is not None:
            weights = loss_weights if weights is None else _product(weights, loss_weights)
        loss, terms, rows = _loss(
            self.aggregation,
            pad,
            neg,
            weights,
            kl,
            self.kl_coef,
            entropy,
            self.entropy_coef,
            norm,
            # a stock kernel's −J is 0 at padding (its advantages are); anything else is masked here
            neg_masked=(clipped_high is not None) if neg_masked is None else neg_masked,
        )
        if checks.active:
            if entropy is not None:
                checks.finite("'entropy' at valid positions (per-row sums)", rows["entropy"].detach())
            checks.finite(
                "the loss (from 'token_loss', 'is_weights' and the advantages at valid positions)",
                terms["policy_loss"].detach(),
            )
            checks.run()
        metrics = _metrics(
            pad,
            log_ratio=log_ratio,
            clipped=clipped,
            kl_rows=rows.get("kl"),
            entropy_rows=rows.get("entropy"),
            is_weights=is_weights,
            clipped_high=clipped_high,
            ratio=ratio,
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
