"""HDF5 trace writer: append one step at a time, never leave a half-step behind.

Each :meth:`TraceWriter.write_step` appends the step's records and values,
flushes, and only then appends a row to ``/commits`` and flushes again. A
reader trusts nothing past the last commit row, so a process killed at any
moment leaves a file whose committed records form a prefix of the run (see
docs/trace-format.md, "Crash safety").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tracediff.moments import MOMENT_COUNT
from tracediff.store.diskspace import close_or_discard, guard_write
from tracediff.store.format import (
    ENCODING_TYPE,
    FORMAT_VERSION,
    FULL_CHUNK,
    FULL_F32,
    FULL_F64,
    FULL_NONE,
    MAX_DIMS,
    RECORD_CHUNK,
    RECORD_COLUMNS,
    SHAPE_COLUMN,
    VALUE_CHUNK,
)
from tracediff.store.trace import FINGERPRINT_SAMPLE, ModuleTable

_STR = h5py.string_dtype("utf-8")
#: Elements per h5py write call when appending values (16 MiB of float64).
WRITE_SLICE = 1 << 21
#: Datasets written at every step, looked up once.
_DATASETS = ("labels", "dtypes", "samples", "full/f32", "full/f64", "commits", "commit_time")
COMMIT_FIELDS = ("step", "records", "labels", "dtypes", "samples", "full_f32", "full_f64")


@dataclass
class StepBatch:
    """One step's records, column-wise, ready to append."""

    columns: dict[str, np.ndarray]
    shape: np.ndarray
    labels: list[str] = field(default_factory=list)  # label strings, one per record
    dtypes: list[str] = field(default_factory=list)  # dtype names, one per record
    samples: np.ndarray | None = None  # flat float64 values; offsets are batch-relative
    #: full tensors, flat: one array, or a list of arrays stored one after another (no concatenation)
    full_f32: np.ndarray | list[np.ndarray] | None = None
    full_f64: np.ndarray | list[np.ndarray] | None = None


