"""The numeric invariants every loss-side part keeps, in one module.

A new part needs three things done exactly, and imports them from here:

- **clean the padding**: :func:`clean_padding` is ``where(mask, x, 0)`` in value *and* gradient.
  Padding may hold anything (NaN, ±inf, garbage from a varlen kernel); afterwards it holds +0.0
  and sends back exactly 0 gradient. A multiplication by the mask is not inert (NaN · 0 = NaN).
- **take a masked row mean**: :func:`masked_row_mean` is (1/L_i) Σ_t x_{i,t} over the valid
  tokens, with 0 for a row that has none (never NaN); :func:`masked_row_sum` the sum.
- **clamp the log-ratio before exp**: :func:`clamped_ratio` is exp(clamp(log w, −b, b)) with
  b = :data:`DEFAULT_MAX_LOG_RATIO` (20, as verl does), whose gradient is exp(log w) inside the band
  and exactly 0 outside it. :func:`compute_dtype` is float32, or float64 when an input is: ratios
  and losses never run in half precision (in bf16 the band [1 − 3e-4, 1 + 4e-4] holds only 1.0).

:class:`Padding` carries one call's mask, its row lengths L_i and its bit masks, computed once,
with the same operations as methods. Everything here is exact, not approximately masked.

How the primitives are fast on the CPU: ``torch.where(mask, x, 0)`` with a bool mask is not
vectorised there (about 8× a float multiplication of the same size, and its backward is another
``where``), so :func:`zero_padding` zeroes the padding by a bitwise AND of the float's bits with a
mask of all ones (valid) or all zeros (padding): NaN, ±inf, anything becomes +0.0 and the valid
entries keep every bit; its backward does the same to the gradient. :func:`clamped_exp` gives
autograd's clamp gradient without clamp's four backward passes. :func:`select` is
``where(c, a, b)`` for *finite* a and b, as a · c + b · (1 − c), exact for finite values.
"""

from __future__ import annotations

import math

import torch

from ._checks import compute_dtype

__all__ = [
    "DEFAULT_MAX_LOG_RATIO",
    "Padding",
    "check_token_input",
    "clamped_ratio",
    "clean_padding",
    "compute_dtype",
    "masked_mean",
    "masked_row_mean",
    "masked_row_sum",
]

DEFAULT_MAX_LOG_RATIO = 20.0
"""The default bound b of :func:`clamped_ratio`: log-ratios are clamped to [−20, 20] before exp."""

