"""Line the per-rank traces up: one vocabulary of names, and one group per (module, step, call, tensor).

Every later stage of a merge works on the ``(groups, ranks)`` arrays built here, vectorised over records, instead
of looping over the records of each rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracediff.errors import MergeError
from tracediff.store.trace import Trace


def check_traces(traces: Sequence[Trace]) -> list[Trace]:
    """The traces in rank order, once they are shown to be one run's per-rank traces of one side.

    Raises:
        MergeError: nothing given, a JSONL or already merged trace, no rank metadata, mixed runs or sides.
    """
    if not traces:
        raise MergeError("nothing to merge: no per-rank trace given")
    for trace in traces:
        if trace.records.direct:
            raise MergeError(
                f"{trace.path}: a FastVideo JSONL trace holds derived stats, not the mergeable moments a merge "
                "needs; trace each rank with tracediff.attach"
            )
        if trace.ranks is not None or "merged_ranks" in trace.meta:
            raise MergeError(f"{trace.path}: already a merged trace; merge the per-rank traces it came from")
        if not isinstance(trace.meta.get("rank"), int) or not isinstance(trace.meta.get("world_size"), int):
            raise MergeError(f"{trace.path}: no rank/world_size metadata, not a per-rank trace")
    ordered = sorted(traces, key=lambda t: t.meta["rank"])
    worlds = sorted({int(t.meta["world_size"]) for t in ordered})
    if len(worlds) > 1:
        raise MergeError(f"the traces come from runs of different world sizes ({', '.join(map(str, worlds))})")
    sides = sorted({t.side for t in ordered})
    if len(sides) > 1:
        raise MergeError(f"the traces are of different sides ({', '.join(sides)}); merge one side at a time")
    by_rank: dict[int, list[str]] = {}
    for trace in ordered:
        by_rank.setdefault(int(trace.meta["rank"]), []).append(trace.path)
    twice = {rank: paths for rank, paths in by_rank.items() if len(paths) > 1}
    if twice:
        rank, paths = next(iter(twice.items()))
        raise MergeError(
            f"two traces of rank {rank} ({', '.join(paths)}): traces of several runs are mixed; "
            "pass the files (or a glob) of one run"
        )
    outside = [int(t.meta["rank"]) for t in ordered if not 0 <= int(t.meta["rank"]) < worlds[0]]
    if outside:
        raise MergeError(f"rank {outside[0]} is outside world size {worlds[0]}")
    return ordered


@dataclass
class Vocabulary:
    """The merged trace's module, label and dtype names, and each rank's index -> merged index tables."""

    names: list[str]
    classes: list[str]
    labels: list[str]
    dtypes: list[str]
    module_maps: list[np.ndarray]
    label_maps: list[np.ndarray]
    dtype_maps: list[np.ndarray]

    @classmethod
    def build(cls, traces: Sequence[Trace]) -> Vocabulary:
        base = traces[0].modules
        names, classes = list(base.names), list(base.classes)
        index = {name: i for i, name in enumerate(names)}
        module_maps = []
        for trace in traces:
            table = np.empty(len(trace.modules.names) + 1, dtype=np.int64)
            for i, (name, cls_name) in enumerate(zip(trace.modules.names, trace.modules.classes, strict=False)):
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
                    classes.append(cls_name)
                table[i] = index[name]
            table[-1] = -1  # records of an unknown module (-1) stay unknown
            module_maps.append(table)
        labels: list[str] = []
        dtypes: list[str] = []
        label_maps = [_extend(t.records.labels, labels) for t in traces]
        dtype_maps = [_extend(t.records.dtypes, dtypes) for t in traces]
        return cls(names, classes, labels, dtypes, module_maps, label_maps, dtype_maps)


@dataclass
class Groups:
    """``idx[g, c]``: the record of group ``g`` (one module, step, call, tensor) in rank column ``c`` (-1: none).

    Groups are in execution order: step-major, then the lowest rank's sequence number. ``base_col`` is, per
    group, the lowest rank that holds it: a replicated record carries that rank's values.
    """

    traces: list[Trace]
    keys: np.ndarray  # (G, 4): merged module, step, call, merged label
    idx: np.ndarray  # (G, C)
    present: np.ndarray  # (G, C)
    base_col: np.ndarray  # (G,)

    @property
    def n(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, traces: list[Trace], vocabulary: Vocabulary) -> Groups:
        parts = []
        for c, trace in enumerate(traces):
            cols = trace.records.columns
            parts.append(
                np.stack(
                    [
                        vocabulary.module_maps[c][cols["module"]] if len(trace.records) else np.zeros(0, np.int64),
                        cols["step"].astype(np.int64),
                        cols["call"].astype(np.int64),
                        vocabulary.label_maps[c][cols["label"]] if len(trace.records) else np.zeros(0, np.int64),
                        np.full(len(trace.records), c, dtype=np.int64),
                        np.arange(len(trace.records), dtype=np.int64),
                    ],
                    axis=1,
                )
            )
        rows = np.concatenate(parts) if parts else np.zeros((0, 6), np.int64)
        keys, inverse = np.unique(rows[:, :4], axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        n_groups, n_cols = len(keys), len(traces)
        idx = np.full((n_groups, n_cols), -1, dtype=np.int64)
        # Assign in reverse so that a key repeated within one rank keeps its first record.
        idx[inverse[::-1], rows[::-1, 4]] = rows[::-1, 5]
        present = idx >= 0
        first_col = np.argmax(present, axis=1)
        first_seq = np.zeros(n_groups, dtype=np.int64)
        for c, trace in enumerate(traces):
            sel = first_col == c
            first_seq[sel] = trace.records.columns["seq"][idx[sel, c]]
        order = np.lexsort((np.arange(n_groups), first_col, first_seq, keys[:, 1]))
        return cls(traces, keys[order], idx[order], present[order], first_col[order])

    def column(self, name: str, fill: float = np.nan, dtype: Any = np.float64) -> np.ndarray:
        """``(G, C)`` array of one record column, ``fill`` where a rank lacks the record."""
        out = np.full(self.idx.shape, fill, dtype=dtype)
        for c, trace in enumerate(self.traces):
            sel = self.present[:, c]
            out[sel, c] = trace.records.columns[name][self.idx[sel, c]]
        return out

    def merged_dtypes(self, vocabulary: Vocabulary) -> np.ndarray:
        """``(G, C)`` dtype of each record as an index into the merged vocabulary (-1 where absent)."""
        out = self.column("dtype", -1, np.int64)
        for c in range(len(self.traces)):
            sel = self.present[:, c]
            out[sel, c] = vocabulary.dtype_maps[c][out[sel, c]]
        return out


def _extend(local: list[str], merged: list[str]) -> np.ndarray:
    """Each of ``local``'s names as an index into ``merged``, appending the names ``merged`` lacks."""
    index = {name: i for i, name in enumerate(merged)}
    out = []
    for name in local:
        if name not in index:
            index[name] = len(merged)
            merged.append(name)
        out.append(index[name])
    return np.asarray(out or [0], dtype=np.int64)
