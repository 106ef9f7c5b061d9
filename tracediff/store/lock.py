"""One writer per trace path: an advisory lock held for as long as a trace is being written.

Two processes told to write the same file (two ranks given the same
``FASTVIDEO_TRACE_OUTPUT``, a job started twice) would otherwise truncate and
interleave each other's writes. HDF5's own file lock cannot prevent that: it
is taken *after* the file has been opened with truncation, so the second
writer destroys the first one's file before it learns of the clash.

The lock is ``fcntl.flock`` on a sidecar file ``<trace>.lock`` that holds the
writer's pid, taken before the trace is opened. A sidecar rather than the trace
itself because HDF5 flocks the trace through its own descriptor, and the two
locks would refuse each other. The kernel drops the lock when its holder dies,
so a killed run leaves at most a stale ``.lock`` file, which the next writer
simply takes over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from tracediff.errors import TraceConfigError

LOCK_SUFFIX = ".lock"


def lock_path(path: Path) -> Path:
    """The sidecar lock file of a trace path."""
    return path.with_name(path.name + LOCK_SUFFIX)


class TraceLock:
    """An acquired lock; :meth:`release` is idempotent."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the sidecar and drop the lock; calling it again does nothing."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Unlink while still holding the lock: whoever opened the old file and
        # locks it after us sees that it is no longer the one at the path, and retries.
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(fd)

    def __repr__(self) -> str:
        return f"TraceLock({str(self.path)!r}, held={self.held})"


def acquire(path: Path, *, source: str = "output") -> TraceLock:
    """Take the write lock of trace ``path``, without waiting.

    Args:
        path: the trace file that is about to be written.
        source: what to call the path in the error message (an argument or env var name).

    Returns:
        The held lock; release it after the trace file is closed.

    Raises:
        TraceConfigError: another writer (another process, or another open
            ``attach`` in this one) holds the lock; the message names the path and its pid.
    """
    sidecar = lock_path(path)
    for _ in range(8):
        fd = os.open(sidecar, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = _holder(fd)
            os.close(fd)
            raise TraceConfigError(_busy_message(path, source, pid)) from None
        if _same_file(fd, sidecar):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return TraceLock(sidecar, fd)
        os.close(fd)  # the holder released and removed it between our open and our lock: try the new one
    raise TraceConfigError(f"{source}={str(path)!r}: could not take the write lock {str(sidecar)!r}; try again")


def holder(path: Path) -> int | None:
    """Who is writing trace ``path`` right now.

    Returns:
        None when nobody holds its lock; else the writer's pid, or 0 when it is not known.
    """
    sidecar = lock_path(path)
    try:
        fd = os.open(sidecar, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _busy_message(path: Path, source: str, pid: int | None) -> str:
    if pid == os.getpid():
        who = f"this process (pid {pid}) through another attach() that is still open"
    elif pid:
        who = f"process {pid}"
    else:
        who = "another process"
    return (
        f"{source}={str(path)!r} is being written by {who}; two writers would corrupt it. "
        "Give each run its own output path (the <pid> and <rank> placeholders help), or wait for that one to finish"
    )


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
