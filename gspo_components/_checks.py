"""Input validation shared by every part.

Every check raises :class:`ValueError` with a message that names the offending key (or argument),
what was expected, and what arrived, e.g.::

    ValueError: sequence_log_ratio: 'old_log_probs' must have shape [N, T] = [4, 7] like
    'response_mask', got [4, 6]

(the pure function's name is given, also when a module called it).

Values are checked only where a wrong value would otherwise pass silently (masks that are not
0/1, non-finite rewards); shapes and dtypes are always checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: ratios and losses never run in half."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_float(where: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{where}: '{name}' must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    return t


def check_mask(where: str, name: str, mask: object, shape: Sequence[int] | None = None) -> torch.Tensor:
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
            f"{where}: '{name}' must have shape [{', '.join(map(str, shape))}], got {_shape(mask)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{where}: '{name}' must be bool (or 0/1 integers), got {mask.dtype}")
    if not bool(((mask == 0) | (mask == 1)).all()):
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
    return t


def check_advantages(where: str, name: str, adv: object, mask: torch.Tensor) -> torch.Tensor:
    """Advantages are [N] (one per response) or [N, T] (one per token)."""
    adv = check_float(where, name, adv)
    n, t = mask.shape
    if tuple(adv.shape) not in ((n,), (n, t)):
        raise ValueError(
            f"{where}: '{name}' must have shape [N] = [{n}] or [N, T] = [{n}, {t}], got {_shape(adv)}"
        )
    return adv


def check_nonempty(where: str, name: str, mask: torch.Tensor) -> None:
    if mask.numel() == 0 or not bool(mask.any()):
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
    """Check ``low <=/< value <=/< high`` for a hyper-parameter."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}") from None
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
