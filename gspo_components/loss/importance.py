"""ImportanceWeighter: the log of each token's importance weight against π_old.

Notation (``ALGORITHMS.md``): ℓ_{i,t} = log π_θ(y_{i,t} | x, y_{i,<t}), ℓ^old the same under
π_old, L_i the number of valid tokens of response i, sg[·] stop-gradient.

Three levels, each a pure function on ``[N, T]`` tensors and a TensorDict module writing
``log_ratio`` ``[N, T]``:

=======================  ==============================================  ========================
level                    log_ratio[i, t]                                 source
=======================  ==============================================  ========================
token                    ℓ_{i,t} − ℓ^old_{i,t}                           PPO / GRPO
sequence                 log s_i = (1/L_i) Σ_t (ℓ_{i,t} − ℓ^old_{i,t})   GSPO eq. 7 (geometric
                                                                         mean of token ratios)
sequence-token           sg[log s_i] + (ℓ_{i,t} − sg[ℓ_{i,t}])           GSPO-token eq. 14
=======================  ==============================================  ========================

The sequence level is broadcast over the valid tokens of its row, so one clipper serves every
level. The sequence-token form is computed as ``sg(log s_i) + (ℓ − sg ℓ)``: the bracket is exactly
0, so its value equals the sequence level bit for bit while its gradient is token-wise.

All arithmetic runs in float32 (float64 if an input is float64), whatever the input dtype. The
token log-ratio ℓ − ℓ^old is masked with one ``torch.where`` before anything else uses it, so NaN
or ±inf at padding changes neither values nor gradients. Rows with no valid token get
log_ratio 0. With validation on (:func:`gspo_components.set_validation`), a NaN or ±inf log-prob at a
*valid* position is a ``ValueError``; with it off, it makes the loss NaN.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from ._checks import DeferredChecks, check_mask, check_token_tensor, compute_dtype
from ._masking import Padding
from ._module import KeyedModule, KeyOverrides

__all__ = [
    "SequenceLogRatio",
    "SequenceTokenLogRatio",
    "TokenLogRatio",
    "sequence_log_ratio",
    "sequence_mean_log_ratio",
    "sequence_token_log_ratio",
    "token_log_ratio",
]


def _masked_token_log_ratio(
    where: str,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    checks: DeferredChecks | None = None,
) -> tuple[torch.Tensor, Padding]:
    """Validate once and return (d, padding): d = where(m, ℓ − sg[ℓ^old], 0) [N, T] in the
    compute dtype, and the call's :class:`~gspo_components.loss._masking.Padding` (mask, L_i).

    One masking after the subtraction suffices: the backward of a subtraction passes the
    incoming gradient on unchanged (never multiplied by an input), and the masking sends exactly
    0 to padding, so NaN or ±inf there touches neither values nor gradients. With validation on,
    the per-row sums of d must be finite: a NaN or ±inf *valid* log-prob is an error.
    """
    mask = check_mask(where, "response_mask", response_mask)
    log_probs = check_token_tensor(where, "log_probs", log_probs, "response_mask", mask)
    old_log_probs = check_token_tensor(where, "old_log_probs", old_log_probs, "response_mask", mask)
    dtype = compute_dtype(log_probs, old_log_probs)
    pad = Padding(mask)
    d = pad.zero(log_probs.to(dtype) - old_log_probs.detach().to(dtype))
    own = checks is None
    checks = DeferredChecks(where) if own else checks
    if checks.active:
        checks.finite("'log_probs' and 'old_log_probs' at valid positions (per-row sums)", d.detach().sum(-1))
    if own:
        checks.run()
    return d, pad


def _row_mean(d: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(1/L_i) Σ_t d_{i,t}, [N]; 0 for an empty row (d is 0 at padding)."""
    return d.sum(-1) / lengths.clamp(min=1).to(d.dtype)


def _sequence_token(d: torch.Tensor, pad: Padding) -> torch.Tensor:
    log_s = _row_mean(d.detach(), pad.lengths).unsqueeze(-1)
    return pad.zero(log_s + (d - d.detach()))  # d − sg[d]: value 0, gradient ∇ℓ


