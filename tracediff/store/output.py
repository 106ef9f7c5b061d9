"""Claim a trace's output path: one writer, no silent overwrite, no half-created file.

:func:`open_for_writing` is the single way a trace file comes into being:

1. take the path's write lock (:mod:`tracediff.store.lock`), so a second
   process aiming at the same path is refused instead of corrupting it;
2. refuse to replace an existing non-empty file unless overwriting was asked
   for: a re-run must not destroy the only copy of yesterday's two-hour trace;
3. check that the disk and ``ulimit -f`` leave room for the header;
4. write the header into a hidden sibling file and rename it into place once
   it is complete, so a process killed while attaching leaves either no trace
   or a readable one, never a torn header (and an old trace being overwritten
   survives until the new one is ready).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tracediff.config import ENV_OVERWRITE
from tracediff.errors import TraceConfigError
from tracediff.store.diskspace import METADATA_RESERVE, free_room
from tracediff.store.lock import TraceLock, acquire

W = TypeVar("W")


def open_for_writing(
    path: Path,
    make_writer: Callable[[Path], W],
    *,
    overwrite: bool,
    header_bytes: int = 0,
    source: str = "output",
) -> tuple[W, TraceLock]:
    """Create the trace file at ``path`` through ``make_writer``, safely.

    Args:
        path: the final trace path.
        make_writer: builds the writer for a given file path (it creates the
            file, writes the header and flushes).
        overwrite: replace an existing non-empty file at ``path``.
        header_bytes: an estimate of the header's size, for the free-space check.
        source: what to call the path in error messages.

    Returns:
        The writer (whose file now sits at ``path``) and the held lock; release
        the lock after closing the writer.

    Raises:
        TraceConfigError: another writer holds the path, the file exists and
            ``overwrite`` is false, or the file cannot be created (no space, no permission).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = acquire(path, source=source)
    except OSError as exc:
        raise TraceConfigError(f"{source}={str(path)!r}: cannot write there ({exc.strerror or exc})") from None
    try:
        refuse_overwrite(path, overwrite=overwrite, source=source)
        shortage = free_room(path.parent if str(path.parent) else Path("."), header_bytes + METADATA_RESERVE)
        if shortage is not None:
            raise TraceConfigError(f"{source}={str(path)!r}: cannot start a trace there: {shortage}")
        writer = _create_atomically(path, make_writer, source)
    except BaseException:
        lock.release()
        raise
    return writer, lock


def refuse_overwrite(path: Path, *, overwrite: bool, source: str = "output") -> None:
    """Raise unless ``path`` is absent, empty, or ``overwrite`` is set.

    Raises:
        TraceConfigError: naming the file and the three ways to allow it.
    """
    if overwrite:
        return
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size == 0 or not path.is_file():
        return
    raise TraceConfigError(
        f"{source}={str(path)!r} already exists ({size:,} bytes); tracediff does not overwrite a trace unless told "
        f"to: pass attach(..., overwrite=True), set {ENV_OVERWRITE}=1, or give 'tracediff run' --force "
        "(or choose another path; <pid> in the path gives each run its own)"
    )


def partial_path(path: Path) -> Path:
    """The hidden sibling a trace's header is written to before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _create_atomically(path: Path, make_writer: Callable[[Path], W], source: str) -> W:
    staging = partial_path(path)
    try:
        writer = make_writer(staging)
        os.replace(staging, path)
    except (OSError, RuntimeError) as exc:  # h5py reports HDF5 I/O failures as either
        _remove(staging)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200]
        raise TraceConfigError(f"{source}={str(path)!r}: cannot create the trace file ({reason})") from None
    except BaseException:
        _remove(staging)
        raise
    if hasattr(writer, "path"):
        writer.path = path  # the file was renamed under the open handle; messages should name the real path
    return writer


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
