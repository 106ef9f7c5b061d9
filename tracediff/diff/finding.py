"""What a diff reports: one compared record pair (:class:`LayerRow`) and one finding at a record (:class:`Finding`).

Both hold data only; the line a finding shows (:attr:`Finding.message`) is worded by :mod:`tracediff.vocabulary`
from that data, and both turn into JSON through :func:`tracediff.results.json_ready`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from tracediff.results import json_ready
from tracediff.vocabulary import (
    batch_note,
    drift_message,
    dtype_message,
    metric_name,
    missing_message,
    nonfinite_message,
    rank_mismatch_message,
    shape_message,
    shard_note,
)

#: Finding kinds; at the same record the earlier kind is reported first.
KINDS: tuple[str, ...] = (
    "missing_in_port",
    "missing_in_upstream",
    "shape_mismatch",
    "dtype_mismatch",
    "nonfinite",
    "rank_mismatch",
    "drift",
)
#: Kinds that make a diff fail unless the caller says otherwise. A dtype mismatch is
#: usually deliberate (a bf16 port against an fp32 reference) and a record on one side
#: only is usually a structural difference whose numerical effect shows up as drift
#: at the next aligned record; both are reported, neither fails by default.
DEFAULT_FAIL_ON: frozenset[str] = frozenset({"drift", "shape_mismatch", "nonfinite", "rank_mismatch"})
#: What a finding's JSON holds, in order (``tensor`` is its label).
FINDING_JSON_KEYS: tuple[str, ...] = (
    "kind", "fatal", "step", "call", "tensor", "port", "upstream", "culprit", "culprit_upstream", "suspects",
    "before_call", "blame", "message", "metric", "value", "limit", "port_record", "upstream_record",
)


@dataclass(frozen=True)
class LayerRow:
    """One compared record pair: a point of the drift curve.

    Attributes:
        index: position among the compared records of its step, in port execution order.
        step, call, label: the record key.
        port, upstream: module names on each side.
        drift: relative L2 error with elements, else the largest relative stat drift.
        ratio: largest ``value / limit`` over the checks that applied; > 1 fails.
        check: the check that set ``ratio``: ``elements``, ``abs_mean_limit``, or a stat name.
        value, limit: that check's measured value and the limit it was held to.
        failed: ``ratio > 1``.
        elements: ``"full"``, ``"sample"`` or ``""`` (stats only).
        max_abs_err, rel_l2, cosine, sqnr_db: element metrics (NaN without elements).
        stat_drift: relative drift of each stat both sides hold.
        port_shape, upstream_shape, port_dtype, upstream_dtype: as recorded.
        port_record, upstream_record: record indices into each trace.
    """

    index: int
    step: int
    call: int
    label: str
    port: str
    upstream: str
    drift: float
    ratio: float
    check: str
    value: float
    limit: float
    failed: bool
    elements: str
    max_abs_err: float
    rel_l2: float
    cosine: float
    sqnr_db: float
    stat_drift: dict[str, float]
    port_shape: tuple[int, ...] | None
    upstream_shape: tuple[int, ...] | None
    port_dtype: str
    upstream_dtype: str
    port_record: int
    upstream_record: int

    @property
    def checked(self) -> bool:
        return not math.isnan(self.ratio)

    @property
    def metric(self) -> str:
        """Human name of the deciding check's value, for headlines (:func:`tracediff.vocabulary.metric_name`)."""
        return metric_name(self.check)


    def to_json(self) -> dict[str, Any]:
        """The row as JSON: its fields, the label as ``tensor``, without the record indices (local to this diff)."""
        return json_ready({
            ("tensor" if item.name == "label" else item.name): getattr(self, item.name)
            for item in fields(self)
            if item.name not in ("port_record", "upstream_record")
        })


@dataclass(frozen=True)
class ShardSplit:
    """How a drifting record of a merged trace is sharded over ranks.

    Attributes:
        side: ``port`` or ``upstream``, the side whose record is sharded.
        ranks: the ranks holding a shard, in order.
        dim: the dimension it is sharded along.
        errors: each shard's relative L2 error, per rank in ``ranks``; ``None`` when a side lacks the full tensor.
    """

    side: str
    ranks: tuple[int, ...]
    dim: int
    errors: tuple[float, ...] | None


