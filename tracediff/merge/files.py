"""Merge trace files: open per-rank files (named, or a folder or glob of them), merge, and write a merged file.

A merged file is the normal trace format (written by :class:`~tracediff.store.writer.TraceWriter`) plus the
``/ranks`` group (:mod:`tracediff.store.ranks`), so every reader and tool takes it as it is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

from tracediff.errors import MergeError
from tracediff.merge.merger import merge_traces
from tracediff.merge.rules import DEFAULT_REPLICA_RTOL, NameMap, ShardDims
from tracediff.merge.values import scatter
from tracediff.store.format import FULL_F32, FULL_F64, FULL_NONE, RECORD_COLUMNS
from tracediff.store.load import load_trace, open_traces, rank_trace_paths
from tracediff.store.ranks import write_rank_layout
from tracediff.store.reader import open_trace
from tracediff.store.trace import Trace
from tracediff.store.writer import StepBatch, TraceWriter

#: Root attributes the writer sets itself; the rest of a merged trace's metadata is passed on.
_ROOT_KEYS = frozenset({"encoding-type", "encoding-version", "format_version", "complete", "config"})


def load_merged(
    path: str | Path,
    *,
    skip_bad_lines: bool = False,
    like: Trace | None = None,
    shard_dims: ShardDims = None,
    name_map: NameMap | None = None,
) -> Trace:
    """Open one trace file (:func:`~tracediff.store.load.load_trace`), or merge a folder/glob of per-rank traces.

    Args:
        path: the file; or a folder, or a glob pattern, holding the per-rank traces of one distributed run.
        skip_bad_lines: JSONL only; see :func:`tracediff.store.jsonl.read_jsonl`.
        like: per-rank traces only: the unsharded side's trace, to tell sharded from
            replicated records of equal per-rank shapes.
        shard_dims: per-rank traces only: ``{module regex: dim or "replicated"}`` declarations.
        name_map: per-rank traces only: this side's module name -> ``like``'s.

    Returns:
        The trace; close it when done (a no-op for JSONL and merged traces, which are read whole).

    Raises:
        TraceFormatError: missing, empty, a folder without traces, a pattern matching nothing, or neither format.
        MergeError: the folder's traces are not the per-rank traces of one run.
    """
    paths = rank_trace_paths(path)
    if paths is None:
        return load_trace(path, skip_bad_lines=skip_bad_lines)
    if len(paths) == 1:
        return load_trace(paths[0], skip_bad_lines=skip_bad_lines)
    return merge_paths(paths, reference=like, shard_dims=shard_dims, name_map=name_map, path=str(path))


def merge_paths(
    paths: Sequence[Path],
    *,
    reference: Trace | None = None,
    shard_dims: ShardDims = None,
    name_map: NameMap | None = None,
    map_names: Callable[[Trace], NameMap | None] | None = None,
    path: str | None = None,
) -> Trace:
    """Open every per-rank trace file, merge them (:func:`merge_traces`), close them again.

    ``map_names``: given the first rank's trace, the ``name_map`` to use (when the map depends on the ranks'
    own module names, as an alignment against ``reference`` does); it replaces ``name_map``.
    """
    traces = open_traces(paths)
    try:
        if map_names is not None:
            name_map = map_names(traces[0])
        return merge_traces(traces, reference=reference, name_map=name_map, shard_dims=shard_dims, path=path)
    finally:
        for trace in traces:
            trace.close()


def merge_files(
    paths: Sequence[str | Path],
    output: str | Path,
    *,
    reference: str | Path | None = None,
    shard_dims: ShardDims = None,
    replica_rtol: float = DEFAULT_REPLICA_RTOL,
) -> Trace:
    """Merge per-rank trace files into one trace file (the normal format plus ``/ranks``).

    Returns:
        The merged in-memory trace (its ``meta["merge"]`` summarises what was done).
    """
    opened: list[Trace] = []
    try:
        for item in paths:
            opened.append(open_trace(item))
        ref = open_trace(reference) if reference is not None else None
        try:
            merged = merge_traces(opened, reference=ref, shard_dims=shard_dims, replica_rtol=replica_rtol)
        finally:
            if ref is not None:
                ref.close()
    finally:
        for trace in opened:
            trace.close()
    write_trace(merged, output)
    merged.path = str(output)
    return merged


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write an in-memory trace (a merged one) in the normal trace format, plus ``/ranks``.

    The file is written next to ``path`` under a temporary name and renamed
    into place once complete, so a reader never sees a half-written merge.

    Raises:
        MergeError: the output cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    attrs = {k: v for k, v in trace.meta.items() if k not in _ROOT_KEYS}
    attrs["config"] = trace.config
    try:
        writer = TraceWriter(tmp, attrs=attrs, module_table=trace.modules)
        try:
            for step, rows in _step_runs(trace):
                writer.write_step(step, _batch(trace, rows))
        finally:
            writer.close()
        with h5py.File(tmp, "a") as handle:  # the writer marks every closed file complete; a merge inherits
            handle.attrs["complete"] = bool(trace.complete)
        if trace.ranks is not None:
            write_rank_layout(tmp, trace.ranks)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise MergeError(f"{path}: cannot write the merged trace ({exc.strerror or exc})") from None
    return path


def _step_runs(trace: Trace) -> list[tuple[int, np.ndarray]]:
    """Contiguous runs of records of one step, in record order (the writer commits step by step)."""
    steps = trace.records.columns["step"]
    if not len(steps):
        return []
    cuts = np.flatnonzero(np.diff(steps)) + 1
    return [(int(steps[run[0]]), run) for run in np.split(np.arange(len(steps)), cuts)]


def _batch(trace: Trace, rows: np.ndarray) -> StepBatch:
    """The records ``rows`` as one writer batch, their element values repacked with batch-relative offsets."""
    cols = trace.records.columns
    columns = {name: np.asarray(cols[name][rows]) for name in RECORD_COLUMNS}
    samples = None
    lens = columns["sample_len"].astype(np.int64)
    if lens.sum():
        samples = np.zeros(int(lens.sum()))
        offsets = np.concatenate(([0], np.cumsum(lens)[:-1]))
        scatter(samples, offsets, np.asarray(trace.samples), columns["sample_offset"], lens)
        columns["sample_offset"] = np.where(lens > 0, offsets, -1)
    full: dict[int, np.ndarray | None] = {FULL_F32: None, FULL_F64: None}
    new_offset = np.where(columns["full_kind"] == FULL_NONE, -1, 0).astype(np.int64)
    for kind, dtype in ((FULL_F32, np.float32), (FULL_F64, np.float64)):
        mine = columns["full_kind"] == kind
        flens = np.where(mine, columns["full_len"], 0).astype(np.int64)
        if not flens.sum():
            continue
        values = np.zeros(int(flens.sum()), dtype=dtype)
        offsets = np.concatenate(([0], np.cumsum(flens)[:-1]))
        scatter(values, offsets[mine], np.asarray(trace.full_values[kind]), columns["full_offset"][mine], flens[mine])
        new_offset[mine] = offsets[mine]
        full[kind] = values
    columns["full_offset"] = new_offset
    return StepBatch(
        columns=columns,
        shape=trace.records.shape[rows],
        labels=[trace.records.labels[i] for i in columns["label"]],
        dtypes=[trace.records.dtypes[i] for i in columns["dtype"]],
        samples=samples,
        full_f32=full[FULL_F32],
        full_f64=full[FULL_F64],
    )