def sequence_mean_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log s_i = (1/L_i) Σ_t (ℓ_{i,t} − ℓ^old_{i,t}), shape [N]; 0 for an empty row.

    GSPO (arXiv 2507.18071) eq. 7: s_i is the geometric mean of the token ratios.
    """
    d, pad = _masked_token_log_ratio("sequence_mean_log_ratio", log_probs, old_log_probs, response_mask)
    return _row_mean(d, pad.lengths)


def token_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log w_{i,t} = ℓ_{i,t} − ℓ^old_{i,t} (PPO; GRPO, DeepSeekMath arXiv 2402.03300 eq. 3).

    Returns [N, T] in float32 (float64 for float64 inputs), 0 at padding. ``old_log_probs``
    is treated as a constant (detached).
    """
    return _masked_token_log_ratio("token_log_ratio", log_probs, old_log_probs, response_mask)[0]


def sequence_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's sequence ratio, in log space, broadcast to every valid token of its row.

    log_ratio[i, t] = log s_i = (1/L_i) Σ_t' (ℓ_{i,t'} − ℓ^old_{i,t'})  (GSPO eq. 7), so that
    s_i = (Π_t w_{i,t})^{1/L_i} is the geometric mean of the token ratios. The gradient flows to
    every token of the row with weight 1/L_i. This is *not* the product of the token ratios; the
    product is a rollout-correction weight (:mod:`gspo_components.loss.rollout_correction`).
    """
    d, pad = _masked_token_log_ratio("sequence_log_ratio", log_probs, old_log_probs, response_mask)
    return pad.zero(_row_mean(d, pad.lengths).unsqueeze(-1))


def sequence_token_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """GSPO-token's ratio (GSPO eq. 14), in log space.

    log s_{i,t} = sg[log s_i] + (ℓ_{i,t} − sg[ℓ_{i,t}]). Its value equals log s_i exactly (the
    bracket is x − x = 0); its gradient is ∇ℓ_{i,t} alone, so each token's weight can meet its own
    advantage Â_{i,t}. With Â_{i,t} = Â_i it gives GSPO's value, clip decisions and gradient.
    """
    d, pad = _masked_token_log_ratio("sequence_token_log_ratio", log_probs, old_log_probs, response_mask)
    return _sequence_token(d, pad)


class _LogRatioModule(KeyedModule):
    """Reads ``log_probs``, ``old_log_probs``, ``response_mask``; writes ``log_ratio``."""

    _fn = staticmethod(token_log_ratio)
    _level = "token"

    def __init__(self, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None) -> None:
        super().__init__()
        self._setup_keys(("log_probs", "old_log_probs", "response_mask"), ("log_ratio",), in_keys, out_keys)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        log_ratio = type(self)._fn(
            self._read(td, "log_probs"),
            self._read(td, "old_log_probs"),
            self._read(td, "response_mask"),
        )
        td.set(self._out_map["log_ratio"], log_ratio)
        return td

    def _chain(self, td: TensorDictBase, checks: DeferredChecks) -> tuple[torch.Tensor, Padding]:
        """PolicyLoss's single pass: (log_ratio, padding). A sequence-level log-ratio is
        returned per row, [N] (it is constant over the row's valid tokens), not broadcast."""
        d, pad = _masked_token_log_ratio(
            type(self)._fn.__name__,
            self._read(td, "log_probs"),
            self._read(td, "old_log_probs"),
            self._read(td, "response_mask"),
            checks,
        )
        if self._level == "token":
            return d, pad
        if self._level == "sequence":
            return _row_mean(d, pad.lengths), pad
        return _sequence_token(d, pad), pad


class TokenLogRatio(_LogRatioModule):
    __doc__ = "Token-level weighter (GRPO/PPO): log_ratio = ℓ − ℓ^old.\n\n" + (token_log_ratio.__doc__ or "")
    _fn = staticmethod(token_log_ratio)


class SequenceLogRatio(_LogRatioModule):
    __doc__ = "Sequence-level weighter (GSPO): log_ratio = log of the geometric-mean ratio.\n\n" + (
        sequence_log_ratio.__doc__ or ""
    )
    _fn = staticmethod(sequence_log_ratio)
    _level = "sequence"


class SequenceTokenLogRatio(_LogRatioModule):
    __doc__ = "Sequence-token weighter (GSPO-token): value of GSPO, token-wise gradient.\n\n" + (
        sequence_token_log_ratio.__doc__ or ""
    )
    _fn = staticmethod(sequence_token_log_ratio)
    _level = "sequence-token"