_INT_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def mask_bits(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All-ones integer (−1) at valid positions, 0 at padding, of the width of ``dtype``."""
    return mask.view(torch.uint8).to(_INT_OF[dtype]).neg_()


def _and(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    return (x.view(bits.dtype) & bits).view(x.dtype)


class _ZeroPadding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(bits)
        return _and(x, bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        return _and(grad, bits), None


def zero_padding(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``where(mask, x, 0)``, exactly, in value and gradient; ``bits`` from :func:`mask_bits`
    for ``x.dtype``. ``x`` may broadcast against ``bits``."""
    if x.shape != bits.shape:
        x = x.expand(bits.shape)
    x = x.contiguous()
    if not x.requires_grad:
        return _and(x, bits)
    return _ZeroPadding.apply(x, bits)


class _ClampRatio(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, raw: torch.Tensor, low: float, high: float) -> torch.Tensor:  # type: ignore[override]
        ratio = raw.clamp(low, high)
        ctx.save_for_backward(ratio * (raw == ratio).view(torch.uint8).to(ratio.dtype))
        return ratio

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None, None


def clamped_exp(x: torch.Tensor, bound: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, e): w = clamp(exp(x), e^−bound, e^bound), which is exp(clamp(x, −bound, bound)) (exp is
    monotone), with gradient exp(x) inside the band and exactly 0 outside it (and at NaN), as
    autograd's clamp gives, at the cost of one multiplication in the backward; and e = exp(x),
    detached, for the metrics."""
    raw = torch.exp(x.detach())
    if bound is None:
        return (torch.exp(x) if x.requires_grad else raw), raw
    low, high = math.exp(-bound), math.exp(bound)
    if not x.requires_grad:
        return raw.clamp(low, high), raw
    return _ClampRatio.apply(x, raw, low, high), raw


def select(condition: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``where(condition, a, b)`` for finite ``a`` and ``b``: a · c + b · (1 − c)."""
    c = condition.view(torch.uint8).to(b.dtype)
    return a * c + b * (1.0 - c)


def count(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """The number of True entries along ``dim`` (int32), without a bool→int64 copy."""
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32)


def fill_padding(x: torch.Tensor, fill: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """``where(mask, x, fill)`` for an ``x`` that is +0 at padding and a finite ``fill``, with
    ``padding`` the float indicator 1 − m: x + (1 − m) · fill, exact (x + 0 = x, 0 + fill = fill)."""
    return torch.addcmul(x, padding, fill)


class Padding:
    """One call's bool mask [N, T], with its row lengths L_i (int32) and bit masks per dtype."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.lengths = count(mask, -1)
        self._bits: dict[torch.dtype, torch.Tensor] = {}
        self._padding: dict[torch.dtype, torch.Tensor] = {}

    def bits(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._bits:
            self._bits[dtype] = mask_bits(self.mask, dtype)
        return self._bits[dtype]

    def padding(self, dtype: torch.dtype) -> torch.Tensor:
        """The float indicator of padding, 1 − m, in ``dtype`` (computed once per dtype)."""
        if dtype not in self._padding:
            self._padding[dtype] = (~self.mask).view(torch.uint8).to(dtype)
        return self._padding[dtype]

    def zero(self, x: torch.Tensor) -> torch.Tensor:
        """``where(mask, x, 0)`` exactly (value and gradient); ``x`` may broadcast to [N, T]."""
        return zero_padding(x, self.bits(x.dtype))

    def row_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_t x_{i,t} over the valid tokens, [N]; ``x`` [N, T] may hold anything at padding."""
        return self.zero(x).sum(-1)

    def row_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(1/L_i) Σ_t x_{i,t} over the valid tokens, [N]; 0 for a row with no valid token."""
        return self.row_sum(x) / self.lengths.clamp(min=1).to(x.dtype)

    def broadcast(self, per_row: torch.Tensor) -> torch.Tensor:
        """A per-response value [N] spread over its row's valid tokens, [N, T], 0 at padding."""
        return self.zero(per_row.unsqueeze(-1))


def _padding_of(where: str, x: torch.Tensor, mask: torch.Tensor) -> Padding:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = type(mask).__name__ if not isinstance(mask, torch.Tensor) else str(mask.dtype)
        raise ValueError(f"{where}: 'mask' must be a bool tensor [N, T], got {got}")
    if not isinstance(x, torch.Tensor) or mask.dim() != 2 or x.shape != mask.shape:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{where}: 'x' must be a tensor of the shape of a 2-D 'mask' {list(mask.shape)}, got {shape}"
        )
    return Padding(mask)


def clean_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``where(mask, x, 0)``, exactly, in value and gradient, whatever ``x`` holds at padding.

    ``mask`` is a bool [N, T] (True = valid); ``x`` has its shape. A padding position becomes +0.0
    and receives exactly 0 gradient; a valid one keeps every bit.
    """
    return _padding_of("clean_padding", x, mask).zero(x)


def masked_row_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t m_{i,t} x_{i,t}, [N], with the padding cleaned first (NaN there is ignored)."""
    return _padding_of("masked_row_sum", x, mask).row_sum(x)


def masked_row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/L_i) Σ_t m_{i,t} x_{i,t}, [N], L_i = Σ_t m_{i,t}; 0 for an empty row (never NaN)."""
    return _padding_of("masked_row_mean", x, mask).row_mean(x)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{i,t} m x / Σ_{i,t} m, a scalar: the token-weighted mean over the valid tokens of the
    batch (0 when there is none)."""
    pad = _padding_of("masked_mean", x, mask)
    return pad.zero(x).sum() / pad.lengths.sum().clamp(min=1).to(x.dtype)


def clamped_ratio(log_ratio: torch.Tensor, bound: float | None = DEFAULT_MAX_LOG_RATIO) -> torch.Tensor:
    """w = exp(clamp(log w, −bound, bound)) with gradient w inside the band and exactly 0 outside
    it (``bound=None``: no clamp). Clean the padding of ``log_ratio`` first."""
    return clamped_exp(log_ratio, bound)[0]


def check_token_input(
    where: str, name: str, x: object, mask: torch.Tensor, *, per_row: bool = False
) -> torch.Tensor:
    """``x`` if it is a float tensor aligned with ``mask`` ([N, T], or [N] with ``per_row``), else a
    ``ValueError`` naming ``where``, the entry ``name``, the shape expected and what came: the check
    a part makes on an extra input it reads."""
    shapes = [tuple(mask.shape)] + ([(mask.shape[0],)] if per_row else [])
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or tuple(x.shape) not in shapes:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        want = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(
            f"{where}: {name!r} must be a float tensor of shape {want}, got {got} "
            "(the shape follows 'response_mask')"
        )
    return x
