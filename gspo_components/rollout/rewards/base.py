"""RewardFn: a rollout TensorDict → ``rewards`` [N] (float32) and ``reward_valid`` [N] (bool).

A reward function scores each response on its own (:meth:`RewardFn.score`) or a whole batch
(:meth:`RewardFn.score_batch`). If scoring fails for one sample, the batch goes on: that sample
gets ``reward_valid = False`` (and reward 0), the advantage estimators leave it out of its
group's statistics, the reference loop leaves it out of the loss, and the failure is counted
(``failures_total``) and kept with its exception (``last_failures``) for the log.

A sample fails when ``score`` raises, runs past the per-sample ``timeout`` (seconds), or returns
anything but a finite real number: ``"0.75"``, ``True``, a tensor, ``None`` or NaN are refused,
not converted.

The timeout. In the main thread a ``SIGALRM`` interval timer interrupts ``score`` in place: it
stops Python code and the ``re`` engine (which checks for signals while it backtracks), so the
function runs in this process and keeps any state it changes. Python allows signal handlers only
in the main thread; elsewhere each batch is scored in a forked worker process that is killed
when a sample runs over, and a fresh worker takes the next sample. There, state that ``score``
changes stays in the worker. Without ``fork`` (Windows), or with ``timeout=None``, ``score``
runs unguarded.
"""

from __future__ import annotations

import math
import multiprocessing
import numbers
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase

from ...loss._module import KeyedModule, KeyOverrides

__all__ = ["RewardFailure", "RewardFn", "RewardTimeout", "as_list", "preview"]

PREVIEW_CHARS = 120


def preview(value: object, limit: int = PREVIEW_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, with the full length: what error messages and
    logs show of an input, so that a 1 MB response is never printed whole."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    size = len(value) if isinstance(value, str | bytes) else None
    if len(text) <= limit and (size is None or size <= limit):
        return text
    suffix = f"… ({size} chars)" if size is not None else "…"
    return text[:limit] + suffix


class RewardTimeout(BaseException):
    """A sample's scoring ran past the timeout.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that verifiers which catch ``Exception``
    (math-verify returns ``[]`` for any ``Exception`` in ``parse``) cannot swallow it and turn a
    timeout into a valid reward.
    """


def as_list(value: Any, n: int, key: object) -> list[Any]:
    """A per-sample list from a NonTensorStack, a list, a tensor or a broadcast scalar."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"reward input {key!r} has {len(value)} entries for a batch of {n}")
    return list(value)


class RewardFailure:
    """One sample whose reward could not be computed (``term``: the WeightedSum term that failed)."""

    def __init__(self, index: int, error: BaseException, term: str | None = None) -> None:
        self.index = index
        self.error = error
        self.term = term

    def __repr__(self) -> str:
        where = f", term={self.term!r}" if self.term is not None else ""
        message = str(self.error)
        if len(message) > 2 * PREVIEW_CHARS:
            message = message[: 2 * PREVIEW_CHARS] + f"… ({len(message)} chars)"
        return f"RewardFailure(index={self.index}{where}, error={type(self.error).__name__}: {message})"


def check_reward_value(value: object) -> float:
    """A finite real number as float; anything else (str, bool, tensor, None, NaN, ±inf) raises."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"score() must return a real number (int or float), got {type(value).__name__} {preview(value)}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"reward is not finite: {number}")
    return number


