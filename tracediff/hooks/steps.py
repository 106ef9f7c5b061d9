"""Explicit denoising-step boundaries, shared by every attached recorder.

A pipeline wraps each denoising step in ``with trace_step(i):``; recorders read
the current step when a hook fires and flush when the step ends. Without it,
each top-level call of a traced model counts as one step.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class StepListener(Protocol):
    def end_step(self, step: int) -> None: ...


_state = threading.local()
_listeners: weakref.WeakSet[StepListener] = weakref.WeakSet()
_listeners_lock = threading.Lock()


def current_step() -> int | None:
    """The step set by the innermost :func:`trace_step` of this thread, or None."""
    return getattr(_state, "step", None)


@contextmanager
def trace_step(step: int) -> Iterator[None]:
    """Mark everything run inside as denoising step ``step``; flush when it ends.

    Raises:
        TypeError: ``step`` is not a non-negative int.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise TypeError(f"trace_step(step={step!r}): step must be an int >= 0")
    previous = current_step()
    _state.step = step
    try:
        yield
    finally:
        _state.step = previous
        with _listeners_lock:
            listeners = list(_listeners)
        for listener in listeners:
            listener.end_step(step)


def register(listener: StepListener) -> None:
    with _listeners_lock:
        _listeners.add(listener)


def unregister(listener: StepListener) -> None:
    with _listeners_lock:
        _listeners.discard(listener)
