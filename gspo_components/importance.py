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

All arithmetic runs in float32 (float64 if an input is float64), whatever the input dtype, and
padding positions are replaced by 0 with ``torch.where`` before any arithmetic, so NaN or ±inf
there changes neither values nor gradients. Rows with no valid token get log_ratio 0.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from ._checks import check_mask, check_token_tensor, compute_dtype
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


def _clean_inputs(
    where: str, log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = check_mask(where, "response_mask", mask)
    log_probs = check_token_tensor(where, "log_probs", log_probs, "response_mask", mask)
    old_log_probs = check_token_tensor(where, "old_log_probs", old_log_probs, "response_mask", mask)
    dtype = compute_dtype(log_probs, old_log_probs)
    zero = torch.zeros((), dtype=dtype, device=log_probs.device)
    lp = torch.where(mask, log_probs.to(dtype), zero)
    old = torch.where(mask, old_log_probs.detach().to(dtype), zero)
    return lp, old, mask


def sequence_mean_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log s_i = (1/L_i) Σ_t (ℓ_{i,t} − ℓ^old_{i,t}), shape [N]; 0 for an empty row.

    GSPO (arXiv 2507.18071) eq. 7: s_i is the geometric mean of the token ratios.
    """
    lp, old, mask = _clean_inputs("sequence_mean_log_ratio", log_probs, old_log_probs, response_mask)
    return _sequence_mean(lp - old, mask)


def _sequence_mean(token_log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    lengths = mask.sum(-1)
    total = token_log_ratio.sum(-1)
    return total / lengths.clamp(min=1).to(total.dtype)


def token_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log w_{i,t} = ℓ_{i,t} − ℓ^old_{i,t} (PPO; GRPO, DeepSeekMath arXiv 2402.03300 eq. 3).

    Returns [N, T] in float32 (float64 for float64 inputs), 0 at padding. ``old_log_probs``
    is treated as a constant (detached).
    """
    lp, old, mask = _clean_inputs("token_log_ratio", log_probs, old_log_probs, response_mask)
    return torch.where(mask, lp - old, torch.zeros((), dtype=lp.dtype, device=lp.device))


def sequence_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's sequence ratio, in log space, broadcast to every valid token of its row.

    log_ratio[i, t] = log s_i = (1/L_i) Σ_t' (ℓ_{i,t'} − ℓ^old_{i,t'})  (GSPO eq. 7), so that
    s_i = (Π_t w_{i,t})^{1/L_i} is the geometric mean of the token ratios. The gradient flows to
    every token of the row with weight 1/L_i. This is *not* the product of the token ratios; the
    product is a rollout-correction weight (:mod:`gspo_components.rollout_correction`).
    """
    lp, old, mask = _clean_inputs("sequence_log_ratio", log_probs, old_log_probs, response_mask)
    log_s = _sequence_mean(lp - old, mask)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return torch.where(mask, log_s.unsqueeze(-1).expand_as(lp), zero)


def sequence_token_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """GSPO-token's ratio (GSPO eq. 14), in log space.

    log s_{i,t} = sg[log s_i] + (ℓ_{i,t} − sg[ℓ_{i,t}]). Its value equals log s_i exactly (the
    bracket is x − x = 0); its gradient is ∇ℓ_{i,t} alone, so each token's weight can meet its own
    advantage Â_{i,t}. With Â_{i,t} = Â_i it gives GSPO's value, clip decisions and gradient.
    """
    lp, old, mask = _clean_inputs("sequence_token_log_ratio", log_probs, old_log_probs, response_mask)
    log_s = _sequence_mean(lp.detach() - old, mask).unsqueeze(-1)
    straight_through = lp - lp.detach()  # exactly 0 in value, identity in gradient
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return torch.where(mask, log_s + straight_through, zero)


class _LogRatioModule(KeyedModule):
    """Reads ``log_probs``, ``old_log_probs``, ``response_mask``; writes ``log_ratio``."""

    _fn = staticmethod(token_log_ratio)

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


class TokenLogRatio(_LogRatioModule):
    __doc__ = "Token-level weighter (GRPO/PPO): log_ratio = ℓ − ℓ^old.\n\n" + (token_log_ratio.__doc__ or "")
    _fn = staticmethod(token_log_ratio)


class SequenceLogRatio(_LogRatioModule):
    __doc__ = "Sequence-level weighter (GSPO): log_ratio = log of the geometric-mean ratio.\n\n" + (
        sequence_log_ratio.__doc__ or ""
    )
    _fn = staticmethod(sequence_log_ratio)


class SequenceTokenLogRatio(_LogRatioModule):
    __doc__ = "Sequence-token weighter (GSPO-token): value of GSPO, token-wise gradient.\n\n" + (
        sequence_token_log_ratio.__doc__ or ""
    )
    _fn = staticmethod(sequence_token_log_ratio)
