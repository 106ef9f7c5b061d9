"""The optional ``/ranks`` group of a merged trace: how each record was combined across ranks.

A trace written by ``tracediff merge`` is an ordinary v1 trace plus this group
(documented in docs/trace-format.md and docs/distributed.md). Readers that do
not know it ignore it; :func:`read_rank_layout` turns it back into a
:class:`~tracediff.store.trace.RankLayout`.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from tracediff.errors import TraceFormatError
from tracediff.store.format import FORMAT_VERSION
from tracediff.store.trace import RankLayout

RANKS_GROUP = "ranks"
RANKS_ENCODING = "tracediff-rank-layout"
_ARRAYS = {
    "shard_dim": "i1",
    "shard_sizes": "i8",
    "base_rank": "i4",
    "mismatch_record": "i8",
    "mismatch_rank": "i4",
    "mismatch_check": "i1",
    "mismatch_value": "f8",
}


def write_rank_layout(path: Path, layout: RankLayout) -> None:
    """Add the ``/ranks`` group to a closed trace file."""
    with h5py.File(path, "a") as handle:
        group = handle.create_group(RANKS_GROUP)
        group.attrs["encoding-type"] = RANKS_ENCODING
        group.attrs["encoding-version"] = str(FORMAT_VERSION)
        group.attrs["ranks"] = json.dumps(layout.ranks)
        group.attrs["world_size"] = layout.world_size
        for name, dtype in _ARRAYS.items():
            group.create_dataset(name, data=np.asarray(getattr(layout, name), dtype=dtype))


def read_rank_layout(handle: h5py.File, count: int) -> RankLayout | None:
    """The ``/ranks`` group of an open trace holding ``count`` records, or None when absent.

    Raises:
        TraceFormatError: the group is damaged (missing arrays, lengths that do not fit).
    """
    if RANKS_GROUP not in handle:
        return None
    group = handle[RANKS_GROUP]
    where = f"{handle.filename}: damaged /ranks group"
    try:
        ranks = [int(r) for r in json.loads(group.attrs["ranks"])]
        world = int(group.attrs["world_size"])
        arrays = {name: np.asarray(group[name][()], dtype=dtype) for name, dtype in _ARRAYS.items()}
    except (KeyError, ValueError, TypeError) as exc:
        raise TraceFormatError(f"{where} ({exc})") from None
    sizes = arrays["shard_sizes"].reshape(-1, max(len(ranks), 1))
    arrays["shard_sizes"] = sizes
    lengths = {len(arrays["mismatch_" + n]) for n in ("record", "rank", "check", "value")}
    if (
        len(arrays["shard_dim"]) < count
        or sizes.shape[0] < count
        or len(arrays["base_rank"]) < count
        or len(lengths) != 1
        or (len(arrays["mismatch_record"]) and int(arrays["mismatch_record"].max()) >= count)
    ):
        raise TraceFormatError(f"{where} (its arrays do not fit the {count} records)")
    for name in ("shard_dim", "shard_sizes", "base_rank"):
        arrays[name] = arrays[name][:count]
    return RankLayout(ranks=ranks, world_size=world, **arrays)
