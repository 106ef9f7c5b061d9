"""Open any trace file tracediff understands, deciding by content rather than by name.

A user hands ``first-drift`` whatever they have: a tracediff HDF5 trace or a
FastVideo JSONL file, possibly named ``trace.out``. The first bytes decide: the
HDF5 signature, or a ``{`` starting the first non-blank line.
"""

from __future__ import annotations

from pathlib import Path

from tracediff.errors import TraceFormatError
from tracediff.store.jsonl import read_jsonl
from tracediff.store.reader import open_trace
from tracediff.trace import Trace

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
        The trace; close it when done (a no-op for JSONL, which is read whole).

    Raises:
        TraceFormatError: missing, empty, a directory, or neither format.
    """
    path = Path(path)
    kind = sniff(path)
    if kind == "hdf5":
        return open_trace(path)
    return read_jsonl(path, skip_bad_lines=skip_bad_lines)


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
