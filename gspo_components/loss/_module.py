"""The TensorDict shell shared by every part.

A part names its inputs and outputs canonically (``"log_probs"``, ``"advantages"``, ...). The
keys it actually reads and writes default to those names and can be renamed per instance, in
the spirit of torchrl's ``set_keys``::

    SequenceLogRatio(in_keys={"log_probs": ("policy", "lp")})
    SequenceLogRatio(in_keys=["lp", "old_lp", "mask"])        # positional, in declared order

``in_keys`` / ``out_keys`` then hold the resolved keys, as tensordict expects of a
``TensorDictModuleBase``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

NestedKey = str | tuple[str, ...]
KeyOverrides = Mapping[str, NestedKey] | Sequence[NestedKey] | None


def _resolve(where: str, kind: str, names: Sequence[str], overrides: KeyOverrides) -> dict[str, NestedKey]:
    resolved: dict[str, NestedKey] = {name: name for name in names}
    if overrides is None:
        return resolved
    if isinstance(overrides, Mapping):
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"{where}: {kind} has no entry named {unknown}; its entries are {list(names)}")
        resolved.update(overrides)
        return resolved
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, Sequence):
        raise ValueError(
            f"{where}: {kind} must be a mapping {{entry: key}} or a sequence of keys, "
            f"got {type(overrides).__name__} {overrides!r}"
        )
    overrides = list(overrides)
    if len(overrides) != len(names):
        raise ValueError(
            f"{where}: {kind} given as a sequence must list {len(names)} keys in the order "
            f"{list(names)}, got {len(overrides)}: {overrides}"
        )
    return dict(zip(names, overrides, strict=True))


def key_of(module: object, name: str, *, output: bool = False) -> NestedKey:
    """The key ``module`` uses for the canonical entry ``name`` (with ``output=True``, the key it
    writes its output ``name`` to), through its ``key`` / ``out_key`` methods; ``name`` itself
    when the module has no such method or does not declare ``name``."""
    lookup = getattr(module, "out_key" if output else "key", None)
    if lookup is None:
        return name
    try:
        return lookup(name)
    except KeyError:
        return name


class KeyedModule(TensorDictModuleBase):
    """Base of every part: declared, renamable keys and uniform error messages."""

    def _setup_keys(
        self,
        in_names: Sequence[str],
        out_names: Sequence[str],
        in_keys: KeyOverrides,
        out_keys: KeyOverrides,
        optional_in_names: Sequence[str] = (),
    ) -> None:
        where = type(self).__name__
        all_in = list(in_names) + [n for n in optional_in_names if n not in in_names]
        if in_keys is None or isinstance(in_keys, Mapping):
            self._in_map = _resolve(where, "in_keys", all_in, in_keys)
        else:  # a sequence renames the required inputs, in declared order
            self._in_map = {name: name for name in all_in}
            self._in_map.update(_resolve(where, "in_keys", in_names, in_keys))
        self._out_map = _resolve(where, "out_keys", out_names, out_keys)
        taken: dict[NestedKey, str] = {}
        for name, key in self._out_map.items():
            if key in taken:
                raise ValueError(
                    f"{where}: out_keys would write both '{taken[key]}' and '{name}' to {key!r}; "
                    f"each output needs its own key (outputs: {list(out_names)})"
                )
            taken[key] = name
        self._required_in = tuple(in_names)
        self._optional_in = tuple(n for n in optional_in_names if n not in in_names)
        self.in_keys = [self._in_map[n] for n in all_in]
        self.out_keys = [self._out_map[n] for n in out_names]

    def key(self, name: str) -> NestedKey:
        """The key this instance uses for the canonical entry ``name`` (an input, else an output)."""
        if name in self._in_map:
            return self._in_map[name]
        return self._out_map[name]

    def out_key(self, name: str) -> NestedKey:
        """The key this instance writes its canonical output ``name`` to."""
        return self._out_map[name]

    def _read(self, td: TensorDictBase, name: str) -> torch.Tensor:
        key = self._in_map[name]
        value = td.get(key, None)
        if value is None:
            present = sorted(str(k) for k in td.keys(include_nested=True, leaves_only=True))
            raise ValueError(
                f"{type(self).__name__}: missing key {key!r} (its '{name}' input); "
                f"the TensorDict holds {present}"
            )
        return value

    def _read_optional(self, td: TensorDictBase, name: str) -> torch.Tensor | None:
        return td.get(self._in_map[name], None)

    def _check_td(self, td: object) -> TensorDictBase:
        if not isinstance(td, TensorDictBase):
            raise ValueError(
                f"{type(self).__name__}: expects a TensorDict, got {type(td).__name__}; "
                "use the pure functions for plain tensors"
            )
        return td

    def extra_repr(self) -> str:
        return f"in_keys={self.in_keys}, out_keys={self.out_keys}"
