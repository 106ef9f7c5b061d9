"""Cross-checks of a trace's tables, so a damaged file is refused when opened, not half-way through a diff.

Every index a record holds must point inside its table, every slice it names
(sample, full tensor) must lie inside the committed part of that table, and a
full tensor's length must match the record's shape. A file that breaks any of
these was damaged after it was written (or by a writer bug): the reader says
so by name instead of handing out records that crash or mislead later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tracediff.errors import TraceFormatError
from tracediff.store.format import FULL_NONE, MAX_DIMS


def check_records(
    path: Path,
    columns: Mapping[str, np.ndarray],
    shape: np.ndarray,
    *,
    tables: Mapping[str, int],
    full_tables: Mapping[int, int],
) -> None:
    """Refuse records that point outside their tables.

    Args:
        path: the trace, for messages.
        columns: the record columns (``docs/trace-format.md``), already cut to the committed count.
        shape: the ``(N, MAX_DIMS)`` shape column.
        tables: committed lengths of ``labels``, ``dtypes``, ``modules`` and ``samples``.
        full_tables: committed length of each full-tensor table, by ``full_kind``.

    Raises:
        TraceFormatError: naming the first record that points outside, and how.
    """
    if not len(shape):
        return
    for column, table in (("label", "labels"), ("dtype", "dtypes"), ("module", "modules")):
        _in_range(path, columns[column], 0, tables[table] - 1, f"its {column} index", table)
    ndim = columns["ndim"].astype(np.int64)
    _in_range(path, ndim, 0, 64, "its number of dimensions", "what torch allows")
    sample_len = columns["sample_len"].astype(np.int64)
    has_sample = sample_len > 0
    if has_sample.any():
        start = columns["sample_offset"].astype(np.int64)
        _in_range(path, np.where(has_sample, start, 0), 0, tables["samples"], "its sample offset", "samples")
        _in_range(path, np.where(has_sample, start + sample_len, 0), 0, tables["samples"], "its sample", "samples")
    kind = columns["full_kind"].astype(np.int64)
    _in_range(path, kind, FULL_NONE, max(full_tables), "its full-tensor kind", "known kinds")
    has_full = kind != FULL_NONE
    if not has_full.any():
        return
    start = columns["full_offset"].astype(np.int64)
    length = columns["full_len"].astype(np.int64)
    for which, table_length in full_tables.items():
        rows = kind == which
        _in_range(path, np.where(rows, start, 0), 0, table_length, "its full-tensor offset", f"full table {which}")
        _in_range(path, np.where(rows, start + length, 0), 0, table_length, "its full tensor", f"full table {which}")
    for row in np.flatnonzero(has_full & (ndim <= MAX_DIMS)):
        dims = shape[row, : int(ndim[row])]
        if (dims < 0).any() or math.prod(int(d) for d in dims) != int(length[row]):
            raise TraceFormatError(
                f"{path}: damaged trace: record {row} holds a full tensor of {int(length[row])} values "
                f"for shape {tuple(int(d) for d in dims)}"
            )


def _in_range(path: Path, values: np.ndarray, low: int, high: int, what: str, table: str) -> None:
    bad = np.flatnonzero((values < low) | (values > high))
    if len(bad):
        row = int(bad[0])
        raise TraceFormatError(
            f"{path}: damaged trace: record {row} has {what} {int(values[row])} outside {table} ({low}..{high})"
        )
