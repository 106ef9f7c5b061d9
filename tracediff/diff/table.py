"""Every matched record pair's metrics, column-wise, and the :class:`LayerRow` of the few a report shows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tracediff.diff import checks
from tracediff.diff.checks import (
    ABS_MEAN_LIMIT_CHECK,
    CHANGED_BY_REPEATING,
    CHECK_NAMES,
    ELEMENTS_CHECK,
    FIRST_STAT_CHECK,
    STAT_CHECKS,
    Verdict,
    layout_equivalent,
    stat_drifts,
    tolerance_arrays,
)
from tracediff.diff.elements import ElementMetrics, limit_ratio
from tracediff.diff.finding import LayerRow
from tracediff.diff.match import RecordMatch
from tracediff.store.trace import Trace
from tracediff.tolerance import Tolerance


@dataclass(eq=False)
class RecordTable:
    """Metrics of every matched record pair, column-wise."""

    upstream: Trace
    port: Trace
    match: RecordMatch
    drift: np.ndarray
    ratio: np.ndarray
    check: np.ndarray  # index into CHECK_NAMES, -1 = unchecked
    value: np.ndarray
    limit: np.ndarray
    failed: np.ndarray
    elements: np.ndarray  # 0 none, 1 sample, 2 full
    max_abs_err: np.ndarray
    rel_l2: np.ndarray
    cosine: np.ndarray
    sqnr_db: np.ndarray
    stat_drift: dict[str, np.ndarray]
    shape_mismatch: np.ndarray
    dtype_mismatch: np.ndarray
    nonfinite: np.ndarray
    rank_mismatch: np.ndarray  # a merged trace's replicated record differs across ranks (docs/distributed.md)
    step: np.ndarray
    order: np.ndarray  # matched indices sorted by (step, pos)
    index: np.ndarray  # each matched record's position among its step's compared records

    @classmethod
    def build(cls, upstream: Trace, port: Trace, match: RecordMatch, tol: Tolerance) -> RecordTable:
        mu, mp = match.mu, match.mp
        n = len(mu)
        pair = match.p_pair[mp]
        atol, rtol, stat_lim, am_lim = tolerance_arrays(match.pairs, tol, pair)
        shape_mm = checks.shape_mismatch(upstream, port, mu, mp)
        # Outputs that hold one tensor in another layout (same elements) or broadcast (``[32, 64]`` of
        # identical rows against ``[1, 64]``) are compared on the statistics that layout does not change.
        layout, repeated = layout_equivalent(upstream, port, mu, mp, shape_mm & ~match.p_module_input[mp])
        same_shape = ~shape_mm
        shape_mm = shape_mm & ~layout & ~repeated
        # A module input in another layout (or packed differently) says nothing about the code that
        # made it: such records are left unchecked instead of failing or blaming the caller.
        input_layout = shape_mm & match.p_module_input[mp]
        dtype_mm = checks.dtype_mismatch(upstream, port, mu, mp)
        nonfinite = checks.nonfinite(port, mp) & ~checks.nonfinite(upstream, mu)
        rank_mm = checks.rank_mismatch(port, mp) | checks.rank_mismatch(upstream, mu)

        stat_drift = stat_drifts(upstream, port, mu, mp, atol)
        for name in CHANGED_BY_REPEATING:
            if name in stat_drift:
                stat_drift[name] = np.where(repeated, np.nan, stat_drift[name])
        el = ElementMetrics.compute(upstream, port, mu, mp, atol, rtol, same_shape)

        has_el = el.kind > 0
        verdict = Verdict(n)
        verdict.consider(ELEMENTS_CHECK, np.where(has_el, el.ratio, np.nan), el.worst_diff, el.worst_allowed)
        if "abs_mean" in stat_drift:
            d = stat_drift["abs_mean"]
            verdict.consider(ABS_MEAN_LIMIT_CHECK, limit_ratio(d, am_lim), d, am_lim)
        for j, name in enumerate(STAT_CHECKS):
            drift_of = stat_drift.get(name)
            if drift_of is not None:
                ratio_of = np.where(has_el, np.nan, limit_ratio(drift_of, stat_lim))
                verdict.consider(FIRST_STAT_CHECK + j, ratio_of, drift_of, stat_lim)
        ratio, check = verdict.result()
        ratio[input_layout] = np.nan
        check[input_layout] = -1
        shape_mm = shape_mm & ~input_layout
        failed = _input_failures_need_output(np.nan_to_num(ratio, nan=0.0) > 1.0, match, mp, port)
        stat_max = np.fmax.reduce(np.vstack(list(stat_drift.values())), axis=0) if stat_drift else np.full(n, np.nan)
        drift = np.where(has_el, el.rel_l2, stat_max)
        step = match.p_step[mp]
        order = np.lexsort((match.m_pos, step))
        index = np.zeros(n, dtype=np.int64)
        if n:
            sorted_steps = step[order]
            group_start = np.searchsorted(sorted_steps, sorted_steps, side="left")
            index[order] = np.arange(n) - group_start
        return cls(
            upstream=upstream,
            port=port,
            match=match,
            drift=drift,
            ratio=ratio,
            check=check,
            value=verdict.value,
            limit=verdict.limit,
            failed=failed,
            elements=el.kind,
            max_abs_err=el.max_abs,
            rel_l2=el.rel_l2,
            cosine=el.cosine,
            sqnr_db=el.sqnr_db,
            stat_drift=stat_drift,
            shape_mismatch=shape_mm,
            dtype_mismatch=dtype_mm,
            nonfinite=nonfinite,
            rank_mismatch=rank_mm,
            step=step,
            order=order,
            index=index,
        )

    def step_rows(self, step: int) -> np.ndarray:
        """Matched indices of one step, in port execution order."""
        sorted_steps = self._sorted_steps
        lo, hi = np.searchsorted(sorted_steps, step, side="left"), np.searchsorted(sorted_steps, step, side="right")
        return self.order[lo:hi]

    @cached_property
    def _sorted_steps(self) -> np.ndarray:
        """``step[order]`` (non-decreasing): one step's rows are a slice of ``order``, found by bisection.

        A report asks for many steps' rows; filtering all records for each would scan the whole trace each time.
        """
        return self.step[self.order]

    @cached_property
    def port_by_step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every port record sorted by (step, seq): ``(rows, their steps, their seqs)``, for per-step windows."""
        cols = self.port.records.columns
        rows = np.lexsort((cols["seq"], self.match.p_step))
        return rows, self.match.p_step[rows], cols["seq"][rows]

    def port_step_window(self, step: int, lo_seq: float, hi_seq: float) -> np.ndarray:
        """Port records of ``step`` with ``lo_seq < seq < hi_seq``, in seq order."""
        rows, steps, seqs = self.port_by_step
        a, b = np.searchsorted(steps, step, side="left"), np.searchsorted(steps, step, side="right")
        within = seqs[a:b]
        lo = a + np.searchsorted(within, lo_seq, side="right")
        hi = a + np.searchsorted(within, hi_seq, side="left")
        return rows[lo:hi]

    @cached_property
    def port_finished(self) -> np.ndarray:
        """Per port record: an output (the module had returned by then), not a module input."""
        return ~self.port.module_input_records()

    @cached_property
    def port_unaligned(self) -> np.ndarray:
        """Per port record: its module has no counterpart and is in no group."""
        cols = self.port.records.columns
        return (self.match.p_pair < 0) & ~self.match.p_grouped[cols["module"]]

    def row(self, i: int) -> LayerRow:
        m = self.match
        u, p = int(m.mu[i]), int(m.mp[i])
        port_name, upstream_name = m.pairs[int(m.p_pair[p])]
        check = int(self.check[i])
        return LayerRow(
            index=int(self.index[i]),
            step=int(self.step[i]),
            call=int(self.port.records.columns["call"][p]),
            label=m.labels[int(m.p_label[p])],
            port=port_name,
            upstream=upstream_name,
            drift=float(self.drift[i]),
            ratio=float(self.ratio[i]),
            check=CHECK_NAMES[check] if check >= 0 else "",
            value=float(self.value[i]),
            limit=float(self.limit[i]),
            failed=bool(self.failed[i]),
            elements=("", "sample", "full")[int(self.elements[i])],
            max_abs_err=float(self.max_abs_err[i]),
            rel_l2=float(self.rel_l2[i]),
            cosine=float(self.cosine[i]),
            sqnr_db=float(self.sqnr_db[i]),
            stat_drift={name: float(d[i]) for name, d in self.stat_drift.items() if not math.isnan(d[i])},
            port_shape=_record_shape(self.port, p),
            upstream_shape=_record_shape(self.upstream, u),
            port_dtype=self.port.records.dtype_of(p),
            upstream_dtype=self.upstream.records.dtype_of(u),
            port_record=p,
            upstream_record=u,
        )


def _input_failures_need_output(failed: np.ndarray, match: RecordMatch, mp: np.ndarray, port: Trace) -> np.ndarray:
    """A module input counts as drifting only when an output of the same call drifts too.

    Two implementations may pass a module different things under the same label (a
    second positional argument holding text tokens on one side and modulation on the
    other). A difference the module's output does not show is such a convention, not
    an error: it must not make a clean pair fail, nor take the blame from the module.
    """
    is_input = match.p_module_input[mp]
    if not is_input.any():
        return failed
    pc = port.records.columns
    call = pc["call"][mp].astype(np.int64)
    key = (match.p_pair[mp].astype(np.int64) * (int(match.p_step[mp].max(initial=0)) + 2) + match.p_step[mp] + 1)
    key = key * (int(call.max(initial=0)) + 1) + call
    failing_outputs = key[failed & ~is_input]
    out = failed.copy()
    out[is_input] &= np.isin(key[is_input], failing_outputs)
    return out


def _record_shape(trace: Trace, index: int) -> tuple[int, ...] | None:
    return None if trace.records.columns["numel"][index] < 0 else trace.records.shape_of(index)
