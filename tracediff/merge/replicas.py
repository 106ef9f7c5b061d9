"""Check every rank's copy of a replicated record against the lowest rank's: a copy that differs is a finding.

Each copy is scored on every check of :data:`~tracediff.store.trace.MISMATCH_CHECKS` (shape, dtype, non-finite
counts, moments, sample and full values) as a relative difference; the worst check above ``replica_rtol`` is
what the merged trace records as a rank mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracediff.merge.grouping import Groups
from tracediff.merge.layout import ShardLayout
from tracediff.merge.values import ValueCache
from tracediff.store.format import FULL_F32, FULL_F64, FULL_NONE
from tracediff.store.trace import MISMATCH_CHECKS

_TINY = 1e-300
_CHECK = {name: i for i, name in enumerate(MISMATCH_CHECKS)}
_MOMENT_CHECKS = ("sum", "abs_sum", "sumsq", "min", "max")


def check_replicas(groups: Groups, layout: ShardLayout, dtypes: np.ndarray, *, ranks: list[int],
                   replica_rtol: float) -> dict[str, np.ndarray]:
    """The rank mismatches: ``record``, ``rank``, ``check`` (index into MISMATCH_CHECKS) and ``value`` arrays.

    ``dtypes``: each record's dtype in the merged vocabulary (:meth:`Groups.merged_dtypes`).
    """
    n, n_cols = groups.idx.shape
    rows = np.arange(n)
    base = groups.base_col
    replicated = layout.dim < 0
    dtype = np.where(groups.present, dtypes, -1)
    scores = np.full((n, n_cols, len(MISMATCH_CHECKS)), 0.0)
    moments = {name: groups.column(name) for name in _MOMENT_CHECKS}
    counts = {name: groups.column(name, 0, np.int64) for name in ("nan_count", "inf_count")}
    abs_sum_b = moments["abs_sum"][rows, base]
    sumsq_b = moments["sumsq"][rows, base]
    amax_b = np.fmax(np.abs(moments["min"][rows, base]), np.abs(moments["max"][rows, base]))
    scale = {"sum": abs_sum_b, "abs_sum": abs_sum_b, "sumsq": sumsq_b, "min": amax_b, "max": amax_b}
    samples = _Segments.build(groups, "sample")
    fulls = _Segments.build(groups, "full")
    for c in range(n_cols):
        other = groups.present[:, c] & (base != c) & (replicated | layout.bad_shape)
        if not other.any():
            continue
        s = scores[:, c]
        s[:, _CHECK["shape"]] = np.where(other & layout.bad_shape & layout.shape_differs(c, base), np.inf, 0.0)
        s[:, _CHECK["dtype"]] = np.where(other & (dtype[:, c] != dtype[rows, base]), np.inf, 0.0)
        nonfinite = (counts["nan_count"][:, c] != counts["nan_count"][rows, base]) | (
            counts["inf_count"][:, c] != counts["inf_count"][rows, base]
        )
        s[:, _CHECK["nonfinite"]] = np.where(other & nonfinite, np.inf, 0.0)
        comparable = other & ~layout.bad_shape
        for name in _MOMENT_CHECKS:
            a, b = moments[name][:, c], moments[name][rows, base]
            s[:, _CHECK[name]] = np.where(comparable, _rel(a, b, scale[name]), 0.0)
        for kind, segs in (("sample", samples), ("full", fulls)):
            s[:, _CHECK[kind]] = np.where(comparable, segs.max_rel_diff(c, base, comparable), 0.0)
    worst = np.argmax(scores, axis=2)
    value = np.take_along_axis(scores, worst[..., None], axis=2)[..., 0]
    hit = value > replica_rtol
    records, columns = np.nonzero(hit)
    return {
        "record": records.astype(np.int64),
        "rank": np.asarray(ranks, dtype=np.int64)[columns] if len(columns) else np.zeros(0, np.int64),
        "check": worst[records, columns].astype(np.int64),
        "value": value[records, columns],
    }


def _rel(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``|a - b| / scale``; equal NaNs and equal infinities agree, a lone NaN never does."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = np.abs(a - b) / np.maximum(np.nan_to_num(scale, nan=0.0, posinf=0.0), _TINY)
    agree = (np.isnan(a) & np.isnan(b)) | (a == b)
    return np.where(agree, 0.0, np.where(np.isnan(d), np.inf, d))


@dataclass(eq=False)
class _Segments:
    """One element table (samples or full tensors) of every rank, for the replica check."""

    values: list[np.ndarray]  # per rank column, flattened to float64
    offset: np.ndarray  # (G, C)
    length: np.ndarray  # (G, C), 0 where absent

    @classmethod
    def build(cls, groups: Groups, kind: str) -> _Segments:
        n, n_cols = groups.idx.shape
        offset = np.zeros((n, n_cols), dtype=np.int64)
        length = np.zeros((n, n_cols), dtype=np.int64)
        values = []
        for c, trace in enumerate(groups.traces):
            cols = trace.records.columns
            sel = groups.present[:, c]
            rows = groups.idx[sel, c]
            if kind == "sample":
                values.append(ValueCache(trace).samples())
                offset[sel, c] = cols["sample_offset"][rows]
                length[sel, c] = cols["sample_len"][rows]
                continue
            # full tensors live in two tables; index both through one concatenation
            cache = ValueCache(trace)
            f32, f64 = cache.full(FULL_F32), cache.full(FULL_F64)
            values.append(np.concatenate([f32.astype(np.float64), f64.astype(np.float64)]) if len(f32) + len(f64)
                          else np.zeros(0))
            kinds = cols["full_kind"][rows]
            offset[sel, c] = cols["full_offset"][rows] + np.where(kinds == FULL_F64, len(f32), 0)
            length[sel, c] = np.where(kinds == FULL_NONE, 0, cols["full_len"][rows])
        return cls(values, offset, length)

    def max_rel_diff(self, c: int, base: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Per group: ``max |a - b| / max |b|`` between column ``c`` and each group's base column."""
        n = len(base)
        rows = np.arange(n)
        out = np.zeros(n)
        b_len = self.length[rows, base]
        usable = mask & (self.length[:, c] > 0) & (self.length[:, c] == b_len)
        out[mask & (self.length[:, c] > 0) & (b_len > 0) & (self.length[:, c] != b_len)] = np.inf
        for b_col in np.unique(base[usable]).tolist():
            sel = np.flatnonzero(usable & (base == b_col))
            lens = self.length[sel, c]
            starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
            total = int(lens.sum())
            within = np.arange(total) - np.repeat(starts, lens)
            a = self.values[c][np.repeat(self.offset[sel, c], lens) + within]
            b = self.values[b_col][np.repeat(self.offset[sel, b_col], lens) + within]
            scale = np.maximum.reduceat(np.where(np.isfinite(b), np.abs(b), 0.0), starts)
            out[sel] = np.maximum.reduceat(_rel(a, b, np.repeat(scale, lens)), starts)
        return out
