"""HDF5 trace reader: refuses anything it cannot read faithfully.

It reads only up to the last row of ``/commits``, so a file from a killed run
gives exactly the steps that were completed, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tracediff.errors import TraceFormatError
from tracediff.moments import MOMENT_COUNT
from tracediff.store.format import ENCODING_TYPE, FORMAT_VERSION, FULL_F32, FULL_F64, MAX_DIMS, RECORD_COLUMNS
from tracediff.store.lock import holder
from tracediff.store.ranks import read_rank_layout
from tracediff.store.trace import FINGERPRINT_SAMPLE, ModuleTable, ParamEntry, Records, Trace
from tracediff.store.validate import check_records
from tracediff.store.writer import COMMIT_FIELDS


def open_trace(path: str | Path) -> Trace:
    """Open a tracediff HDF5 trace.

    Args:
        path: the ``.h5`` file one side's recorder wrote.

    Returns:
        A :class:`~tracediff.store.trace.Trace`; close it (or use ``with``) to release the file.

    Raises:
        TraceFormatError: missing, empty, not HDF5, not a trace, damaged, or newer format.
    """
    path = Path(path)
    _check_file(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        writer = holder(path)
        if writer is not None:  # HDF5 refuses to read a file another process has open for writing
            who = f"process {writer}" if writer else "another process"
            raise TraceFormatError(
                f"{path}: still being written by {who}; it can be read once that run closes it or ends"
            ) from None
        raise TraceFormatError(
            f"{path}: not a readable HDF5 file (truncated, damaged, or another format): {_short(exc)}"
        ) from None
    try:
        trace = _read(path, handle)
    except TraceFormatError:
        handle.close()
        raise
    except (KeyError, ValueError, OSError, TypeError, IndexError) as exc:
        handle.close()
        raise TraceFormatError(f"{path}: damaged tracediff trace ({_short(exc)})") from None
    return trace


def _check_file(path: Path) -> None:
    if not path.exists():
        raise TraceFormatError(f"{path}: no such file")
    if path.is_dir():
        raise TraceFormatError(f"{path}: is a directory, expected a trace file (.h5)")
    if path.stat().st_size == 0:
        raise TraceFormatError(f"{path}: empty file, not a trace")


def _read(path: Path, handle: h5py.File) -> Trace:
    mapped = _FileMap.open(path, handle)
    try:
        return _read_trace(path, handle, mapped)
    except BaseException:
        if mapped is not None:
            mapped.close()
        raise


def _read_trace(path: Path, handle: h5py.File, mapped: _FileMap | None) -> Trace:
    attrs = {key: _attr(value) for key, value in handle.attrs.items()}
    if attrs.get("encoding-type") != ENCODING_TYPE:
        raise TraceFormatError(
            f"{path}: an HDF5 file but not a tracediff trace (no encoding-type={ENCODING_TYPE!r} attribute)"
        )
    version = _version(path, attrs)
    if version > FORMAT_VERSION:
        raise TraceFormatError(
            f"{path}: written in trace format version {version}; this tracediff reads versions up to "
            f"{FORMAT_VERSION}; upgrade tracediff to read it"
        )
    commits = handle["commits"][()]
    last = dict.fromkeys(COMMIT_FIELDS, 0)
    if len(commits):
        last = dict(zip(COMMIT_FIELDS, commits[-1].tolist(), strict=True))
    count = int(last["records"])
    group = handle["records"]
    columns = {name: _column(mapped, group[name], count, dtype) for name, dtype in RECORD_COLUMNS.items()}
    for name, column in columns.items():
        if column.shape[0] != count:
            raise TraceFormatError(f"{path}: damaged trace: column {name!r} holds {column.shape[0]} of {count} records")
    shape = _column(mapped, group["shape"], count, np.int64).reshape(count, MAX_DIMS)
    labels = [_text(v) for v in handle["labels"][: int(last["labels"])]]
    dtypes = [_text(v) for v in handle["dtypes"][: int(last["dtypes"])]]
    if count and (columns["label"].max() >= len(labels) or columns["dtype"].max() >= len(dtypes)):
        raise TraceFormatError(f"{path}: damaged trace: a record points past the label or dtype table")
    modules = _read_modules(handle)
    if count and columns["module"].max() >= len(modules.names):
        raise TraceFormatError(f"{path}: damaged trace: a record points past the module table")
    config = attrs.pop("config", {})
    samples = CommittedValues(handle["samples"], int(last["samples"]), mapped)
    full = {FULL_F32: handle["full/f32"], FULL_F64: handle["full/f64"]}
    committed_full = {FULL_F32: int(last["full_f32"]), FULL_F64: int(last["full_f64"])}
    check_records(
        path,
        columns,
        shape,
        tables={"labels": len(labels), "dtypes": len(dtypes), "modules": len(modules.names), "samples": len(samples)},
        full_tables={kind: min(length, full[kind].shape[0]) for kind, length in committed_full.items()},
    )
    return Trace(
        path=str(path),
        meta=attrs,
        config=config if isinstance(config, dict) else {},
        modules=modules,
        records=Records(columns=columns, shape=shape, labels=labels, dtypes=dtypes),
        complete=bool(attrs.get("complete", False)),
        samples=samples,
        full_values=full,
        _closer=_closer(handle, mapped),
        ranks=read_rank_layout(handle, count),
    )


def _closer(handle: h5py.File, mapped: _FileMap | None) -> Any:
    if mapped is None:
        return handle.close

    def close() -> None:
        handle.close()
        mapped.close()

    return close


class CommittedValues:
    """A trace's flat value table (``/samples``), read on demand up to its last commit.

    ``run`` records a 256-element sample of every tensor: 2 GB per side at a million
    records. Reading it whole cost more than everything else ``first-drift`` does
    (mostly the kernel faulting in a fresh multi-GB array); the differ reads it chunk
    by chunk into one reused buffer instead (:meth:`read_into`). Indexing returns
    float64 arrays; ``np.asarray`` reads everything. Valid while the trace is open,
    like ``full_values``.
    """

    #: Tables up to this many values are read whole on the first small read (64 MiB): the aligner
    #: and the pre-flight read one record's sample at a time, and an h5py call costs ~0.1 ms.
    WHOLE_BELOW = 1 << 23

    def __init__(self, dataset: h5py.Dataset, length: int, mapped: _FileMap | None = None) -> None:
        self._data = dataset
        self._length = min(int(length), int(dataset.shape[0]))
        self._whole: np.ndarray | None = None
        self._chunks = mapped.chunks(dataset, self._length) if mapped is not None else None

    def __len__(self) -> int:
        return self._length

    @property
    def shape(self) -> tuple[int]:
        return (self._length,)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float64)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            start, stop, stride = item.indices(self._length)
            if stride == 1:
                if stop <= start:
                    return np.zeros(0)
                if self._whole is None and self._length <= self.WHOLE_BELOW:
                    self._whole = np.asarray(self)
                if self._whole is not None:
                    return self._whole[start:stop].copy()
                if self._chunks is not None:  # a record's sample: one pread, not an h5py selection
                    out = np.empty(stop - start)
                    self._chunks.read_into(out, start)
                    return out
                return np.asarray(self._data[start:stop], dtype=np.float64)
            return np.asarray(self)[item]
        if isinstance(item, (int, np.integer)):
            index = int(item) + (self._length if int(item) < 0 else 0)
            if not 0 <= index < self._length:
                raise IndexError(f"index {int(item)} out of range for {self._length} values")
            return float(self._data[index])
        return np.asarray(self)[item]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self._length)
        if self._length:
            self.read_into(out, 0)
        return out if dtype is None else out.astype(dtype, copy=False)

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Fill ``out`` (float64, contiguous) with values ``start .. start + len(out)``."""
        if start < 0 or start + len(out) > self._length:
            raise IndexError(f"values {start}..{start + len(out)} out of range for {self._length}")
        if not len(out):
            return
        if self._chunks is not None:
            self._chunks.read_into(out, start)
            return
        self._data.read_direct(out, np.s_[start : start + len(out)], np.s_[0 : len(out)])


