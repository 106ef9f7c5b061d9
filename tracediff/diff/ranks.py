"""Which rank it is, for a finding on a merged trace (docs/distributed.md): the ranks of a mismatch, or the shards."""

from __future__ import annotations

import math

import numpy as np

from tracediff.diff.finding import LayerRow, ShardSplit
from tracediff.diff.table import RecordTable


def rank_mismatches(row: LayerRow, table: RecordTable) -> tuple[tuple[str, str], ...]:
    """``(side, which ranks disagree)`` for each side whose replicated record differs across its ranks."""
    sides = (("port", table.port, row.port_record), ("upstream", table.upstream, row.upstream_record))
    return tuple(
        (name, trace.ranks.describe_mismatch(record))
        for name, trace, record in sides
        if trace.ranks is not None and trace.ranks.describe_mismatch(record)
    )


def shard_split(row: LayerRow, table: RecordTable) -> ShardSplit | None:
    """How the record splits over ranks (port side first), each shard's rel L2 error when both hold it whole."""
    sides = (("port", table.port, row.port_record), ("upstream", table.upstream, row.upstream_record))
    for name, trace, record in sides:
        layout = trace.ranks
        if layout is None or int(layout.shard_dim[record]) < 0:
            continue
        shape = trace.records.shape_of(record)
        slices = layout.shard_slices(record, shape)
        ranks, dim = tuple(rank for rank, _ in slices), int(layout.shard_dim[record])
        other, other_record = (table.upstream, row.upstream_record) if name == "port" else (
            table.port, row.port_record
        )
        mine, theirs = trace.full(record), other.full(other_record)
        if mine is None or theirs is None or mine.shape != theirs.shape:
            return ShardSplit(name, ranks, dim, None)
        errors = []
        for _, index in slices:
            a, b = np.asarray(mine[index], np.float64), np.asarray(theirs[index], np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                ref = float(np.sqrt(np.sum(b * b)))
                err = float(np.sqrt(np.sum((a - b) ** 2)))
                errors.append(err / ref if ref > 0 else (0.0 if err == 0 else math.inf))
        return ShardSplit(name, ranks, dim, tuple(errors))
    return None
