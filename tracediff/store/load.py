"""Open any trace file tracediff understands, deciding by content rather than by name.

A user hands ``first-drift`` whatever they have: a tracediff HDF5 trace or a
FastVideo JSONL file, possibly named ``trace.out``. The first bytes decide: the
HDF5 signature, or a ``{`` starting the first non-blank line.

A folder or a glob names the per-rank traces of one distributed run: this module lists
and opens them; merging them into one trace of the whole model is :mod:`tracediff.merge`'s
job (:func:`tracediff.merge.load_merged` takes a file, a folder or a glob).
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from tracediff.errors import TraceFormatError
from tracediff.store.jsonl import read_jsonl
from tracediff.store.reader import open_trace
from tracediff.store.trace import Trace

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: HDF5 allows a user block before the superblock; the signature sits at 0 or a power of two from 512.
_SIGNATURE_OFFSETS = (0, 512, 1024, 2048, 4096)
_SNIFF_BYTES = 4096


def load_trace(path: str | Path, *, skip_bad_lines: bool = False) -> Trace:
    """Open a tracediff HDF5 trace or a FastVideo JSONL trace.

    Args:
        path: the file.
        skip_bad_lines: JSONL only; see :func:`tracediff.store.jsonl.read_jsonl`.

    Returns:
        The trace; close it when done (a no-op for JSONL traces, which are read whole).

    Raises:
        TraceFormatError: missing, empty, a directory, or neither format.
    """
    path = Path(path)
    kind = sniff(path)
    if kind == "hdf5":
        return open_trace(path)
    return read_jsonl(path, skip_bad_lines=skip_bad_lines)


def rank_trace_paths(spec: str | Path) -> list[Path] | None:
    """The trace files a folder or a glob pattern names, sorted; None for a plain file path.

    Files in a folder that are not traces (logs, notes) are skipped.

    Raises:
        TraceFormatError: the folder holds no trace, or the pattern matches nothing.
    """
    path = Path(spec)
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.is_file() and _is_trace(p)]
        if not found:
            raise TraceFormatError(f"{path}: a folder without trace files (.h5 per rank expected)")
        return found
    text = str(spec)
    if path.exists() or not glob.has_magic(text):
        return None
    found = [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
    if not found:
        raise TraceFormatError(f"{text}: no file matches this pattern")
    return found


def is_rank_set(spec: str | Path) -> bool:
    """Whether ``spec`` names several files at once (a folder or a glob), not one trace file."""
    path = Path(spec)
    return path.is_dir() or (not path.exists() and glob.has_magic(str(spec)))


def open_traces(paths: Sequence[Path]) -> list[Trace]:
    """Open every file; on failure close the ones already open."""
    opened: list[Trace] = []
    try:
        for item in paths:
            opened.append(load_trace(item))
    except BaseException:
        for trace in opened:
            trace.close()
        raise
    return opened


def _is_trace(path: Path) -> bool:
    try:
        sniff(path)
    except TraceFormatError:
        return False
    return True


def sniff(path: Path) -> str:
    """``"hdf5"`` or ``"jsonl"``, from the file's first bytes.

    Raises:
        TraceFormatError: the file is missing, empty, a directory, or neither.
    """
    if not path.exists():
        raise TraceFormatError(f"{path}: no such file")
    if path.is_dir():
        raise TraceFormatError(f"{path}: is a directory, expected a trace file (.h5 or .jsonl)")
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
            for offset in _SIGNATURE_OFFSETS[1:]:
                handle.seek(offset)
                if handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return "hdf5"
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise TraceFormatError(f"{path}: empty file, not a trace")
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
        return "jsonl"
    raise TraceFormatError(
        f"{path}: neither a tracediff HDF5 trace nor a FastVideo JSONL trace "
        "(expected the HDF5 signature or JSON objects, one per line)"
    )