def _column(mapped: _FileMap | None, dataset: h5py.Dataset, count: int, dtype: Any) -> np.ndarray:
    """``dataset[:count]`` as ``dtype``: from the file's mapping when it allows, else through h5py."""
    chunks = mapped.chunks(dataset, count) if mapped is not None else None
    if chunks is not None:
        out = np.empty((count, *dataset.shape[1:]), dtype=dataset.dtype)
        chunks.read_into(out, 0)
        return out.astype(dtype, copy=False)
    return np.asarray(dataset[:count], dtype=dtype)


class _FileMap:
    """The trace file read directly (``pread``), to copy uncompressed chunks straight out of it.

    h5py costs ~25 us per chunk read: the record columns of a million records are 40 000
    chunks of 1024 values (about a second per side), the samples 16 000 chunks. The chunks
    of an unfiltered dataset are plain native arrays in the file, mostly written back to
    back; read with one ``pread`` per run of chunks they cost a copy from the page cache.
    (A memory mapping would save that copy but costs a page fault per page touched.)
    Anything else (filters, a user block, a chunk not written, another layout, a check
    value that differs) falls back to h5py.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    @classmethod
    def open(cls, path: Path, handle: h5py.File) -> _FileMap | None:
        if not hasattr(os, "preadv"):
            return None
        try:
            if handle.driver != "sec2" or handle.userblock_size:
                return None
            fd = os.open(path, os.O_RDONLY)
        except (OSError, ValueError, TypeError):
            return None
        return cls(fd, os.fstat(fd).st_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # a trace never closed: its descriptor goes with it, as h5py's file does
        with contextlib.suppress(OSError):
            self.close()

    def chunks(self, dataset: h5py.Dataset, count: int) -> _Chunks | None:
        """Where rows ``0 .. count`` of ``dataset`` lie in the file, chunk by chunk; None if not plainly there."""
        try:
            return self._chunks(dataset, count)
        except (AttributeError, OSError, ValueError, TypeError, RuntimeError, KeyError):
            return None

    def _chunks(self, dataset: h5py.Dataset, count: int) -> _Chunks | None:
        dtype = dataset.dtype
        layout = dataset.chunks
        if (
            layout is None
            or dtype.kind not in "iuf"
            or not dtype.isnative
            or tuple(layout[1:]) != tuple(dataset.shape[1:])
            or dataset.id.get_create_plist().get_nfilters()
            or count > dataset.shape[0]
        ):
            return None
        rows = int(layout[0])
        row_bytes = int(np.prod(layout[1:], dtype=np.int64)) * dtype.itemsize
        needed = -(-count // rows)
        found: dict[int, int] = {}

        def visit(info: Any) -> None:
            if info.filter_mask == 0 and info.size == rows * row_bytes:
                found[int(info.chunk_offset[0]) // rows] = int(info.byte_offset)

        dataset.id.chunk_iter(visit)
        if any(k not in found for k in range(needed)):
            return None
        starts = np.asarray([found[k] for k in range(needed)], dtype=np.int64)
        if needed and int(starts.max()) + rows * row_bytes > self.size:
            return None
        chunks = _Chunks(self, starts, rows, dtype, dataset.shape[1:], count)
        if needed:  # the first and the last value as h5py reads them: a file that disagrees is not read directly
            for at in {0, count - 1}:
                probe = np.empty((1, *dataset.shape[1:]), dtype=dtype)
                chunks.read_into(probe, at)
                if not np.array_equal(probe, dataset[at : at + 1], equal_nan=dtype.kind == "f"):
                    return None
        return chunks


class _Chunks:
    """Rows of one chunked dataset, read straight from the file."""

    def __init__(
        self, file: _FileMap, starts: np.ndarray, rows: int, dtype: np.dtype, row_shape: tuple[int, ...], count: int
    ) -> None:
        self.file, self.starts, self.rows, self.dtype = file, starts, rows, dtype
        self.row_shape = tuple(row_shape)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        self.count = count
        # chunks written back to back in the file are read as one piece: the last chunk of each run
        ends = np.flatnonzero(np.diff(starts) != rows * self.row_bytes)
        self.run_last = np.append(ends, len(starts) - 1).astype(np.int64)

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Fill ``out`` (C-contiguous rows of this dataset's dtype) with rows ``start .. start + len(out)``."""
        stop = start + len(out)
        if start < 0 or stop > self.count:
            raise IndexError(f"rows {start}..{stop} out of range for {self.count}")
        if out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError("read_into needs a C-contiguous array of the dataset's dtype")
        if self.file.fd < 0:
            raise ValueError("the trace is closed")
        target = out.reshape(-1).view(np.uint8).data
        at = start
        while at < stop:
            k, within = divmod(at, self.rows)
            last = int(self.run_last[np.searchsorted(self.run_last, k)])
            n = min((last + 1) * self.rows - at, stop - at)
            lo = int(self.starts[k]) + within * self.row_bytes
            piece = target[(at - start) * self.row_bytes : (at - start + n) * self.row_bytes]
            while len(piece):
                got = os.preadv(self.file.fd, [piece], lo)
                if got <= 0:
                    raise OSError(f"short read at byte {lo}")
                piece, lo = piece[got:], lo + got
            at += n


