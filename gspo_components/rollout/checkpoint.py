"""Checkpoint files of the reference loop: plain data, a checksum, and no lost checkpoint.

A checkpoint folder holds

- ``step-XXXXXXXX.pt``: the state, saved with ``torch.save``. It may hold only tensors and plain
  data (``dict``, ``list``, ``tuple``, ``str``, ``int``, ``float``, ``bool``, ``None``), because it
  is read back with ``torch.load(..., weights_only=True)``: a crafted file cannot run code;
- ``checkpoint.json``: the manifest, naming the current state file with its size, its SHA-256
  and its step.

A save writes the new state file beside the old one (through a ``.tmp`` name, flushed to disk),
then replaces the manifest atomically (``os.replace``), and only then deletes the older state
files. A crash at any point leaves the manifest naming a complete, checked file: the new one or
the previous one.

A load refuses, with a ``ValueError`` naming the file and what is wrong: a missing, empty or
truncated file, a checksum that does not match (a corrupt file), a file that holds anything but
tensors and plain data, and non-finite floating-point values in the entries listed in
``finite``. A save refuses non-finite values in those entries too, so NaN weights never replace a
good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["LEGACY", "MANIFEST", "has_checkpoint", "load_checkpoint", "save_checkpoint"]

MANIFEST = "checkpoint.json"
FORMAT = 1
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(obj: object, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` cannot read back (before writing)."""
    if isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise ValueError(f"save_checkpoint: {where} has a key of type {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise ValueError(
        f"save_checkpoint: {where} is a {type(obj).__name__}; a checkpoint holds only tensors and "
        "plain data (dict, list, tuple, str, int, float, bool, None), so that it loads with "
        "torch.load(weights_only=True)"
    )


def _non_finite(obj: object, where: str) -> list[str]:
    """The paths of floating-point tensors (or floats) in ``obj`` with NaN or ±inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.device.type != "meta" and not bool(torch.isfinite(obj).all()):
            return [where]
        return []
    if isinstance(obj, float):
        return [] if obj == obj and abs(obj) != float("inf") else [where]
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in _non_finite(v, f"{where}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _non_finite(v, f"{where}[{i}]")]
    return []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


LEGACY = "checkpoint.pt"


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint (a manifest, or an older single ``checkpoint.pt``)."""
    return (folder / MANIFEST).exists() or (folder / LEGACY).exists()


def save_checkpoint(folder: Path, state: Mapping[str, Any], *, step: int, finite: Iterable[str] = ()) -> Path:
    """Write ``state`` as the checkpoint of ``step`` in ``folder``; return the state file's path.

    ``finite`` names the entries of ``state`` whose floating-point values must all be finite
    (e.g. ``"policy"``, ``"optimizer"``): a ``ValueError`` otherwise, and nothing is written.
    """
    _check_plain(state, "state")
    bad = [p for key in finite for p in _non_finite(state.get(key), key)]
    if bad:
        raise ValueError(
            f"save_checkpoint: refusing to write a checkpoint of step {step} with non-finite values "
            f"in {bad[:5]}{' ...' if len(bad) > 5 else ''}; the previous checkpoint is kept"
        )
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}.pt"
    final, tmp = folder / name, folder / (name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        size, digest = tmp.stat().st_size, _sha256(tmp)
        os.replace(tmp, final)
        manifest = {"format": FORMAT, "file": name, "bytes": size, "sha256": digest, "step": step}
        mtmp = folder / (MANIFEST + ".tmp")
        with open(mtmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(mtmp, folder / MANIFEST)
        _fsync_dir(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in folder.glob("step-*.pt*"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return final


def load_checkpoint(folder: Path, *, finite: Iterable[str] = ()) -> dict[str, Any]:
    """The state of the checkpoint in ``folder`` (see the module docstring for what is refused)."""
    mpath = folder / MANIFEST
    if not mpath.exists() and (folder / LEGACY).exists():
        # Written before manifests existed: no checksum to verify, but still weights_only.
        return _load_state(folder / LEGACY, finite, step=None)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint manifest {mpath} cannot be read: {err}") from None
    fields = {"file": str, "bytes": int, "sha256": str, "step": int}
    if not isinstance(manifest, dict) or any(not isinstance(manifest.get(k), t) for k, t in fields.items()):
        raise ValueError(
            f"checkpoint manifest {mpath} must be a JSON object with {sorted(fields)}, got {manifest!r}"
        )
    name = manifest["file"]
    if Path(name).name != name or not name.startswith("step-"):
        raise ValueError(f"checkpoint manifest {mpath} names {name!r}, not a state file of this folder")
    path = folder / name
    if not path.is_file():
        raise ValueError(f"checkpoint {path} (named by {mpath}) is missing")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes; the manifest records {manifest['bytes']})")
    if size != manifest["bytes"]:
        what = "truncated" if size < manifest["bytes"] else "longer than written"
        raise ValueError(
            f"checkpoint {path} is {what}: {size} bytes, but the manifest records {manifest['bytes']}"
        )
    digest = _sha256(path)
    if digest != manifest["sha256"]:
        raise ValueError(
            f"checkpoint {path} is corrupt: its SHA-256 is {digest}, but the manifest records "
            f"{manifest['sha256']}"
        )
    return _load_state(path, finite, step=manifest["step"])


def _load_state(path: Path, finite: Iterable[str], step: int | None) -> dict[str, Any]:
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"checkpoint {path} cannot be loaded with torch.load(weights_only=True) (only tensors "
            f"and plain data are accepted; a truncated or corrupt file fails here too): "
            f"{type(err).__name__}: {first}"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"checkpoint {path} must hold a dict with an int 'step', got {type(state).__name__}")
    if step is not None and state["step"] != step:
        raise ValueError(f"checkpoint {path} holds step {state['step']}, but the manifest records {step}")
    bad = [p for key in finite for p in _non_finite(state.get(key), key)]
    if bad:
        raise ValueError(
            f"checkpoint {path} holds non-finite values in {bad[:5]}{' ...' if len(bad) > 5 else ''}"
        )
    return state
