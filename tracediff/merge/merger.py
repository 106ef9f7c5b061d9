"""Merge one run's per-rank traces into an in-memory trace of the unsharded model.

The stages, each in its own module: line the records up (:mod:`~tracediff.merge.grouping`), merge the module
table (:mod:`~tracediff.merge.params`), decide sharded or replicated and combine the moments
(:mod:`~tracediff.merge.layout`), check replicated copies (:mod:`~tracediff.merge.replicas`), lay out the element
values (:mod:`~tracediff.merge.values`); this module runs them and assembles the merged :class:`Trace`.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any

import numpy as np

from tracediff.errors import MergeError
from tracediff.merge.grouping import Groups, Vocabulary, check_traces
from tracediff.merge.layout import ShardLayout, infer_layout, merge_moments
from tracediff.merge.params import MergedParams, merge_params
from tracediff.merge.replicas import check_replicas
from tracediff.merge.rules import DEFAULT_REPLICA_RTOL, NameMap, ShardDims, ShardRule, as_rules
from tracediff.merge.values import MergedValues, merge_values
from tracediff.store.format import RECORD_COLUMNS
from tracediff.store.trace import RankLayout, Records, Trace

#: Metadata of one rank that says nothing about the merged trace.
_PER_RANK_KEYS = frozenset({"rank", "pid", "local_rank", "hostname"})


def merge_traces(
    traces: Sequence[Trace],
    *,
    reference: Trace | None = None,
    name_map: NameMap | None = None,
    shard_dims: ShardDims | Sequence[ShardRule] = None,
    replica_rtol: float = DEFAULT_REPLICA_RTOL,
    path: str | None = None,
) -> Trace:
    """Merge one run's per-rank traces into an in-memory trace of the unsharded model.

    Args:
        traces: the ranks' traces (any order; each carries ``rank``/``world_size`` metadata).
        reference: the unsharded side's trace, used to tell sharded from replicated
            records whose shapes are equal on every rank.
        name_map: this run's module name -> the reference's (default: the same name).
        shard_dims: declarations that win over inference, see :func:`~tracediff.merge.parse_shard_dims`.
        replica_rtol: relative difference above which replicated copies mismatch.
        path: what the merged trace calls its source (default: the ranks' paths).

    Returns:
        A :class:`~tracediff.store.trace.Trace` whose ``ranks`` describes the merge; nothing to close.

    Raises:
        MergeError: the traces are not one run's per-rank traces of one side, or a
            declaration does not fit a record's shape.
    """
    if not (isinstance(replica_rtol, (int, float)) and 0 <= replica_rtol < float("inf")):
        raise MergeError(f"replica_rtol={replica_rtol!r} must be a number >= 0 (default {DEFAULT_REPLICA_RTOL:g})")
    ordered = check_traces(traces)
    rules = as_rules(shard_dims)
    ranks = [int(t.meta["rank"]) for t in ordered]
    world = int(ordered[0].meta["world_size"])
    vocabulary = Vocabulary.build(ordered)
    params = merge_params(ordered, vocabulary, reference=reference, name_map=name_map, world=world, rtol=replica_rtol)
    groups = Groups.build(ordered, vocabulary)
    layout = infer_layout(groups, vocabulary, reference=reference, name_map=name_map, rules=rules, world=world)
    moments = merge_moments(groups, layout.dim)
    dtypes = groups.merged_dtypes(vocabulary)
    mismatch = check_replicas(groups, layout, dtypes, ranks=ranks, replica_rtol=replica_rtol)
    values = merge_values(groups, layout.dim, moments["numel"])
    columns = _record_columns(groups, layout, dtypes, moments, values)
    rank_layout = RankLayout(
        ranks=list(ranks),
        world_size=world,
        shard_dim=layout.dim.astype(np.int8),
        shard_sizes=layout.sizes,
        base_rank=np.asarray(ranks, dtype=np.int32)[groups.base_col] if groups.n else np.zeros(0, np.int32),
        mismatch_record=mismatch["record"],
        mismatch_rank=mismatch["rank"].astype(np.int32),
        mismatch_check=mismatch["check"].astype(np.int8),
        mismatch_value=mismatch["value"],
    )
    return Trace(
        path=path or " + ".join(t.path for t in ordered),
        meta=_meta(ordered, groups, layout, rank_layout, params, values, rules, replica_rtol),
        config=dict(ordered[0].config),
        modules=params.modules,
        records=Records(columns=columns, shape=layout.merged_shape, labels=vocabulary.labels,
                        dtypes=vocabulary.dtypes),
        complete=all(t.complete for t in ordered),
        samples=values.samples,
        full_values=values.full_values,
        ranks=rank_layout,
    )


def _record_columns(groups: Groups, layout: ShardLayout, dtypes: np.ndarray, moments: dict[str, np.ndarray],
                    values: MergedValues) -> dict[str, np.ndarray]:
    n = groups.n
    columns: dict[str, np.ndarray] = {}
    columns["seq"] = np.arange(n, dtype=np.int64)
    columns["module"] = groups.keys[:, 0]
    columns["step"] = groups.keys[:, 1]
    columns["call"] = groups.keys[:, 2]
    columns["label"] = groups.keys[:, 3]
    columns["dtype"] = dtypes[np.arange(n), groups.base_col] if n else np.zeros(0)
    columns["ndim"] = layout.merged_ndim
    columns.update(moments)
    columns.update(values.columns)
    return {name: np.asarray(columns[name]).astype(dtype) for name, dtype in RECORD_COLUMNS.items()}


def _meta(traces: list[Trace], groups: Groups, layout: ShardLayout, rank_layout: RankLayout, params: MergedParams,
          values: MergedValues, rules: list[ShardRule], replica_rtol: float) -> dict[str, Any]:
    """The lowest rank's metadata without its per-rank keys, plus what the merge did (``meta["merge"]``)."""
    meta = {k: v for k, v in traces[0].meta.items() if k not in _PER_RANK_KEYS}
    ranks = [int(t.meta["rank"]) for t in traces]
    world = int(traces[0].meta["world_size"])
    sharded = layout.dim >= 0
    on_ranks = groups.present.sum(axis=1)
    failures: dict[str, str] = {}
    for trace in traces:
        for module, error in dict(trace.meta.get("failures") or {}).items():
            failures.setdefault(module, f"rank {trace.meta['rank']}: {error}")
    meta.update(
        {
            "world_size": world,
            "merged_ranks": ranks,
            "merged_from": [
                {"rank": int(t.meta["rank"]), "path": t.path, "pid": t.meta.get("pid")} for t in traces
            ],
            "merged_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "has_moments": all(bool(t.meta.get("has_moments", False)) for t in traces),
            "failures": failures,
            "merge": {
                "records": int(groups.n),
                "sharded": int(np.count_nonzero(sharded)),
                "replicated": int(np.count_nonzero(~sharded & (on_ranks > 1))),
                "single_rank": int(np.count_nonzero(on_ranks == 1)),
                "assumed_replicated": int(np.count_nonzero(layout.assumed & ~sharded)),
                "rank_mismatches": int(len(np.unique(rank_layout.mismatch_record))),
                "samples_dropped": values.samples_dropped,
                "missing_ranks": sorted(set(range(world)) - set(ranks)),
                "declared": [rule.text for rule in rules],
                "replica_rtol": replica_rtol,
                "params_sharded": params.sharded,
                "params_unresolved": params.unresolved,
            },
        }
    )
    return meta
