"""Fast, exact masking primitives for the loss chain on the CPU (and anywhere else).

On the CPU ``torch.where(mask, x, 0)`` with a bool mask is not vectorised: on one thread it takes
about 8× the time of a float multiplication of the same size, and its backward is another
``where``. Multiplying by the mask is fast but not inert (NaN · 0 and inf · 0 are NaN). These
primitives are exact and inert, and fast:

- :func:`zero_padding` zeroes the padding by a bitwise AND of the float's bits with a mask of all
  ones (valid) or all zeros (padding): NaN, ±inf, anything becomes +0.0, and the valid entries
  keep every bit. Its backward zeroes the padding of the gradient the same way, so a padding
  position receives exactly 0.
- :func:`clamped_exp` is ``exp(clamp(x, −m, m))`` whose gradient is ``exp(x)`` inside the band
  and exactly 0 outside it (as autograd's clamp gives), without the four passes of clamp's
  backward.
- :func:`select` is ``where(c, a, b)`` for *finite* a and b, written as a · c + b · (1 − c), which
  is exact for finite values (x · 1 = x, x · 0 = 0, x + 0 = x) and whose gradient is a float
  multiplication.

:class:`Padding` carries one call's mask, its row lengths and its bit masks, computed once.
"""

from __future__ import annotations

import math

import torch

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

    def bits(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._bits:
            self._bits[dtype] = mask_bits(self.mask, dtype)
        return self._bits[dtype]

    def padding(self, dtype: torch.dtype) -> torch.Tensor:
        """The float indicator of padding, 1 − m, in ``dtype``."""
        return (~self.mask).view(torch.uint8).to(dtype)

    def zero(self, x: torch.Tensor) -> torch.Tensor:
        """``where(mask, x, 0)`` exactly (value and gradient); ``x`` may broadcast to [N, T]."""
        return zero_padding(x, self.bits(x.dtype))
