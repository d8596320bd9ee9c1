"""The samplers' checkpointable state: the generator that draws their per-call seeds.

A seeded sampler draws the seeds of each call from its own ``torch.Generator``. Saving that
generator's state with a training checkpoint, and loading it into a sampler rebuilt with the same
``seed``, makes a resumed run draw the same samples as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch


class SamplerState:
    """``state_dict()`` / ``load_state_dict()`` for a sampler whose randomness is ``self._rng``."""

    _rng: torch.Generator | None

    def state_dict(self) -> dict[str, Any]:
        """``{"rng": the seed generator's state}``, or ``{"rng": None}`` for an unseeded sampler
        (which uses global or engine randomness that it does not own)."""
        return {"rng": None if self._rng is None else self._rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Seeded and unseeded states do not mix (``ValueError``)."""
        name = type(self).__name__
        if not isinstance(state, dict) or "rng" not in state:
            raise ValueError(f"{name}.load_state_dict: expected a dict with key 'rng', got {state!r:.80}")
        rng_state = state["rng"]
        if (rng_state is None) != (self._rng is None):
            have = "seeded" if self._rng is not None else "unseeded (seed=None)"
            got = "an unseeded sampler's" if rng_state is None else "a seeded sampler's"
            raise ValueError(f"{name}.load_state_dict: this sampler is {have}, but the state is {got}")
        if self._rng is not None:
            if not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.uint8:
                raise ValueError(
                    f"{name}.load_state_dict: 'rng' must be a torch.uint8 generator state, got "
                    f"{type(rng_state).__name__}"
                )
            self._rng.set_state(rng_state)