@dataclass(frozen=True)
class Finding:
    """Something worth reporting at one record, in port execution order.

    Attributes:
        kind: see :data:`KINDS`.
        step, call, label: the record key.
        port, upstream: module names (``None`` on the side that lacks the record's module).
        fatal: whether this kind fails the diff (see ``fail_on``).
        row: the compared record pair, for kinds found on a matched record.
        port_record, upstream_record: record indices, ``None`` on the missing side.
    """

    kind: str
    step: int
    call: int
    label: str
    port: str | None
    upstream: str | None
    fatal: bool
    row: LayerRow | None = None
    port_record: int | None = None
    upstream_record: int | None = None
    #: place in the port's execution order (an upstream-only record sits between two port records)
    position: float = math.nan
    #: the port module whose code made the difference: ``port`` itself, or, when the record is
    #: an input of ``port`` that already differs, the module that called it (see :func:`caller_of`)
    culprit: str | None = None
    #: ``culprit``'s upstream counterpart, found the same way on the upstream side
    culprit_upstream: str | None = None
    #: port modules that may hold the error, most likely first (``culprit`` leads)
    suspects: tuple[str, ...] = ()
    #: why ``culprit`` is blamed: ``own`` (the record's module), ``caller`` (the record is an input
    #: that already differs: the module that called it), ``unaligned`` (a module with no counterpart
    #: ran after the last good record), ``suspect`` (a module the aligner could not pair because its
    #: values contradict its presumed counterpart ``culprit_upstream``, right before this record)
    blame: str = "own"
    #: ``(side that batches, number of calls)`` when one side ran the module once and the other several times
    batching: tuple[str, int] | None = None
    #: a ``nonfinite`` record's NaN and Inf counts (below zero: not recorded)
    nan_count: int = -1
    inf_count: int = -1
    #: a ``rank_mismatch``: ``(side, which ranks disagree)`` per side that holds one
    rank_mismatches: tuple[tuple[str, str], ...] = ()
    #: a ``drift`` at a sharded record of a merged trace
    shards: ShardSplit | None = None

    def __post_init__(self) -> None:
        if self.culprit is None:  # built without attribution: the record's own module
            object.__setattr__(self, "culprit", self.port)
            object.__setattr__(self, "culprit_upstream", self.upstream)

    @property
    def before_call(self) -> bool:
        """The culprit ran before the record's module: the difference was made before that module ran."""
        return self.culprit != self.port

    @property
    def metric(self) -> str:
        return self.row.metric if self.kind == "drift" and self.row is not None else self.kind

    @property
    def value(self) -> float | None:
        return self.row.value if self.kind == "drift" and self.row is not None else None

    @property
    def limit(self) -> float | None:
        return self.row.limit if self.kind == "drift" and self.row is not None else None


    @property
    def message(self) -> str:
        """One line describing it, worded by :mod:`tracediff.vocabulary`."""
        kind, row = self.kind, self.row
        if row is None:  # a record one side lacks
            return missing_message(kind, port=self.port or "", upstream=self.upstream or "", label=self.label,
                                   call=self.call) + batch_note(self.batching)
        if kind == "rank_mismatch":
            return rank_mismatch_message(self.rank_mismatches)
        if kind == "shape_mismatch":
            return shape_message(row.port_shape, row.upstream_shape) + batch_note(self.batching)
        if kind == "dtype_mismatch":
            return dtype_message(row.port_dtype, row.upstream_dtype)
        if kind == "nonfinite":
            return nonfinite_message(self.nan_count, self.inf_count)
        text = drift_message(check=row.check, value=row.value, limit=row.limit, ratio=row.ratio,
                             max_abs_err=row.max_abs_err, rel_l2=row.rel_l2)
        if row.port_shape != row.upstream_shape:  # compared as a broadcast: perhaps calls batched on one side only
            text += batch_note(self.batching)
        if self.shards is not None:
            shards = self.shards
            text += "; " + shard_note(shards.side, shards.ranks, shards.dim, shards.errors)
        return text

    def to_json(self) -> dict[str, Any]:
        """The finding as JSON (:data:`FINDING_JSON_KEYS`), its message included."""
        return json_ready({key: getattr(self, "label" if key == "tensor" else key) for key in FINDING_JSON_KEYS})
