"""Write trace steps on a background thread, so a GPU never waits for the disk.

The recorder hands each finished step to :meth:`BackgroundWriter.submit` as a
function that builds the step's :class:`~tracediff.store.writer.StepBatch`
(waiting for the step's asynchronous device-to-host copies, converting full
tensors) and goes straight on with the next step. Two threads form a pipeline:
one builds steps, in order, while the other writes the previous one, each
committed exactly as :meth:`TraceWriter.write_step` commits it, so crash safety
is unchanged: a step exists in the file once its commit row is written, and a
process killed with steps still queued leaves a file holding every step
committed before them.

The queue is bounded, by steps and by bytes: when the disk is slower than the
model, ``submit`` blocks until the writer catches up, so host memory stays
bounded instead of growing with the run.

A write that fails (disk full, file removed) is kept and raised by the next
``submit``, ``set_attr`` or ``close``; steps queued behind it are dropped, so
the file stays a prefix of the run.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tracediff.store.writer import StepBatch, TraceWriter

#: Steps in flight (being written plus queued) before ``submit`` blocks.
DEFAULT_MAX_STEPS = 2


def _default_max_bytes() -> int:
    """A quarter of physical memory (at least 2 GiB): room for two steps of a large ``full`` trace in flight."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 16 << 30
    return max(2 << 30, physical // 4)


#: Host bytes held by queued steps (pinned copies of full tensors, mostly) before ``submit`` blocks;
#: a single step larger than this still goes, alone. Two steps in flight let one be built (copies
#: awaited, tensors converted) while the other is written.
DEFAULT_MAX_BYTES = _default_max_bytes()

_live: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


class BackgroundWriter:
    """Owns a :class:`TraceWriter` and one thread that writes its steps in order.

    Args:
        writer: the trace writer; from now on only this object's thread touches it.
        max_steps: steps in flight before :meth:`submit` blocks (at least 1).
        max_bytes: queued bytes before :meth:`submit` blocks (a step larger than this still goes alone).
    """

    def __init__(
        self, writer: TraceWriter, *, max_steps: int = DEFAULT_MAX_STEPS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.writer = writer
        self.path: Path = writer.path
        self.max_steps = max(1, int(max_steps))
        self.max_bytes = max(0, int(max_bytes))
        self.failed_step: int | None = None
        self._jobs: deque[tuple[int, Future[StepBatch], int, Callable[[], None] | None]] = deque()
        # builds run one at a time, in order, overlapping the write of the step before
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracediff-build")
        self._bytes = 0
        self._error: BaseException | None = None
        self._reported = False
        self._stopping = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"tracediff-writer:{writer.path.name}", daemon=True)
        self._thread.start()
        _live.add(self)

    # -- producer side ---------------------------------------------------------------
    def submit(
        self,
        step: int,
        make_batch: Callable[[], StepBatch],
        *,
        nbytes: int = 0,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Queue one step; blocks while the queue is full.

        Args:
            step: the step number (for the commit row and error messages).
            make_batch: builds the batch on the writer thread (waits for its device copies).
            nbytes: host bytes the step holds until written, for the byte bound.
            on_done: called on the writer thread once the step is committed.

        Raises:
            Exception: an earlier step's write failed (raised once).
        """
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self.path}: the trace writer is closed")
            self._raise_failure()
            while self._jobs and (len(self._jobs) >= self.max_steps or self._bytes + nbytes > self.max_bytes):
                self._cond.wait()
                self._raise_failure()
            self._jobs.append((step, self._builder.submit(make_batch), nbytes, on_done))
            self._bytes += nbytes
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted step is written (or dropped after a failure)."""
        with self._cond:
            while self._jobs:
                self._cond.wait()

    def set_attr(self, key: str, value: Any) -> None:
        """Set a root attribute once the queue is empty."""
        self.drain()
        with self._cond:
            self._raise_failure()
        self.writer.set_attr(key, value)

    def close(self) -> None:
        """Write what is queued, stop the thread, close the file; calling twice is harmless.

        Raises:
            Exception: a queued step's write failed and was not reported yet.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.drain()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        self._builder.shutdown(wait=True)
        _live.discard(self)
        try:
            self.writer.close()
        finally:
            with self._cond:
                self._raise_failure()

    # -- writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                step, built, nbytes, on_done = self._jobs[0]
                failed = self._error is not None
            try:
                batch = built.result()  # waits for the build; raises what the build raised
                if not failed:  # after a failure, later steps are dropped: the file stays a prefix
                    self.writer.write_step(step, batch)
                    if on_done is not None:
                        on_done()
            except BaseException as exc:  # kept for the producer; this thread must survive to drain the queue
                with self._cond:
                    if self._error is None:
                        self._error, self.failed_step = exc, step
            finally:
                batch = built = None  # type: ignore[assignment]  # release the step's memory before waiting again
                with self._cond:
                    self._jobs.popleft()
                    self._bytes -= nbytes
                    self._cond.notify_all()

    def _raise_failure(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error


@atexit.register
def _drain_at_exit() -> None:
    """A script that never closed its trace still gets its queued steps written (not marked complete)."""
    for writer in list(_live):
        writer.drain()
