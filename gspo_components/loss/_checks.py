"""Input validation shared by every part.

Every check raises :class:`ValueError` with a message that names the offending key (or argument),
what was expected, and what arrived, e.g.::

    ValueError: sequence_log_ratio: 'old_log_probs' must have shape [N, T] = [4, 7] like
    'response_mask', got [4, 6]

(the pure function's name is given, also when a module called it).

Shapes, dtypes and devices are always checked (static: no host synchronisation). Values are
checked only where a wrong value would otherwise pass silently (masks that are not 0/1, non-finite
valid log-probs or advantages, an empty batch), and only while validation is on
(:func:`gspo_components.set_validation`): such a check reads a result back to the host.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from ._validation import is_validating

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: ratios and losses never run in half."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _has_values(t: torch.Tensor) -> bool:
    """Value checks need data: meta tensors (shape inference) carry none and are not checked."""
    return t.device.type != "meta"


def check_device(where: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{where}: '{name}' must be on the device of '{ref_name}' ({ref.device}), got {t.device}"
        )


def check_float(where: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{where}: '{name}' must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    return t


def check_mask(
    where: str, name: str, mask: object, shape: Sequence[int] | None = None, like: str | None = None
) -> torch.Tensor:
    """Return ``mask`` as a bool tensor.

    bool masks pass as they are; integer or floating masks (as verl and TRL produce) are
    accepted when every entry is 0 or 1, and anything else is an error.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{where}: '{name}' must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{where}: '{name}' must have shape [N, T], got {_shape(mask)}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{where}: '{name}' must have shape [{', '.join(map(str, shape))}]"
            + (f" like '{like}'" if like else "")
            + f", got {_shape(mask)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{where}: '{name}' must be bool (or 0/1 integers), got {mask.dtype}")
    if is_validating() and _has_values(mask) and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"{where}: '{name}' must be bool or hold only 0 and 1, got {mask.dtype} with other values"
        )
    return mask != 0


def check_token_tensor(where: str, name: str, t: object, mask_name: str, mask: torch.Tensor) -> torch.Tensor:
    """A float [N, T] tensor aligned with the response mask."""
    t = check_float(where, name, t)
    if t.shape != mask.shape:
        raise ValueError(
            f"{where}: '{name}' must have shape [N, T] = {_shape(mask)} like '{mask_name}', got {_shape(t)}"
        )
    check_device(where, name, t, mask_name, mask)
    return t


def check_advantages(where: str, name: str, adv: object, mask: torch.Tensor) -> torch.Tensor:
    """Advantages are [N] (one per response) or [N, T] (one per token)."""
    adv = check_float(where, name, adv)
    n, t = mask.shape
    if tuple(adv.shape) not in ((n,), (n, t)):
        raise ValueError(
            f"{where}: '{name}' must have shape [N] = [{n}] or [N, T] = [{n}, {t}], got {_shape(adv)}"
        )
    check_device(where, name, adv, "response_mask", mask)
    return adv


def check_nonempty(where: str, name: str, mask: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
    """An all-padding batch is an error (validation on only: it reads the mask's values)."""
    if mask.numel() == 0:
        raise ValueError(f"{where}: '{name}' is empty (shape {_shape(mask)}); there is nothing to optimise")
    if not (is_validating() and _has_values(mask)):
        return
    if not bool(mask.any() if lengths is None else (lengths > 0).any()):
        raise ValueError(
            f"{where}: '{name}' selects no token (an all-padding batch of shape {_shape(mask)}); "
            "there is nothing to optimise"
        )


def check_range(
    where: str,
    name: str,
    value: float,
    low: float,
    high: float | None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
) -> float:
    """Check ``low <=/< value <=/< high`` for a hyper-parameter: a finite real number (not a
    string, a bool or a tensor), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {value}")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = True if high is None else (value <= high if high_inclusive else value < high)
    if not (ok_low and ok_high) or value != value:
        lb = "[" if low_inclusive else "("
        hb = "inf)" if high is None else (f"{high}]" if high_inclusive else f"{high})")
        raise ValueError(f"{where}: {name} must be in {lb}{low}, {hb}, got {value}")
    return value


def check_choice(where: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{where}: {name} must be one of {list(choices)}, got {value!r}")


def check_positive_int(where: str, name: str, value: object) -> int:
    """An integer hyper-parameter > 0 (an integral float such as 8.0 is accepted; 2.9 is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{where}: {name} must be an integer in (0, inf), got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(float(value)) or not float(value).is_integer():
        raise ValueError(f"{where}: {name} must be an integer in (0, inf), got {value!r}")
    if value <= 0:
        raise ValueError(f"{where}: {name} must be in (0, inf), got {value!r}")
    return int(value)


class DeferredChecks:
    """Value checks gathered during one call and resolved with a single host synchronisation.

    Inactive (every method a no-op) while validation is off. ``finite(description, t)`` requires
    ``t`` finite, typically a per-row sum over the valid tokens ([N]), which is non-finite exactly
    when a valid entry is NaN or ±inf (or the sum overflows); ``require(message, ok)`` requires a
    0-d bool tensor to be True.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.active = is_validating()
        self._items: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []

    def finite(self, description: str, t: torch.Tensor) -> None:
        if self.active and _has_values(t):
            self._items.append((description, torch.isfinite(t).all(), t))

    def require(self, message: str, ok: torch.Tensor) -> None:
        if self.active and _has_values(ok):
            self._items.append((message, ok, None))

    def run(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        flags = torch.stack([ok for _, ok, _ in items])
        if bool(flags.all()):
            return
        for (text, _, t), ok in zip(items, flags.tolist(), strict=True):
            if ok:
                continue
            if t is None:
                raise ValueError(f"{self.where}: {text}")
            first = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise ValueError(
                f"{self.where}: {text} must be finite, got NaN or ±inf (first at index {first} of a "
                f"{_shape(t)} tensor); validation is on (see gspo_components.set_validation)"
            )
