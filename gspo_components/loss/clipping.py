"""Clipper: from ``log_ratio`` and ``advantages`` to a per-token loss and a clip indicator.

Every clipper returns ``(token_loss, clipped)``, both ``[N, T]``: ``token_loss`` is the *negative*
per-token surrogate (to be minimised; the Objective aggregates it) and ``clipped`` marks the
tokens whose gradient the clipper removed or truncated. Advantages are ``[N]`` (broadcast over
the row) or ``[N, T]``. Padding positions give loss 0 and ``clipped = False``.

The ratio is formed as ``exp(clamp(log_ratio, -max_log_ratio, max_log_ratio))`` in float32 (or
float64), never in the model's dtype: in bf16 the GSPO band [1 − 3e-4, 1 + 4e-4] contains only
1.0. The clamp (default ±20, as in verl) keeps ``exp`` finite; a ratio beyond e^±20 gets no
gradient through the clamp. Pass ``max_log_ratio=None`` to disable it.

================  =====================================================================  ==========
clipper           per-token surrogate J_t (loss is −J_t)                                  source
================  =====================================================================  ==========
PPOClip           min(w Â, clip(w, 1−ε_low, 1+ε_high) Â)                                  PPO; GRPO;
                                                                                         GSPO eq. 5
 + dual_clip=c    for Â < 0: max(that, c Â)                                               Ye et al.
                                                                                         2020
CISPOClip         sg[clip(w, 1−ε_low, 1+ε_high)] · Â · ℓ  (gradient); value sg[ŵ] Â       MiniMax-M1
                                                                                         2506.13585
SAPOGate          (4/τ) σ(τ (w − 1)) · Â, τ = τ_pos if Â > 0 else τ_neg                   SAPO
                                                                                         2511.20347
NoClip            w Â                                                                     REINFORCE
                                                                                         with IS
================  =====================================================================  ==========

PPOClip is written as ``where(C, clip(w) Â, w Â)`` with the clip condition
C = (Â > 0 ∧ w > 1+ε_high) ∨ (Â < 0 ∧ w < 1−ε_low) (strict inequalities). This equals the min
form exactly, and makes the gradient of a clipped token exactly zero and that of every other
token exactly Â ∇w, with no tie-splitting at the band's edges.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tensordict import TensorDictBase

from ._checks import (
    DeferredChecks,
    check_advantages,
    check_float,
    check_mask,
    check_range,
    compute_dtype,
)
from ._module import KeyedModule, KeyOverrides
from .numerics import DEFAULT_MAX_LOG_RATIO, Padding, clamped_exp, select

__all__ = [
    "CISPOClip",
    "Clipper",
    "NoClip",
    "PPOClip",
    "SAPOGate",
    "cispo_loss",
    "ppo_clip_loss",
    "sapo_loss",
    "unclipped_loss",
]

# A kernel returns (−J, C, C_high, e): C_high marks the clipped tokens with w > 1 (the others have
# w < 1: a stock clipper never clips w = 1), and e = exp(log_ratio) unclamped and detached, both
# from what the kernel already holds, for the metrics.
Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _prepare(
    where: str,
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, Padding]:
    """Validate, clean and upcast the pure functions' inputs; return (log_ratio, advantages,
    padding) with log_ratio [N, T] 0 at padding and advantages [N, 1] or [N, T] (0 at padding)."""
    log_ratio = check_float(where, "log_ratio", log_ratio)
    if log_ratio.dim() != 2:
        raise ValueError(f"{where}: 'log_ratio' must have shape [N, T], got {list(log_ratio.shape)}")
    if response_mask is None:
        mask = torch.ones(log_ratio.shape, dtype=torch.bool, device=log_ratio.device)
    else:
        mask = check_mask(where, "response_mask", response_mask, log_ratio.shape, like="log_ratio")
    advantages = check_advantages(where, "advantages", advantages, mask)
    dtype = compute_dtype(log_ratio, advantages)
    pad = Padding(mask)
    log_ratio = pad.zero(log_ratio.to(dtype))
    checks = DeferredChecks(where)
    if checks.active:
        checks.finite("'log_ratio' at valid positions (per-row sums)", log_ratio.detach().sum(-1))
    adv = _clean_advantages(advantages, pad, dtype, checks)
    checks.run()
    return log_ratio, (adv.unsqueeze(-1) if adv.dim() == 1 else adv), pad


def _clean_advantages(
    advantages: torch.Tensor, pad: Padding, dtype: torch.dtype, checks: DeferredChecks
) -> torch.Tensor:
    """Detached advantages in ``dtype``: [N] with 0 for an empty row, [N, T] with 0 at padding
    (padding and empty rows are inert). With validation on, they must be finite where valid."""
    adv = advantages.detach().to(dtype)
    if adv.dim() == 2:
        adv = pad.zero(adv)
        if checks.active:
            checks.finite("'advantages' at valid positions (per-row sums)", adv.sum(-1))
    else:
        adv = torch.where(pad.lengths > 0, adv, 0.0)
        checks.finite("'advantages' of the non-empty rows", adv)
    return adv


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _finish(
    neg_surrogate: torch.Tensor,
    clipped: torch.Tensor,
    _high: torch.Tensor,
    _ratio: torch.Tensor,
    pad: Padding,
) -> tuple[torch.Tensor, torch.Tensor]:
    if clipped.dim() == 1:  # one flag per row (a clipper that never clips)
        clipped = clipped.unsqueeze(-1)
    return pad.zero(neg_surrogate), clipped & pad.mask


def _check_max_log_ratio(where: str, value: float | None) -> float | None:
    if value is None:
        return None
    return check_range(where, "max_log_ratio", value, 0.0, None, low_inclusive=False)


def _ppo_params(
    where: str, eps_low: float, eps_high: float, dual_clip: float | None, max_log_ratio: float | None
) -> dict:
    return {
        "eps_low": check_range(where, "eps_low", eps_low, 0.0, 1.0),
        "eps_high": check_range(where, "eps_high", eps_high, 0.0, None),
        "dual_clip": None
        if dual_clip is None
        else check_range(where, "dual_clip", dual_clip, 1.0, None, low_inclusive=False),
        "max_log_ratio": _check_max_log_ratio(where, max_log_ratio),
    }


def ppo_clip_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate with asymmetric ε (DAPO's clip-higher) and optional dual clip.

    J_t = min(w Â, clip(w, 1−ε_low, 1+ε_high) Â); with ``dual_clip = c > 1`` and Â < 0,
    J_t = max(J_t, c Â) (Ye et al. 2020, "Mastering Complex Control in MOBA Games"), which bounds
    the loss of a large ratio on a negative advantage.

    Returns ``(−J_t, clipped)``; ``clipped`` is C_t = (Â>0 ∧ w>1+ε_high) ∨ (Â<0 ∧ w<1−ε_low),
    or-ed with the dual-clip condition (Â<0 ∧ w>c).
    """
    p = _ppo_params("ppo_clip_loss", eps_low, eps_high, dual_clip, max_log_ratio)
    lr, adv, pad = _prepare("ppo_clip_loss", log_ratio, advantages, response_mask)
    return _finish(*_ppo_kernel(lr, adv, **p), pad)


