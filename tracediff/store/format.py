"""Names and version of the HDF5 trace format (documented in docs/trace-format.md).

Writer and reader both take the layout from here, so the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np

ENCODING_TYPE = "tracediff-trace"
FORMAT_VERSION = 1
MAX_DIMS = 8

#: Record columns, in the order documented, with their on-disk dtype.
RECORD_COLUMNS: dict[str, np.dtype] = {
    "seq": np.dtype("i8"),
    "step": np.dtype("i4"),
    "module": np.dtype("i4"),
    "call": np.dtype("i4"),
    "label": np.dtype("i4"),
    "dtype": np.dtype("i2"),
    "ndim": np.dtype("i1"),
    "numel": np.dtype("i8"),
    "sum": np.dtype("f8"),
    "abs_sum": np.dtype("f8"),
    "sumsq": np.dtype("f8"),
    "min": np.dtype("f8"),
    "max": np.dtype("f8"),
    "nan_count": np.dtype("i8"),
    "inf_count": np.dtype("i8"),
    "sample_offset": np.dtype("i8"),
    "sample_len": np.dtype("i4"),
    "full_offset": np.dtype("i8"),
    "full_len": np.dtype("i8"),
    "full_kind": np.dtype("i1"),
}
#: ``shape`` is stored separately as an ``(N, MAX_DIMS)`` int64 array padded with -1.
SHAPE_COLUMN = "shape"

#: ``full_kind`` values: where a record's full tensor lives.
FULL_NONE, FULL_F32, FULL_F64 = 0, 1, 2

RECORD_CHUNK = 1024
VALUE_CHUNK = 1 << 14
#: Chunk of the ``full`` value tables: large, since a full trace appends gigabytes per step and HDF5
#: appends large chunks faster than small ones (docs/benchmarks.md).
FULL_CHUNK = 1 << 18
