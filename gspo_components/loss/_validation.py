"""The validation switch, in the style of ``torch.distributions``' ``validate_args``.

Every loss-side part checks its inputs. Some checks need the tensors' *values*: that a float or
integer mask holds only 0 and 1, that a batch selects at least one token, that the valid
log-probs, advantages, rewards and weights are finite, that normalisers are not smaller than the
batch. Each such check reads a result back to the host (one synchronisation per call, e.g. a
GPU→CPU copy) and branches on it in Python, which also breaks a ``torch.compile`` graph.

Validation is **on by default**. Turn it off in a hot loop once the data pipeline is trusted::

    import gspo_components as gc

    gc.set_validation(False)            # process-wide
    with gc.validation(False):          # or for a block; restores the previous setting
        out = recipe.loss(td)

With validation off no part makes a host synchronisation or a data-dependent Python branch, so
``torch.compile(fullgraph=True)`` traces the loss without graph breaks. The checks that need only
shapes, dtypes and devices stay on: they cost nothing and are static under ``torch.compile``.
With validation off, bad values are not reported: a non-finite valid log-prob or advantage
gives a NaN loss, and a batch with no valid token gives a loss of exactly 0.

The setting is a process-wide flag (like ``torch.distributions.Distribution.set_default_validate_args``),
not thread-local.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["is_validating", "set_validation", "validation"]

_ENABLED = [True]


def set_validation(enabled: bool) -> None:
    """Turn value validation on (the default) or off for the whole process."""
    if not isinstance(enabled, bool):
        raise ValueError(f"set_validation: enabled must be a bool, got {type(enabled).__name__}")
    _ENABLED[0] = enabled


def is_validating() -> bool:
    """Whether the parts check their inputs' values (see the module docstring)."""
    return _ENABLED[0]


@contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Set validation on or off inside a ``with`` block, and restore the previous setting after."""
    if not isinstance(enabled, bool):
        raise ValueError(f"validation: enabled must be a bool, got {type(enabled).__name__}")
    previous = _ENABLED[0]
    _ENABLED[0] = enabled
    try:
        yield
    finally:
        _ENABLED[0] = previous
