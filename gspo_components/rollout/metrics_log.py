"""Metrics loggers for the reference loop: a three-method protocol and two implementations.

:func:`gspo_components.rollout.loop.train` sends each step's metrics (a flat ``dict[str, float]``,
``step`` included) to every logger it has. A logger is any object with

- ``start(step)``: called once before the loop's first step, with the step the run starts
  from (0 for a fresh run, the checkpoint's step on resume). Anything the logger recorded for
  later steps belongs to a run that was cut short after its last checkpoint, and is dropped, so
  a resumed run never logs a step twice;
- ``log(step, metrics)``: one call per completed step (``step`` counts from 1);
- ``close()``: at the end of the run, also after an error.

:class:`JSONLinesLogger` is the default when ``RLConfig.log_path`` is set: one JSON object per
line, NaN written as ``null``. :class:`TensorBoardLogger` writes one scalar per metric through
``torch.utils.tensorboard`` (it needs the ``tensorboard`` package). Any other tracker fits by
writing the three methods, e.g. ``log`` calling ``wandb.log(metrics, step=step)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["JSONLinesLogger", "MetricsLogger", "TensorBoardLogger", "check_logger"]


@runtime_checkable
class MetricsLogger(Protocol):
    """What the loop needs of a logger (see the module docstring)."""

    def start(self, step: int) -> None: ...

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def check_logger(where: str, name: str, logger: object) -> MetricsLogger:
    """``logger`` if it has the three methods, else a ``ValueError`` naming the missing ones."""
    missing = [m for m in ("start", "log", "close") if not callable(getattr(logger, m, None))]
    if missing:
        raise ValueError(
            f"{where}: {name!r} must have the methods start(step), log(step, metrics) and close() "
            f"(gspo_components.rollout.metrics_log.MetricsLogger); {type(logger).__name__} lacks {missing}"
        )
    return logger  # type: ignore[return-value]


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


class JSONLinesLogger:
    """One JSON object per step in ``path`` (its folder is created), NaN written as ``null``.

    ``start(step)`` keeps the lines whose ``"step"`` is at most ``step`` and drops the rest,
    including a last line cut short by a crash (the file is rewritten atomically); a fresh run
    (``step = 0``) therefore starts an empty file.
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        self._file: Any = None

    def start(self, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                    if record["step"] <= step:
                        kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            raise RuntimeError("JSONLinesLogger.log called before start()")
        self._file.write(json.dumps({k: _json_value(v) for k, v in metrics.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLogger:
    """Each metric (but ``step``) as a TensorBoard scalar under its name, at global step ``step``.

    ``start(step)`` opens a ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir`` with
    ``purge_step = step + 1`` on resume, so events a cut-short run wrote after its last checkpoint
    are hidden. Needs the ``tensorboard`` package (``pip install tensorboard``).
    """

    def __init__(self, log_dir: str | PathLike[str], **writer_kwargs: Any) -> None:
        self.log_dir = Path(log_dir)
        self.writer_kwargs = writer_kwargs
        self._writer: Any = None

    def start(self, step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "TensorBoardLogger needs the 'tensorboard' package: pip install tensorboard"
            ) from err
        kwargs = dict(self.writer_kwargs)
        if step > 0:
            kwargs.setdefault("purge_step", step + 1)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), **kwargs)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            raise RuntimeError("TensorBoardLogger.log called before start()")
        for name, value in metrics.items():
            if name != "step":
                self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