def _ppo_kernel(
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    max_log_ratio: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(−J, C, C_high) on clean, broadcastable inputs, with as few full-size passes as possible.

    The clip condition C = (Â>0 ∧ w>1+ε_high) ∨ (Â<0 ∧ w<1−ε_low) is computed as
    sign(Â) · (w − b) > 0 with b = 1+ε_high where Â > 0, else 1−ε_low: for floats x − y > 0
    exactly when x > y, and Â = 0 or NaN gives False. −J = where(C, b, w) · (−Â) equals
    −where(C, b Â, w Â) bit for bit (the ``where`` is a :func:`select` while w is finite).
    """
    ratio, raw = clamped_exp(log_ratio, max_log_ratio)
    bound = torch.where(adv > 0, _const(1.0 + eps_high, adv), _const(1.0 - eps_low, adv))
    clipped = (ratio - bound) * torch.sign(adv) > 0
    if max_log_ratio is None:  # w may be inf: a multiplication by 0 would give NaN
        neg = torch.where(clipped, bound, ratio) * (-adv)
    else:
        neg = select(clipped, bound, ratio) * (-adv)
    high = clipped & (adv > 0)  # Â > 0 is clipped only at w > 1 + ε_high ≥ 1; Â < 0 only at w < 1
    if dual_clip is not None:
        dual = (adv < 0) & (ratio > dual_clip)
        neg = torch.where(dual, -(dual_clip * adv), neg)
        clipped = clipped | dual
        high = high | dual
    return neg, clipped, high, raw


def _cispo_params(where: str, eps_high: float, eps_low: float | None, max_log_ratio: float | None) -> dict:
    return {
        "eps_high": check_range(where, "eps_high", eps_high, 0.0, None),
        "eps_low": None if eps_low is None else check_range(where, "eps_low", eps_low, 0.0, 1.0),
        "max_log_ratio": _check_max_log_ratio(where, max_log_ratio),
    }


def cispo_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    *,
    eps_high: float = 0.28,
    eps_low: float | None = None,
    max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the IS weight, not the update.

    ∇J_t = sg[ŵ] · Â · ∇ℓ_t with ŵ = clamp(w, 1−ε_low, 1+ε_high) (no lower bound when
    ``eps_low`` is None, as in the paper). Every token keeps a gradient. The value is written as
    sg[ŵ] · Â · exp(log w − sg[log w]), which equals ŵ Â (so on-policy it is Â, like the other
    clippers) and has exactly the gradient above, because ∇ log w = ∇ℓ.

    ``clipped`` marks the truncated tokens (w > 1+ε_high, or w < 1−ε_low).
    """
    p = _cispo_params("cispo_loss", eps_high, eps_low, max_log_ratio)
    lr, adv, pad = _prepare("cispo_loss", log_ratio, advantages, response_mask)
    return _finish(*_cispo_kernel(lr, adv, **p), pad)


class _CISPOSurrogate(torch.autograd.Function):
    """−ŵ Â in value with gradient −ŵ Â ∇log w inside the ±bound band (0 outside it, as the clamp
    of w gives): one fused node instead of the value-plus-zero-bracket form's five passes."""

    @staticmethod
    def forward(ctx, log_ratio: torch.Tensor, neg: torch.Tensor, bound: float | None) -> torch.Tensor:  # type: ignore[override]
        ctx.bound = bound
        ctx.save_for_backward(neg, log_ratio if bound is not None else None)
        return neg

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        neg, log_ratio = ctx.saved_tensors
        scale = grad * neg
        if ctx.bound is not None:
            scale = scale * (log_ratio.abs() <= ctx.bound).view(torch.uint8).to(scale.dtype)
        return scale, None, None


def _cispo_kernel(
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    *,
    eps_high: float,
    eps_low: float | None,
    max_log_ratio: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(−J, C, C_high, e) on clean inputs. The value is −ŵ Â with ŵ = clamp(w, 1−ε_low, 1+ε_high)
    (w itself clamped to [e^−b, e^b], b = ``max_log_ratio``): one clamp with the tighter bounds.
    The gradient is −ŵ Â ∇ℓ inside the ±b band and 0 outside it, from one autograd node."""
    lr = log_ratio.detach()
    raw = torch.exp(lr)
    high = 1.0 + eps_high
    low = 0.0 if eps_low is None else 1.0 - eps_low
    if max_log_ratio is not None:
        high = min(high, math.exp(max_log_ratio))
        low = max(low, math.exp(-max_log_ratio))
    clipped = above = raw > 1.0 + eps_high
    if eps_low is not None:
        clipped = clipped | (raw < 1.0 - eps_low)
    neg = raw.clamp(min=low if low > 0.0 else None, max=high) * (-adv)
    if log_ratio.requires_grad:
        neg = _CISPOSurrogate.apply(log_ratio, neg, max_log_ratio)
    return neg, clipped, above, raw


def _sapo_params(where: str, tau_pos: float, tau_neg: float, max_log_ratio: float | None) -> dict:
    return {
        "tau_pos": check_range(where, "tau_pos", tau_pos, 0.0, None, low_inclusive=False),
        "tau_neg": check_range(where, "tau_neg", tau_neg, 0.0, None, low_inclusive=False),
        "max_log_ratio": _check_max_log_ratio(where, max_log_ratio),
    }


def sapo_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAPO's soft gate (Gao et al., "Soft Adaptive Policy Optimization", arXiv 2511.20347).

    J_t = f_τ(w) Â with f_τ(w) = (4/τ) σ(τ (w − 1)), τ = τ_pos if Â > 0 else τ_neg. Since
    f'_τ(1) = 1, the on-policy gradient is Â ∇ℓ, as for every other clipper. Nothing is
    clipped hard, so ``clipped`` is all False.
    """
    p = _sapo_params("sapo_loss", tau_pos, tau_neg, max_log_ratio)
    lr, adv, pad = _prepare("sapo_loss", log_ratio, advantages, response_mask)
    return _finish(*_sapo_kernel(lr, adv, **p), pad)


def _sapo_kernel(
    log_ratio: torch.Tensor, adv: torch.Tensor, *, tau_pos: float, tau_neg: float, max_log_ratio: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ratio, raw = clamped_exp(log_ratio, max_log_ratio)
    tau = torch.where(adv > 0, _const(tau_pos, adv), _const(tau_neg, adv))
    gate = (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0))
    neg = -(gate * adv)
    never = torch.zeros(neg.shape[:1], dtype=torch.bool, device=neg.device)  # per row: no metric pass
    return neg, never, never, raw


def _unclipped_kernel(
    log_ratio: torch.Tensor, adv: torch.Tensor, *, max_log_ratio: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ratio, raw = clamped_exp(log_ratio, max_log_ratio)
    neg = -(ratio * adv)
    never = torch.zeros(neg.shape[:1], dtype=torch.bool, device=neg.device)  # per row: no metric pass
    return neg, never, never, raw


def unclipped_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    *,
    max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """No clipping: J_t = w Â (importance-weighted REINFORCE). ``clipped`` is all False."""
    max_log_ratio = _check_max_log_ratio("unclipped_loss", max_log_ratio)
    lr, adv, pad = _prepare("unclipped_loss", log_ratio, advantages, response_mask)
    return _finish(*_unclipped_kernel(lr, adv, max_log_ratio=max_log_ratio), pad)


class Clipper(KeyedModule):
    """The Clipper role: reads ``log_ratio``, ``advantages``, ``response_mask`` (and the extra
    inputs named in ``inputs``); writes ``token_loss`` (−J, to be minimised) and ``clipped``.

    A new clipper subclasses this and implements :meth:`surrogate` on clean tensors; the keys,
    the validation, the padding and the float32 upcast are handled here::

        class HardGate(Clipper):
            def __init__(self, band: float = 0.1, **kwargs):
                super().__init__(**kwargs)
                self.band = band

            def surrogate(self, log_ratio, advantages, padding):
                adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
                outside = log_ratio.abs() > self.band
                w = clamped_ratio(log_ratio, self.max_log_ratio)
                return -(w * adv) * (~outside), outside

    **The per-response slot.** ``surrogate`` may return −J as [N]: one loss per response (GMPO's
    −Â_i g_i, for instance). The Objective counts it at each of the response's valid tokens, so
    ``seq-mean-token-mean`` gives the mean over responses and ``token-mean`` the length-weighted
    mean; ``token_loss`` then holds [N].
    """

    never_clips: bool = False
    """True when the clipper never cuts a token's gradient (a soft weight, a penalty): its
    ``clipped`` output is then ignored and the clip metrics are 0, without a pass over the batch."""

    per_response_advantages: bool = False
    """True when the part needs one advantage per response ([N]) and refuses [N, T] (GMPO's
    geometric mean, VESPO's sequence weight): a recipe refuses a per-token AdvantageEstimator with
    it, and adapters whose trainer passes [N, T] give it each response's mean advantage."""

    uses_batch_statistics: bool = False
    """True when a response's loss depends on other responses of the call (a batch quantile, a
    batch covariance): then splitting a step into micro-batches changes the loss."""

    inputs: tuple[str, ...] = ()
    """Canonical names of extra TensorDict entries :meth:`surrogate` receives as keyword arguments
    (raw: clean them with ``padding.zero``); renamable through ``in_keys``."""

    def __init__(
        self,
        *,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        in_keys: KeyOverrides = None,
        out_keys: KeyOverrides = None,
    ) -> None:
        super().__init__()
        self._setup_keys(
            ("log_ratio", "advantages", "response_mask", *self.inputs),
            ("token_loss", "clipped"),
            in_keys,
            out_keys,
        )
        self.max_log_ratio = _check_max_log_ratio(type(self).__name__, max_log_ratio)
        self.params = {"max_log_ratio": self.max_log_ratio}

    def surrogate(
        self, log_ratio: torch.Tensor, advantages: torch.Tensor, padding: Padding, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(−J, clipped) from clean inputs.

        ``log_ratio`` is [N, T] (float32 or float64, 0 at padding); ``advantages`` are detached,
        [N] (0 for an empty row) or [N, T] (0 at padding); ``padding`` is the call's
        :class:`~gspo_components.loss.numerics.Padding`. Return −J as [N, T] (any value at
        padding) or [N] (one per response), and ``clipped`` as a bool [N, T] or [N] marking what
        the clipper cut (for the ``clip_fraction`` metrics).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement surrogate(log_ratio, advantages, padding)"
        )

    def _inputs(self, td: TensorDictBase, pad: Padding) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        where = type(self).__name__
        advantages = check_advantages(where, "advantages", self._read(td, "advantages"), pad.mask)
        return advantages, {name: self._read(td, name) for name in self.inputs}

    def _call(
        self,
        log_ratio: torch.Tensor,
        advantages: torch.Tensor,
        pad: Padding,
        extra: dict,
        checks: DeferredChecks,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        where = type(self).__name__
        dtype = compute_dtype(log_ratio, advantages)
        adv = _clean_advantages(advantages, pad, dtype, checks)
        if log_ratio.dim() == 1:
            log_ratio = pad.broadcast(log_ratio.to(dtype))
        neg, clipped = self.surrogate(log_ratio.to(dtype), adv, pad, **extra)
        n, t = pad.mask.shape
        for name, value in (("loss", neg), ("clipped", clipped)):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) not in ((n,), (n, t)):
                got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"{where}.surrogate: its {name} must be [N] = [{n}] or [N, T] = [{n}, {t}], got {got}"
                )
        if clipped.dtype != torch.bool:
            raise ValueError(f"{where}.surrogate: 'clipped' must be a bool tensor, got {clipped.dtype}")
        clipped = clipped & (pad.mask if clipped.dim() == 2 else pad.lengths > 0)
        return neg, clipped

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        where = type(self).__name__
        mask = check_mask(where, "response_mask", self._read(td, "response_mask"))
        log_ratio = check_float(where, "log_ratio", self._read(td, "log_ratio"))
        if log_ratio.shape != mask.shape:
            raise ValueError(
                f"{where}: 'log_ratio' must have shape [N, T] = {list(mask.shape)} like 'response_mask', "
                f"got {list(log_ratio.shape)}"
            )
        pad = Padding(mask)
        checks = DeferredChecks(where)
        log_ratio = pad.zero(log_ratio.to(compute_dtype(log_ratio)))
        if checks.active:
            checks.finite("'log_ratio' at valid positions (per-row sums)", log_ratio.detach().sum(-1))
        advantages, extra = self._inputs(td, pad)
        neg, clipped = self._call(log_ratio, advantages, pad, extra, checks)
        checks.run()
        if self.never_clips:
            clipped = torch.zeros(pad.lengths.shape, dtype=torch.bool, device=pad.mask.device)
        td.set(self._out_map["token_loss"], pad.zero(neg) if neg.dim() == 2 else neg)
        td.set(self._out_map["clipped"], clipped)
        return td

    def _chain(
        self, td: TensorDictBase, log_ratio: torch.Tensor, pad: Padding, checks: DeferredChecks
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """PolicyLoss's single pass, on the weighter's clean log-ratio ([N] or [N, T]): (−J, C,
        C_high, exp(log_ratio)); the last two are None (the Objective derives them)."""
        advantages, extra = self._inputs(td, pad)
        neg, clipped = self._call(log_ratio, advantages, pad, extra, checks)
        if self.never_clips:
            clipped = torch.zeros(pad.lengths.shape, dtype=torch.bool, device=pad.mask.device)
            return neg, clipped, clipped, None
        return neg, clipped, None, None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


class _KernelClipper(Clipper):
    """A stock clipper: a pure function for plain tensors and a kernel for PolicyLoss's single
    pass, with its hyper-parameters bound and validated at construction."""

    def __init__(
        self,
        loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        kernel: Kernel,
        params: dict,
        in_keys: KeyOverrides,
        out_keys: KeyOverrides,
    ) -> None:
        KeyedModule.__init__(self)
        self._setup_keys(
            ("log_ratio", "advantages", "response_mask"), ("token_loss", "clipped"), in_keys, out_keys
        )
        self._loss_fn = loss_fn
        self._kernel = kernel
        self.params = params
        for name, value in params.items():
            setattr(self, name, value)

    def surrogate(
        self, log_ratio: torch.Tensor, advantages: torch.Tensor, padding: Padding, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        neg, clipped, _high, _ratio = self._kernel(log_ratio, adv, **self.params)
        return neg, clipped

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        token_loss, clipped = self._loss_fn(
            self._read(td, "log_ratio"),
            self._read(td, "advantages"),
            self._read(td, "response_mask"),
            **self.params,
        )
        td.set(self._out_map["token_loss"], token_loss)
        td.set(self._out_map["clipped"], clipped)
        return td

    def _chain(
        self, td: TensorDictBase, log_ratio: torch.Tensor, pad: Padding, checks: DeferredChecks
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """PolicyLoss's single pass, on the weighter's clean log-ratio ([N] per row, or [N, T] with
        0 at padding). Returns (−J, C, C_high, exp(log_ratio)), [N] when both the log-ratio and the
        advantages are per row, else [N, T]; C is False at padding, −J is not masked (the Objective
        masks it)."""
        where = self._loss_fn.__name__
        advantages = check_advantages(where, "advantages", self._read(td, "advantages"), pad.mask)
        dtype = compute_dtype(log_ratio, advantages)
        adv = _clean_advantages(advantages, pad, dtype, checks)
        log_ratio = log_ratio.to(dtype)
        if log_ratio.dim() != adv.dim():
            if log_ratio.dim() == 1:
                log_ratio = log_ratio.unsqueeze(-1)
            else:  # [N, T] advantages with 0 at padding make −J exactly 0 there (w is finite)
                adv = pad.zero(adv.unsqueeze(-1))
        return self._kernel(log_ratio, adv, **self.params)


class PPOClip(_KernelClipper):
    """PPO's clipped surrogate with asymmetric ε and optional dual clip (see :func:`ppo_clip_loss`).

    GRPO uses ε = 0.2/0.2, DAPO 0.2/0.28, GSPO 3e-4/4e-4 on the sequence ratio.
    """

    def __init__(
        self,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        *,
        dual_clip: float | None = None,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        in_keys: KeyOverrides = None,
        out_keys: KeyOverrides = None,
    ) -> None:
        params = _ppo_params("PPOClip", eps_low, eps_high, dual_clip, max_log_ratio)
        super().__init__(ppo_clip_loss, _ppo_kernel, params, in_keys, out_keys)


class CISPOClip(_KernelClipper):
    """CISPO: truncated, detached IS weight times Â ∇ℓ (see :func:`cispo_loss`).

    The MiniMax-M1 paper tunes only ε_high and publishes no value; the default 0.28 follows
    DAPO's clip-higher bound and is a starting point, not a paper value.
    """

    def __init__(
        self,
        eps_high: float = 0.28,
        *,
        eps_low: float | None = None,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        in_keys: KeyOverrides = None,
        out_keys: KeyOverrides = None,
    ) -> None:
        params = _cispo_params("CISPOClip", eps_high, eps_low, max_log_ratio)
        super().__init__(cispo_loss, _cispo_kernel, params, in_keys, out_keys)


class SAPOGate(_KernelClipper):
    """SAPO's temperature-controlled soft gate in place of a hard clip (see :func:`sapo_loss`)."""

    def __init__(
        self,
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        *,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        in_keys: KeyOverrides = None,
        out_keys: KeyOverrides = None,
    ) -> None:
        params = _sapo_params("SAPOGate", tau_pos, tau_neg, max_log_ratio)
        super().__init__(sapo_loss, _sapo_kernel, params, in_keys, out_keys)


class NoClip(_KernelClipper):
    """No clipping: importance-weighted policy gradient (see :func:`unclipped_loss`)."""

    def __init__(
        self,
        *,
        max_log_ratio: float | None = DEFAULT_MAX_LOG_RATIO,
        in_keys: KeyOverrides = None,
        out_keys: KeyOverrides = None,
    ) -> None:
        params = {"max_log_ratio": _check_max_log_ratio("NoClip", max_log_ratio)}
        super().__init__(unclipped_loss, _unclipped_kernel, params, in_keys, out_keys)
