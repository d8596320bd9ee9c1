"""ImportanceWeighter: the log of each token's importance weight against π_old.

Notation (docs/algorithms.md): ℓ_{i,t} = log π_θ(y_{i,t} | x, y_{i,<t}), ℓ^old the same under
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
from ._module import KeyedModule, KeyOverrides
from .numerics import Padding

__all__ = [
    "ImportanceWeighter",
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
    compute dtype, and the call's :class:`~gspo_components.loss.numerics.Padding` (mask, L_i).

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
    """(1/L_i) Σ_t d_{i,t}, [N]; 0 for an empty row (d is 0 at padding, so no second masking)."""
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


class ImportanceWeighter(KeyedModule):
    """The ImportanceWeighter role: reads ``log_probs``, ``old_log_probs``, ``response_mask``;
    writes ``log_ratio``.

    A new weighter subclasses this and implements :meth:`log_ratio` on clean tensors; reading the
    keys, validating them, removing the padding and the float32 upcast are done here, once::

        class ClippedSequenceLogRatio(ImportanceWeighter):
            level = "sequence"

            def log_ratio(self, token_log_ratio, padding):
                return padding.row_mean(token_log_ratio).clamp(-1.0, 1.0)

    ``level`` says what the log-ratio is: ``"token"`` (one per token), ``"sequence"`` (one per
    response, [N]) or ``"sequence-token"`` (a sequence value with token-wise gradients). A recipe
    refuses per-token advantages with a ``"sequence"`` weighter.
    """

    level: str = "token"

    def __init__(self, *, in_keys: KeyOverrides = None, out_keys: KeyOverrides = None) -> None:
        super().__init__()
        self._setup_keys(("log_probs", "old_log_probs", "response_mask"), ("log_ratio",), in_keys, out_keys)

    def log_ratio(self, token_log_ratio: torch.Tensor, padding: Padding) -> torch.Tensor:
        """The log-ratio from d_{i,t} = ℓ_{i,t} − sg[ℓ^old_{i,t}] ([N, T], float32 or float64, 0 at
        padding) and the call's :class:`~gspo_components.loss.numerics.Padding`.

        Return [N, T] (any value at padding: it is cleaned afterwards) or [N], one per response.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement log_ratio(token_log_ratio, padding)")

    def _compute(self, td: TensorDictBase, checks: DeferredChecks | None) -> tuple[torch.Tensor, Padding]:
        d, pad = _masked_token_log_ratio(
            self._where or type(self).__name__,
            self._read(td, "log_probs"),
            self._read(td, "old_log_probs"),
            self._read(td, "response_mask"),
            checks,
        )
        out = self.log_ratio(d, pad)
        if out.shape not in (d.shape, d.shape[:1]):
            raise ValueError(
                f"{type(self).__name__}.log_ratio must return [N, T] = {list(d.shape)} or [N] = "
                f"[{d.shape[0]}], got {list(out.shape)}"
            )
        return out, pad

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        out, pad = self._compute(td, None)
        if out.dim() == 1:
            out = pad.broadcast(out)
        elif not self._clean_output:
            out = pad.zero(out)
        td.set(self._out_map["log_ratio"], out)
        return td

    def _chain(self, td: TensorDictBase, checks: DeferredChecks) -> tuple[torch.Tensor, Padding]:
        """PolicyLoss's single pass: (log_ratio, padding). A per-response log-ratio stays [N]."""
        out, pad = self._compute(td, checks)
        if out.dim() == 2 and not self._clean_output:
            out = pad.zero(out)
        return out, pad

    _clean_output = False  # True when log_ratio() returns 0 at padding (the stock weighters)
    _where = ""  # the name error messages use: the stock weighters', that of their pure function


class TokenLogRatio(ImportanceWeighter):
    _where = "token_log_ratio"
    __doc__ = "Token-level weighter (GRPO/PPO): log_ratio = ℓ − ℓ^old.\n\n" + (token_log_ratio.__doc__ or "")
    level = "token"
    _clean_output = True

    def log_ratio(self, token_log_ratio: torch.Tensor, padding: Padding) -> torch.Tensor:
        return token_log_ratio


class SequenceLogRatio(ImportanceWeighter):
    _where = "sequence_log_ratio"
    __doc__ = "Sequence-level weighter (GSPO): log_ratio = log of the geometric-mean ratio.\n\n" + (
        sequence_log_ratio.__doc__ or ""
    )
    level = "sequence"

    def log_ratio(self, token_log_ratio: torch.Tensor, padding: Padding) -> torch.Tensor:
        return _row_mean(token_log_ratio, padding.lengths)


class SequenceTokenLogRatio(ImportanceWeighter):
    _where = "sequence_token_log_ratio"
    __doc__ = "Sequence-token weighter (GSPO-token): value of GSPO, token-wise gradient.\n\n" + (
        sequence_token_log_ratio.__doc__ or ""
    )
    level = "sequence-token"
    _clean_output = True

    def log_ratio(self, token_log_ratio: torch.Tensor, padding: Padding) -> torch.Tensor:
        return _sequence_token(token_log_ratio, padding)
