"""Disk full without a damaged trace: refuse a step the disk cannot hold, before HDF5 writes it.

HDF5 does not survive running out of space in the middle of a flush. The
writes that extend the file fail, but the ones that rewrite metadata near the
start of the file succeed, so the superblock ends up promising a file longer
than the one on disk, and nothing (tracediff, h5py, ``h5dump``) opens it again.
The writer therefore asks :func:`ensure_room` before each step: if the
filesystem's free space or the process's file-size limit (``ulimit -f``) could
not take the step plus a reserve for HDF5's own bookkeeping, the step is
refused with an :class:`OSError` before a byte of it is written. The recorder
turns that into one warning and stops tracing, and the file is closed with
every committed step intact (and a ``stopped`` attribute saying why).

Should the disk fill up anyway (another process taking the space between the
check and the write), the failed write detaches the file from the disk at once
(its descriptor then points at /dev/null): HDF5 would otherwise retry its
failing flushes whenever an object is released and at interpreter exit, and
crash the traced program there. The file on disk keeps what the last successful
flush put there; ``open_trace`` reads up to its last commit when it can.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import resource
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

T = TypeVar("T")

#: Room kept for HDF5's bookkeeping around a step (chunk-index nodes, object
#: headers, the string heap) and for the final flush when the file is closed.
METADATA_RESERVE = 1 << 18

#: The tables a step appends to, and how many elements of each one batch adds.
_TABLES: dict[str, Callable[[Any], int]] = {
    "samples": lambda batch: _size_of(batch.samples),
    "full/f32": lambda batch: _size_of(batch.full_f32),
    "full/f64": lambda batch: _size_of(batch.full_f64),
    "commits": lambda batch: 1,
    "commit_time": lambda batch: 1,
}

_layouts: weakref.WeakKeyDictionary[h5py.File, list[tuple[str, int, int]]] = weakref.WeakKeyDictionary()


def room_needed(file: h5py.File, batch: Any) -> int:
    """Bytes the file may grow by when ``batch`` is written: whole chunks, as HDF5 allocates them.

    Each table that receives ``n`` elements may allocate ``ceil(n / chunk) + 1``
    new chunks (the ``+ 1``: the run may start in a fresh chunk and end in
    another), read from the file's own layout; plus the new label and dtype
    strings and :data:`METADATA_RESERVE`.
    """
    rows = len(batch.labels)
    need = METADATA_RESERVE + sum(len(text.encode("utf-8", "replace")) + 32 for text in (*batch.labels, *batch.dtypes))
    for name, chunk, chunk_bytes in _layout(file):
        count = rows if name.startswith("records/") else _TABLES[name](batch)
        if count:
            need += (-(-count // chunk) + 1) * chunk_bytes
    return need


def _layout(file: h5py.File) -> list[tuple[str, int, int]]:
    """``(table, elements per chunk, bytes per chunk)`` of every appended table, read once per file."""
    layout = _layouts.get(file)
    if layout is None:
        layout = []
        records = [f"records/{name}" for name in file["records"]] if "records" in file else []
        names = records + [name for name in _TABLES if name in file]
        for name in names:
            dataset = file[name]
            chunks = dataset.chunks or dataset.shape or (1,)
            rows = chunks[0]
            layout.append((name, max(1, rows), max(1, math.prod(chunks)) * dataset.dtype.itemsize))
        _layouts[file] = layout
    return layout


def ensure_room(file: h5py.File, batch: Any) -> None:
    """Refuse to write ``batch`` into ``file`` when the disk or the file-size limit cannot hold it.

    Records the reason as the root attribute ``stopped`` (written when the file is closed).

    Raises:
        OSError: ``ENOSPC`` (filesystem nearly full) or ``EFBIG`` (``ulimit -f`` nearly reached).
    """
    need = room_needed(file, batch)
    problem = _shortage(file, need)
    if problem is None:
        return
    code, text = problem
    with contextlib.suppress(Exception):  # the reason is a courtesy; refusing the step is what matters
        file.attrs["stopped"] = text
    raise OSError(code, text)


def guard_write(method: Callable[..., T]) -> Callable[..., T]:
    """Decorate ``TraceWriter.write_step(self, step, batch)``: check for room first, detach on failure.

    The check (:func:`ensure_room`) refuses a step before a byte of it is
    written; the file stays healthy and closes normally. Should a write fail
    anyway, the file is detached from the disk at once (:func:`detach`), while
    the method's HDF5 objects are still alive: their release, and every later
    flush and close, then write into /dev/null instead of failing again.
    """

    @functools.wraps(method)
    def write_step(self: Any, step: int, batch: Any) -> T:
        ensure_room(self._file, batch)
        try:
            return method(self, step, batch)
        except Exception:  # not KeyboardInterrupt: it never lands inside an HDF5 call, the file stays sound
            detach(self._file)
            raise

    return write_step


def close_or_discard(file: h5py.File) -> None:
    """Close ``file``; if that fails, detach it from the disk and close again.

    Raises:
        Exception: the original failure of the first close.
    """
    try:
        file.close()
    except Exception:
        if detach(file):
            with contextlib.suppress(Exception):  # nothing left to save: HDF5 only has to let go of it
                file.close()
        raise


def detach(file: h5py.File) -> bool:
    """Point ``file``'s descriptor at /dev/null: HDF5 writes nothing more to the disk, and cannot fail to.

    The file on disk keeps what the writes before this put there. Returns
    whether it was detached (False for a closed file or one without a POSIX descriptor).
    """
    try:
        fd = file.id.get_vfd_handle()
    except Exception:
        return False
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)
    return True


def free_room(directory: Path, need: int) -> str | None:
    """Why a new file of ``need`` bytes would not fit in ``directory``, or None when it would."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        vfs = os.statvfs(probe)
    except OSError:
        return None
    problem = _compare(vfs, 0, need, what="a new trace")
    return problem[1] if problem else None


def _shortage(file: h5py.File, need: int) -> tuple[int, str] | None:
    try:
        fd = file.id.get_vfd_handle()
        size = int(file.id.get_filesize())
        vfs = os.fstatvfs(fd)
    except Exception:  # not a plain POSIX file (another driver): nothing to check
        return None
    problem = _compare(vfs, size, need, what="a step")
    return (problem[0], problem[1] + "; tracing stopped before writing it") if problem else None


def _compare(vfs: os.statvfs_result, size: int, need: int, *, what: str) -> tuple[int, str] | None:
    blocks = vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail
    free = blocks * vfs.f_frsize
    if free < need:
        return errno.ENOSPC, (
            f"disk nearly full: {_size(free)} free where the trace is, {what} needs up to {_size(need)}"
        )
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and size + need > limit:
        return errno.EFBIG, (
            f"file size limit (ulimit -f) of {_size(limit)} nearly reached at {_size(size)}, {what} needs up to "
            f"{_size(need)}"
        )
    return None


def _size_of(values: Any) -> int:
    """Elements in one array or a list of arrays (how a batch may carry its flat values)."""
    if values is None:
        return 0
    if isinstance(values, (list, tuple)):
        return sum(_size_of(item) for item in values)
    return int(np.asarray(values).size)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