class TraceWriter:
    """Writes one side's trace file. Not thread-safe: the recorder serialises calls."""

    def __init__(self, path: Path, *, attrs: dict[str, Any], module_table: ModuleTable) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = h5py.File(path, "w")
        self._label_index: dict[str, int] = {}
        self._dtype_index: dict[str, int] = {}
        self._closed = False
        self._write_header(attrs)
        self._write_modules(module_table)
        self._create_tables()
        # h5py looks a dataset up by path on every access, and each step touches every table: keep them
        self._datasets = {name: self._file[name] for name in _DATASETS}
        self._records = {name: self._file["records"][name] for name in (*RECORD_COLUMNS, SHAPE_COLUMN)}
        self._file.flush()

    # -- layout --------------------------------------------------------------
    def _write_header(self, attrs: dict[str, Any]) -> None:
        root = self._file.attrs
        root["encoding-type"] = ENCODING_TYPE
        root["encoding-version"] = str(FORMAT_VERSION)
        root["format_version"] = FORMAT_VERSION
        root["complete"] = False
        for key, value in attrs.items():
            self.set_attr(key, value)

    def _write_modules(self, table: ModuleTable) -> None:
        group = self._file.create_group("modules")
        group.attrs["encoding-type"] = "tracediff-module-table"
        group.attrs["encoding-version"] = str(FORMAT_VERSION)
        group.create_dataset("name", data=np.array(table.names, dtype=object), dtype=_STR)
        group.create_dataset("class", data=np.array(table.classes, dtype=object), dtype=_STR)
        params = self._file.create_group("params")
        params.attrs["encoding-type"] = "tracediff-param-table"
        params.attrs["encoding-version"] = str(FORMAT_VERSION)
        params.attrs["fingerprint_sample"] = FINGERPRINT_SAMPLE
        entries = table.params
        shapes = np.full((len(entries), MAX_DIMS), -1, dtype=np.int64)
        for row, entry in enumerate(entries):
            dims = entry.shape[:MAX_DIMS]
            shapes[row, : len(dims)] = dims
        params.create_dataset("module", data=np.array([e.module_index for e in entries], dtype=np.int32))
        params.create_dataset("name", data=np.array([e.name for e in entries], dtype=object), dtype=_STR)
        params.create_dataset("kind", data=np.array([e.kind for e in entries], dtype=object), dtype=_STR)
        params.create_dataset("dtype", data=np.array([e.dtype for e in entries], dtype=object), dtype=_STR)
        params.create_dataset("ndim", data=np.array([len(e.shape) for e in entries], dtype=np.int8))
        params.create_dataset("shape", data=shapes)
        params.create_dataset("moments", data=table.param_moments.reshape(len(entries), MOMENT_COUNT))
        params.create_dataset("sample", data=table.param_samples.reshape(len(entries), FINGERPRINT_SAMPLE))
        params.create_dataset("sample_t", data=table.param_samples_t.reshape(len(entries), FINGERPRINT_SAMPLE))

    def _create_tables(self) -> None:
        records = self._file.create_group("records")
        records.attrs["encoding-type"] = "tracediff-records"
        records.attrs["encoding-version"] = str(FORMAT_VERSION)
        for name, dtype in RECORD_COLUMNS.items():
            records.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(RECORD_CHUNK,))
        records.create_dataset(
            SHAPE_COLUMN, shape=(0, MAX_DIMS), maxshape=(None, MAX_DIMS), dtype="i8", chunks=(RECORD_CHUNK, MAX_DIMS)
        )
        for table in ("labels", "dtypes"):
            self._file.create_dataset(table, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))
        self._file.create_dataset("samples", shape=(0,), maxshape=(None,), dtype="f8", chunks=(VALUE_CHUNK,))
        full = self._file.create_group("full")
        full.create_dataset("f32", shape=(0,), maxshape=(None,), dtype="f4", chunks=(FULL_CHUNK,))
        full.create_dataset("f64", shape=(0,), maxshape=(None,), dtype="f8", chunks=(FULL_CHUNK,))
        width = len(COMMIT_FIELDS)
        commits = self._file.create_dataset(
            "commits", shape=(0, width), maxshape=(None, width), dtype="i8", chunks=(256, width)
        )
        commits.attrs["fields"] = list(COMMIT_FIELDS)
        self._file.create_dataset("commit_time", shape=(0,), maxshape=(None,), dtype="f8", chunks=(256,))

    # -- appending -----------------------------------------------------------
    @guard_write  # refuse a step the disk cannot hold; detach the file from the disk if a write fails anyway
    def write_step(self, step: int, batch: StepBatch) -> None:
        """Append one step's records and commit them.

        Raises:
            OSError: the disk (or ``ulimit -f``) cannot hold the step; nothing was written.
        """
        records = self._records
        datasets = self._datasets
        start = records["seq"].shape[0]
        count = len(batch.labels)
        columns = dict(batch.columns)
        columns["label"] = np.array([self._intern(self._label_index, "labels", s) for s in batch.labels], np.int32)
        columns["dtype"] = np.array([self._intern(self._dtype_index, "dtypes", s) for s in batch.dtypes], np.int16)
        sample_start = self._append("samples", batch.samples)
        f32_start = self._append("full/f32", batch.full_f32)
        f64_start = self._append("full/f64", batch.full_f64)
        if count:
            columns["sample_offset"] = np.where(
                columns["sample_len"] > 0, columns["sample_offset"] + sample_start, -1
            )
            kind = columns["full_kind"]
            base = np.where(kind == FULL_F32, f32_start, np.where(kind == FULL_F64, f64_start, 0))
            columns["full_offset"] = np.where(kind == FULL_NONE, -1, columns["full_offset"] + base)
            for name, dtype in RECORD_COLUMNS.items():
                _append_rows(records[name], start, np.asarray(columns[name], dtype=dtype))
            _append_rows(records[SHAPE_COLUMN], start, np.asarray(batch.shape, dtype=np.int64))
        self._file.flush()
        commits = datasets["commits"]
        row = [
            step,
            start + count,
            datasets["labels"].shape[0],
            datasets["dtypes"].shape[0],
            datasets["samples"].shape[0],
            datasets["full/f32"].shape[0],
            datasets["full/f64"].shape[0],
        ]
        _append_rows(commits, commits.shape[0], np.array([row], dtype=np.int64))
        stamps = datasets["commit_time"]
        _append_rows(stamps, stamps.shape[0], np.array([time.time()], dtype=np.float64))
        self._file.flush()

    def _intern(self, index: dict[str, int], table: str, value: str) -> int:
        found = index.get(value)
        if found is None:
            found = index[value] = len(index)
            data = self._datasets[table]
            data.resize((found + 1,))
            data[found] = value
        return found

    def _append(self, name: str, values: np.ndarray | list[np.ndarray] | None) -> int:
        """Append flat values in writes of about :data:`WRITE_SLICE` elements.

        Small parts are gathered into one write (an h5py call costs ~0.1 ms
        whatever its size), large ones split, so a writer thread never keeps the
        HDF5 library busy for long at a time.
        """
        data = self._datasets[name]
        start = data.shape[0]
        parts = [] if values is None else [values] if isinstance(values, np.ndarray) else values
        total = sum(int(p.size) for p in parts)
        if total:
            data.resize((start + total,))
            at = start
            for piece in _slices(parts, WRITE_SLICE):
                _write_rows(data, at, np.asarray(piece, dtype=data.dtype))
                at += piece.size
        return start

    def set_attr(self, key: str, value: Any) -> None:
        """Scalars are stored as they are, anything else as a JSON string."""
        plain = isinstance(value, (str, int, float, bool)) and not isinstance(value, np.generic)
        self._file.attrs[key] = value if plain else json.dumps(value)

    def close(self) -> None:
        """Mark the trace complete and close it; calling twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._datasets, self._records = {}, {}
        self._file.attrs["complete"] = True
        close_or_discard(self._file)  # never leave HDF5 retrying a failed flush at interpreter exit


def _append_rows(data: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """Grow ``data`` (rows from ``start`` on) to hold ``values`` and write them there."""
    data.id.set_extent((start + values.shape[0], *data.shape[1:]))
    _write_rows(data, start, values)


def _write_rows(data: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """``data[start:start + len(values)] = values`` through h5py's low-level calls.

    The high-level assignment parses a selection and checks shapes in Python, ~0.1 ms
    a call; a step writes ~25 columns. ``values`` must have the dataset's dtype and
    trailing shape.
    """
    values = np.ascontiguousarray(values)
    if values.shape[0] == 0:
        return
    space = data.id.get_space()
    space.select_hyperslab((start,) + (0,) * (values.ndim - 1), values.shape)
    data.id.write(h5py.h5s.create_simple(values.shape), space, values)


def _slices(parts: list[np.ndarray], size: int) -> list[np.ndarray]:
    """The parts' values, flat and in order, regrouped into arrays of about ``size`` elements."""
    out: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    pending_size = 0
    for part in parts:
        flat = part.reshape(-1)
        for lo in range(0, flat.size, size):
            piece = flat[lo : lo + size]
            pending.append(piece)
            pending_size += piece.size
            if pending_size >= size:
                out.append(pending[0] if len(pending) == 1 else np.concatenate(pending))
                pending, pending_size = [], 0
    if pending:
        out.append(pending[0] if len(pending) == 1 else np.concatenate(pending))
    return out
