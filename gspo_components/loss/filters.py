"""TokenFilter: take tokens, or whole responses, out of the loss (or reweight them).

A filter reads what it needs from the batch (log-probs, advantages, entropies, ...) and returns a
*keep weight* per token ([N, T]) or per response ([N]): ``True``/1 keeps, ``False``/0 removes,
any other non-negative number reweights. In a :class:`~gspo_components.loss.recipes.PolicyLoss`
the filters run after the weighter and the rollout correction; their weights multiply one another
and multiply each token's loss, like the rollout-correction weights, and are detached:

    loss = agg(token_loss · is_weights · Π_f keep_f) + β · agg(KL) − c_H · agg(H)

The normalisers do **not** change: a removed token still counts in Σ L_i, S and L_norm, so a
filter never changes the scale of the other tokens' gradients (as TRL and verl apply their masks,
by multiplying the per-token loss before the usual aggregation). KL and entropy terms are not
filtered.

Each filter reports, as ``filtered_<name>`` in the loss's output, the fraction of the call's valid
tokens it gave weight 0. Stock filters live with their algorithm (top-entropy tokens, DPPO's
binary-TV / binary-KL, M2PO, OPSM); a new one subclasses :class:`TokenFilter` and implements
:meth:`TokenFilter.keep`::

    class ShortResponsesOnly(TokenFilter):
        name = "long_responses"

        def keep(self, padding):
            return padding.lengths <= 64          # [N] bool: one decision per response
"""

from __future__ import annotations

import re

import torch
from tensordict import TensorDictBase

from ._checks import DeferredChecks, check_mask
from ._module import KeyedModule, KeyOverrides
from .numerics import Padding, count

__all__ = ["TokenFilter"]


def _snake(name: str) -> str:
    name = re.sub(r"(Filter|Mask)$", "", name) or name
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class TokenFilter(KeyedModule):
    """The TokenFilter role: reads ``response_mask`` and the entries named in ``inputs``; writes
    ``loss_weights`` (multiplied into any weights already there).

    Subclasses set ``inputs`` (canonical names, renamable through ``in_keys``), optionally
    ``name`` (the metric is ``filtered_<name>``; default: the class name in snake case without a
    ``Filter``/``Mask`` suffix), and implement :meth:`keep`.
    """

    per_response_advantages: bool = False
    """True when the part needs one advantage per response ([N]) and refuses [N, T] (GMPO's
    geometric mean, VESPO's sequence weight): a recipe refuses a per-token AdvantageEstimator with
    it, and adapters whose trainer passes [N, T] give it each response's mean advantage."""

    uses_batch_statistics: bool = False
    """True when a response's loss depends on other responses of the call (a batch quantile, a
    batch covariance): then splitting a step into micro-batches changes the loss."""

    inputs: tuple[str, ...] = ()
    name: str = ""

    def __init__(self, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None) -> None:
        super().__init__()
        self._setup_keys(("response_mask", *self.inputs), ("loss_weights",), in_keys, out_keys)
        if not self.name:
            self.name = _snake(type(self).__name__)

    @property
    def metric_name(self) -> str:
        """The key of this filter's metric in the loss's output: ``filtered_<name>``."""
        return f"filtered_{self.name}"

    def keep(self, padding: Padding, **inputs: torch.Tensor) -> torch.Tensor:
        """The keep weights: bool, or float ≥ 0; [N, T] per token or [N] per response.

        ``padding`` is the call's :class:`~gspo_components.loss.numerics.Padding` (mask, lengths
        L_i); ``inputs`` are the raw entries named in ``inputs`` (clean them with
        ``padding.zero``). The result is detached; its value at padding is ignored.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement keep(padding, **inputs)")

    def _weights(self, td: TensorDictBase, pad: Padding, dtype: torch.dtype) -> torch.Tensor:
        """Clean, detached weights in ``dtype``: [N, T] with 0 at padding, or [N] (0 for an empty row)."""
        where = type(self).__name__
        inputs = {name: self._read(td, name) for name in self.inputs}
        with torch.no_grad():
            keep = self.keep(pad, **inputs)
        n, t = pad.mask.shape
        if not isinstance(keep, torch.Tensor) or tuple(keep.shape) not in ((n,), (n, t)):
            got = list(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"{where}.keep must return [N] = [{n}] or [N, T] = [{n}, {t}], got {got}")
        if keep.dtype == torch.bool:
            keep = keep.view(torch.uint8)
        keep = keep.detach().to(dtype)
        if keep.dim() == 1:
            return torch.where(pad.lengths > 0, keep, 0.0)
        return pad.zero(keep)

    def _check_finite(self, td: TensorDictBase, pad: Padding) -> None:
        """Standalone (outside a PolicyLoss, whose weighter and clipper check the shared inputs):
        float inputs of shape [N, T] or [N] must be finite at valid positions (validation on)."""
        checks = DeferredChecks(type(self).__name__)
        for name in self.inputs:
            x = td.get(self.key(name), None)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                continue  # keep() refuses it with its own message
            if x.shape == pad.mask.shape:
                checks.finite(f"'{name}' at valid positions (per-row sums)", pad.row_sum(x.detach()))
            elif x.shape == pad.lengths.shape:
                checks.finite(f"'{name}' of non-empty rows", torch.where(pad.lengths > 0, x.detach(), 0.0))
        checks.run()

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        mask = check_mask(type(self).__name__, "response_mask", self._read(td, "response_mask"))
        pad = Padding(mask)
        self._check_finite(td, pad)
        weights = self._weights(td, pad, torch.float32)
        if weights.dim() == 1:
            weights = pad.broadcast(weights)
        previous = td.get(self._out_map["loss_weights"], None)
        td.set(self._out_map["loss_weights"], weights if previous is None else previous * weights)
        return td


def removed_fraction(weights: torch.Tensor, pad: Padding) -> torch.Tensor:
    """The fraction of valid tokens with weight 0 (float32, no host synchronisation)."""
    tokens = pad.lengths.sum().clamp(min=1).to(torch.float32)
    if weights.dim() == 1:
        removed = (pad.lengths * (weights == 0)).sum()
    else:
        removed = count((weights == 0) & pad.mask, -1).sum()
    return removed.to(torch.float32) / tokens


def filter_weights(
    filters: list[TokenFilter], td: TensorDictBase, pad: Padding, dtype: torch.dtype
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The product of the filters' weights ([N] when every filter's is, else [N, T]) and their
    metrics, for PolicyLoss."""
    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    for f in filters:
        w = f._weights(td, pad, dtype)
        metrics[f.metric_name] = removed_fraction(w, pad)
        if total is None:
            total = w
        elif total.dim() == w.dim():
            total = total * w
        else:
            total = (total.unsqueeze(-1) if total.dim() == 1 else total) * (
                w.unsqueeze(-1) if w.dim() == 1 else w
            )
    return total, metrics
