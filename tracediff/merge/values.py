"""The merged records' element values: samples and full tensors, laid out in merged record order.

A replicated record copies its base rank's values. A sharded record's full tensor is the concatenation of its
shards; its sample is recomputed from that tensor at the recorder's positions, and dropped (and counted) when a
rank kept no full tensor, since the positions of the unsharded sample are in no shard's sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tracediff.merge.grouping import Groups
from tracediff.store.format import FULL_F32, FULL_F64, FULL_NONE
from tracediff.store.trace import Trace

#: The recorder's sample size when a trace's config does not say.
_DEFAULT_SAMPLE_SIZE = 256


class ValueCache:
    """A rank's sample and full-tensor tables, read from the file once."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self._full: dict[int, np.ndarray] = {}
        self._samples: np.ndarray | None = None

    def samples(self) -> np.ndarray:
        if self._samples is None:
            raw = self.trace.samples
            self._samples = np.asarray(raw[:] if raw is not None else np.zeros(0), dtype=np.float64)
        return self._samples

    def full(self, kind: int) -> np.ndarray:
        if kind not in self._full:
            raw = self.trace.full_values.get(kind)
            self._full[kind] = np.asarray(raw[:]) if raw is not None else np.zeros(0)
        return self._full[kind]


@dataclass
class MergedValues:
    """The element tables of the merged trace and the record columns that point into them."""

    samples: np.ndarray
    full_values: dict[int, np.ndarray]
    columns: dict[str, np.ndarray]  # full_kind, full_len, full_offset, sample_len, sample_offset
    samples_dropped: int


def merge_values(groups: Groups, dim: np.ndarray, numel: np.ndarray) -> MergedValues:
    """Samples and full tensors of the merged records; ``numel``: each merged record's element count."""
    n = groups.n
    rows = np.arange(n)
    base = groups.base_col
    traces = groups.traces
    sharded = dim >= 0
    full_kind = groups.column("full_kind", FULL_NONE, np.int64)
    full_len = groups.column("full_len", 0, np.int64)
    sample_len = groups.column("sample_len", 0, np.int64)
    all_full = np.all(~groups.present | (full_kind != FULL_NONE), axis=1) & sharded
    any_sample = np.any(groups.present & (sample_len > 0), axis=1)
    out_kind = np.where(sharded, FULL_NONE, full_kind[rows, base])
    shard_kind = np.where(np.any(groups.present & (full_kind == FULL_F64), axis=1), FULL_F64, FULL_F32)
    out_kind[all_full] = shard_kind[all_full]
    out_full_len = np.where(sharded, np.where(all_full, numel, 0), full_len[rows, base])
    out_sample_len = np.where(sharded, 0, sample_len[rows, base])
    size = _sample_size(traces[0])
    recompute = sharded & all_full & any_sample
    out_sample_len[recompute] = np.minimum(numel[recompute], size)
    dropped = int(np.count_nonzero(sharded & any_sample & ~all_full))

    cache = [ValueCache(trace) for trace in traces]
    full_values: dict[int, np.ndarray] = {}
    full_offset = np.full(n, -1, dtype=np.int64)
    merged_full: dict[int, np.ndarray] = {}
    for kind, dtype in ((FULL_F32, np.float32), (FULL_F64, np.float64)):
        mine = out_kind == kind
        lens = np.where(mine, out_full_len, 0)
        offsets = np.concatenate(([0], np.cumsum(lens)[:-1])) if n else np.zeros(0, np.int64)
        full_offset[mine] = offsets[mine]
        values = np.zeros(int(lens.sum()), dtype=dtype)
        copy = mine & ~sharded
        for c in range(len(traces)):
            sel = np.flatnonzero(copy & (base == c))
            if len(sel):
                src_rows = groups.idx[sel, c]
                scatter(values, offsets[sel], cache[c].full(kind), traces[c].records.columns["full_offset"][src_rows],
                        lens[sel])
        for g in np.flatnonzero(mine & sharded):
            tensor = _concat_full(groups, int(g), int(dim[g]), cache)
            values[offsets[g] : offsets[g] + tensor.size] = tensor.reshape(-1)
            merged_full[int(g)] = tensor
        full_values[kind] = values

    sample_offset = np.full(n, -1, dtype=np.int64)
    lens = out_sample_len
    offsets = np.concatenate(([0], np.cumsum(lens)[:-1])) if n else np.zeros(0, np.int64)
    sample_offset[lens > 0] = offsets[lens > 0]
    samples = np.zeros(int(lens.sum()), dtype=np.float64)
    for c in range(len(traces)):
        sel = np.flatnonzero(~sharded & (base == c) & (lens > 0))
        if len(sel):
            src_rows = groups.idx[sel, c]
            scatter(samples, offsets[sel], cache[c].samples(), traces[c].records.columns["sample_offset"][src_rows],
                    lens[sel])
    for g in np.flatnonzero(recompute):
        flat = merged_full[int(g)].reshape(-1).astype(np.float64)
        positions = _sample_positions(flat.size, size)
        samples[offsets[g] : offsets[g] + len(positions)] = flat[positions]
    columns = {
        "full_kind": out_kind,
        "full_len": out_full_len,
        "full_offset": full_offset,
        "sample_len": out_sample_len,
        "sample_offset": sample_offset,
    }
    return MergedValues(samples, full_values, columns, dropped)


def scatter(dest: np.ndarray, dest_off: np.ndarray, src: Any, src_off: np.ndarray, lens: np.ndarray) -> None:
    """Copy many segments at once: ``dest[dest_off[i]:+lens[i]] = src[src_off[i]:+lens[i]]``."""
    lens = lens.astype(np.int64)
    total = int(lens.sum())
    if not total:
        return
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    within = np.arange(total) - np.repeat(starts, lens)
    dest[np.repeat(dest_off, lens) + within] = np.asarray(src)[np.repeat(src_off, lens) + within]


def _concat_full(groups: Groups, g: int, dim: int, cache: list[ValueCache]) -> np.ndarray:
    parts = []
    for c, trace in enumerate(groups.traces):
        if not groups.present[g, c]:
            continue
        row = int(groups.idx[g, c])
        cols = trace.records.columns
        kind, offset = int(cols["full_kind"][row]), int(cols["full_offset"][row])
        length = int(cols["full_len"][row])
        flat = cache[c].full(kind)[offset : offset + length]
        parts.append(np.asarray(flat).reshape(trace.records.shape_of(row)))
    wide = np.float64 if any(p.dtype == np.float64 for p in parts) else np.float32
    return np.concatenate([p.astype(wide, copy=False) for p in parts], axis=dim)


def _sample_size(trace: Trace) -> int:
    size = trace.config.get("sample_size")
    return int(size) if isinstance(size, int) and size > 0 else _DEFAULT_SAMPLE_SIZE


def _sample_positions(numel: int, size: int) -> np.ndarray:
    """The recorder's sample positions (:func:`tracediff.hooks.stats.sample_positions`) without torch."""
    if numel <= size:
        return np.arange(numel, dtype=np.int64)
    return np.arange(size, dtype=np.int64) * numel // size
