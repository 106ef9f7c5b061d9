"""HDF5 trace reader: refuses anything it cannot read faithfully.

It reads only up to the last row of ``/commits``, so a file from a killed run
gives exactly the steps that were completed, never a torn one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tracediff.errors import TraceFormatError
from tracediff.store.format import ENCODING_TYPE, FORMAT_VERSION, FULL_F32, FULL_F64, MAX_DIMS, RECORD_COLUMNS
from tracediff.store.lock import holder
from tracediff.store.ranks import read_rank_layout
from tracediff.store.validate import check_records
from tracediff.store.writer import COMMIT_FIELDS
from tracediff.trace import FINGERPRINT_SAMPLE, ModuleTable, ParamEntry, Records, Trace


def open_trace(path: str | Path) -> Trace:
    """Open a tracediff HDF5 trace.

    Args:
        path: the ``.h5`` file one side's recorder wrote.

    Returns:
        A :class:`~tracediff.trace.Trace`; close it (or use ``with``) to release the file.

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
    columns = {name: np.asarray(group[name][:count], dtype=dtype) for name, dtype in RECORD_COLUMNS.items()}
    for name, column in columns.items():
        if column.shape[0] != count:
            raise TraceFormatError(f"{path}: damaged trace: column {name!r} holds {column.shape[0]} of {count} records")
    shape = np.asarray(group["shape"][:count], dtype=np.int64).reshape(count, MAX_DIMS)
    labels = [_text(v) for v in handle["labels"][: int(last["labels"])]]
    dtypes = [_text(v) for v in handle["dtypes"][: int(last["dtypes"])]]
    if count and (columns["label"].max() >= len(labels) or columns["dtype"].max() >= len(dtypes)):
        raise TraceFormatError(f"{path}: damaged trace: a record points past the label or dtype table")
    modules = _read_modules(handle)
    if count and columns["module"].max() >= len(modules.names):
        raise TraceFormatError(f"{path}: damaged trace: a record points past the module table")
    config = attrs.pop("config", {})
    samples = CommittedValues(handle["samples"], int(last["samples"]))
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
        _closer=handle.close,
        ranks=read_rank_layout(handle, count),
    )


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

    def __init__(self, dataset: h5py.Dataset, length: int) -> None:
        self._data = dataset
        self._length = min(int(length), int(dataset.shape[0]))
        self._whole: np.ndarray | None = None

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
        if len(out):
            self._data.read_direct(out, np.s_[start : start + len(out)], np.s_[0 : len(out)])


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
        param_moments=np.asarray(params["moments"][()], dtype=np.float64).reshape(-1, 7),
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