def _read_modules(handle: h5py.File) -> ModuleTable:
    names = [_text(v) for v in handle["modules/name"][()]]
    classes = [_text(v) for v in handle["modules/class"][()]]
    params = handle["params"]
    module = params["module"][()].tolist()
    shapes = params["shape"][()].tolist()
    ndims = params["ndim"][()].tolist()
    # whole columns at once: one h5py read per element costs ~1 ms per parameter
    pnames, kinds, dtypes = ([_text(v) for v in params[key][()]] for key in ("name", "kind", "dtype"))
    entries = [
        ParamEntry(
            module_index=module[i],
            name=pnames[i],
            kind=kinds[i],
            shape=tuple(shapes[i][: ndims[i]]),
            dtype=dtypes[i],
        )
        for i in range(len(module))
    ]
    return ModuleTable(
        names=names,
        classes=classes,
        params=entries,
        param_moments=np.asarray(params["moments"][()], dtype=np.float64).reshape(-1, MOMENT_COUNT),
        param_samples=np.asarray(params["sample"][()], dtype=np.float64).reshape(-1, FINGERPRINT_SAMPLE),
        param_samples_t=np.asarray(params["sample_t"][()], dtype=np.float64).reshape(-1, FINGERPRINT_SAMPLE),
    )


def _version(path: Path, attrs: dict[str, Any]) -> int:
    raw = attrs.get("encoding-version", attrs.get("format_version"))
    try:
        return int(str(raw).split(".")[0])
    except ValueError:
        raise TraceFormatError(f"{path}: unreadable format version {raw!r}") from None


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