def _can_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _call_with_alarm(fn: Callable[[], Any], seconds: float) -> Any:
    """fn() under a SIGALRM interval timer (main thread only); an outer timer is restored."""

    def on_alarm(signum: int, frame: object) -> None:
        raise RewardTimeout(f"scoring took longer than the timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:  # someone else's timer was running: give it back what is left
            left = max(outer_delay - (time.monotonic() - start), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def _fork_context() -> Any:
    try:
        return multiprocessing.get_context("fork")
    except ValueError:
        return None


class _ForkedScorer:
    """A forked worker that scores samples by index (it inherits ``score_one`` and the columns)."""

    def __init__(self, ctx: Any, score_one: Callable[[int], float]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=self._serve, args=(score_one, child), daemon=True)
        self.proc.start()
        child.close()

    @staticmethod
    def _serve(score_one: Callable[[int], float], conn: Any) -> None:
        while True:
            index = conn.recv()
            if index is None:
                return
            try:
                conn.send((True, score_one(index)))
            except Exception as error:
                try:
                    conn.send((False, error))
                except Exception:  # an exception that does not pickle: send its text
                    conn.send((False, RuntimeError(f"{type(error).__name__}: {preview(str(error))}")))

    def run(self, index: int, seconds: float) -> Any:
        self.conn.send(index)
        if not self.conn.poll(seconds):
            self.close(kill=True)
            raise RewardTimeout(f"scoring took longer than the timeout of {seconds:g} s (worker killed)")
        try:
            ok, payload = self.conn.recv()
        except EOFError:  # the worker died (a crash in C code, os._exit, ...)
            self.close(kill=True)
            raise RuntimeError("the scoring worker process died") from None
        if not ok:
            raise payload
        return payload

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class RewardFn(KeyedModule):
    """Base class. Subclasses set ``fields`` (the keys they read) and implement ``score``.

    ``score(sample)`` receives a dict of the declared fields for one sample (strings for
    non-tensor entries, Python scalars or lists for tensors) and returns a finite real number
    (int or float; a bool, string or tensor is refused). Override ``score_batch`` instead for
    vectorised rewards; it returns a float tensor [N] and a bool tensor [N], and gets no timeout.

    Args:
        out_key, in_keys: key overrides.
        warn: one ``RuntimeWarning`` per batch with failures.
        timeout: seconds one sample's ``score`` may take before it is cut off and counts as a
            failed sample (``RewardTimeout``); ``None`` for no limit. Default 10 s.
    """

    fields: tuple[str, ...] = ("response_text",)

    def __init__(
        self,
        *,
        out_key: str | tuple[str, ...] = "rewards",
        in_keys: KeyOverrides = None,
        warn: bool = True,
        timeout: float | None = 10.0,
    ) -> None:
        super().__init__()
        self._setup_keys(self.fields, ("rewards", "reward_valid"), in_keys, {"rewards": out_key})
        self.warn = warn
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
                raise ValueError(
                    f"{type(self).__name__}: timeout must be a positive number of seconds or None, "
                    f"got {type(timeout).__name__} {timeout!r}"
                )
            if not (0 < float(timeout) < math.inf):
                raise ValueError(
                    f"{type(self).__name__}: timeout must be a positive finite number of seconds or None, "
                    f"got {timeout}"
                )
            timeout = float(timeout)
        self.timeout = timeout
        self.failures_total = 0
        self.last_failures: list[RewardFailure] = []

    def score(self, sample: dict[str, Any]) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement score() or score_batch()")

    def score_batch(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample scoring with failure capture; returns (rewards [N] float32, valid [N])."""
        n = tensordict.shape[0]
        columns = {name: as_list(self._read(tensordict, name), n, name) for name in self.fields}

        def score_one(i: int) -> float:
            return check_reward_value(self.score({name: col[i] for name, col in columns.items()}))

        rewards = torch.zeros(n, dtype=torch.float32)
        valid = torch.ones(n, dtype=torch.bool)
        seconds = self.timeout
        ctx = None
        if seconds is not None and not _can_alarm():
            ctx = _fork_context()
            if ctx is None:
                seconds = None  # no signals off the main thread and no fork: unguarded
        worker: _ForkedScorer | None = None
        try:
            for i in range(n):
                try:
                    if seconds is None:
                        value = score_one(i)
                    elif ctx is None:
                        value = _call_with_alarm(lambda i=i: score_one(i), seconds)
                    else:
                        if worker is None:
                            worker = _ForkedScorer(ctx, score_one)
                        try:
                            value = worker.run(i, seconds)
                        finally:
                            if not worker.proc.is_alive():
                                worker = None  # killed or dead: the next sample gets a fresh one
                    rewards[i] = value
                except (Exception, RewardTimeout) as error:  # a verifier may raise anything
                    valid[i] = False
                    self.last_failures.append(RewardFailure(i, error))
        finally:
            if worker is not None:
                worker.close()
        return rewards, valid

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        td = self._check_td(tensordict)
        if td.batch_dims != 1:
            raise ValueError(
                f"{type(self).__name__}: the TensorDict must have batch size [N] (one row per response), "
                f"got {list(td.batch_size)}"
            )
        self.last_failures = []
        rewards, valid = self.score_batch(td)
        device = td.device
        if device is not None:
            rewards, valid = rewards.to(device), valid.to(device)
        td.set(self._out_map["rewards"], rewards)
        td.set(self._out_map["reward_valid"], valid)
        if self.last_failures:
            self.failures_total += len(self.last_failures)
            if self.warn:
                warnings.warn(
                    f"{type(self).__name__}: {len(self.last_failures)} of {td.shape[0]} samples failed "
                    f"and were left out (first: {self.last_failures[0]!r})",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return td
