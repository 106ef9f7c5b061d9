"""Compare two aligned traces record by record and find the first drift in execution order.

Records of an aligned module pair are matched by ``(step, call, tensor label)``.
For each match the differ computes what both traces allow:

* **elements** (``sample`` or ``full`` captured on both sides, same shape):
  ``torch.testing.assert_close`` semantics, an element fails when
  ``|port - ref| > atol + rtol * |ref|``; plus max absolute error, relative L2
  error ``||port - ref|| / ||ref||``, cosine similarity and SQNR in dB.
  Element checks are authoritative when present.
* **stats** (everything else, e.g. FastVideo JSONL): relative drift
  ``|port - ref| / max(scale, atol)`` of abs-mean, L2 norm, max, min, mean,
  std and sum, failing above ``stat_rtol``.
* ``abs_mean_limit``, when the tolerance sets one, bounds abs-mean drift on
  every record, elements or not.

Each matched record gets a ``ratio``: the largest ``value / limit`` over the
checks that applied, so ``ratio > 1`` means it breaks tolerance whatever the
check and whatever per-module override applied. Its ``drift`` is the number a
human reads on the curve: relative L2 error when elements were compared, else
the largest relative stat drift.

Shape and dtype mismatches, records present on one side only and the first
NaN/Inf are findings of their own kinds, ordered with drifts by the port's
execution order. Everything is vectorised over records with numpy; Python
objects are built only for the records a report shows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

import numpy as np

from tracediff.align.alignment import NEVER_CALLED, Alignment, Suspect
from tracediff.align.values import broadcast_equivalent
from tracediff.errors import DiffError
from tracediff.store.format import FULL_F32, FULL_F64, FULL_NONE, RECORD_COLUMNS
from tracediff.store.trace import Trace
from tracediff.tolerance import DEFAULT_PRESET, PRESETS, Tolerance, preset
from tracediff.vocabulary import metric_name, number

FindingKind = Literal[
    "missing_in_port", "missing_in_upstream", "shape_mismatch", "dtype_mismatch", "nonfinite", "rank_mismatch", "drift"
]
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

#: Stats compared on records without elements, in reporting order.
STAT_CHECKS: tuple[str, ...] = ("abs_mean", "l2", "max", "min", "mean", "std", "sum")
#: Compared only when both traces recorded them as values: ``std`` derived from moments
#: (``sumsq - sum**2 / n``) cancels catastrophically when ``|mean| >> std``.
_RECORDED_ONLY = frozenset({"std"})
_CHECK_NAMES = ("elements", "abs_mean_limit", *STAT_CHECKS)
_ELEMENTS, _ABS_MEAN_LIMIT, _FIRST_STAT = 0, 1, 2

#: Elements processed per vectorised batch (bounds memory, not speed).
_CHUNK_ELEMENTS = 1 << 22


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


@dataclass(frozen=True)
class Finding:
    """Something worth reporting at one record, in port execution order.

    Attributes:
        kind: see :data:`KINDS`.
        step, call, label: the record key.
        port, upstream: module names (``None`` on the side that lacks the record's module).
        fatal: whether this kind fails the diff (see ``fail_on``).
        message: one line describing it.
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
    message: str
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


@dataclass(eq=False)  # holds numpy arrays: identity, not value, equality
class DiffResult:
    """Outcome of :func:`diff_traces`; truthy when nothing breaks tolerance.

    Attributes:
        tolerance: what was applied.
        first_drift: the earliest fatal finding in port execution order (earliest step first).
        last_good: the last compared record before it, in its step, still within tolerance.
        findings: the first finding of each kind in each step, in execution order.
        counts: how many records of each kind were found in all compared steps.
        steps: steps compared; ``drifting_steps`` those with a fatal finding.
        curve_step: the step ``rows`` describe (the first drift's, else the first compared).
        compared: record pairs compared; ``aligned_modules``: module pairs that had any.
        unchecked: compared pairs with nothing to compare (no common stat, no elements).
        unchecked_inputs: how many of those are module inputs of another shape on each side.
        steps_only_upstream, steps_only_port: steps one side has and the other lacks.
        one_sided_modules: aligned module pairs traced on one side only (not findings).
        fail_on: the finding kinds that count as fatal.
    """

    tolerance: Tolerance
    first_drift: Finding | None
    last_good: LayerRow | None
    findings: list[Finding]
    counts: dict[str, int]
    steps: list[int]
    drifting_steps: list[int]
    curve_step: int
    compared: int
    aligned_modules: int
    unchecked: int
    steps_only_upstream: list[int] = field(default_factory=list)
    steps_only_port: list[int] = field(default_factory=list)
    one_sided_modules: int = 0
    fail_on: frozenset[str] = DEFAULT_FAIL_ON
    upstream_path: str = ""
    port_path: str = ""
    #: the port trace holds module inputs, so a drift made before a module ran is told apart
    module_inputs: bool = False
    unchecked_inputs: int = 0
    #: pairs the aligner's value evidence contradicted (shown, never fatal)
    alignment_suspects: list[Suspect] = field(default_factory=list)
    _table: _Table | None = field(default=None, repr=False)

    def __bool__(self) -> bool:
        return self.first_drift is None

    @property
    def port_trace(self) -> Trace | None:
        """The port trace compared (module names and classes, for attributing a drift)."""
        return self._table.port if self._table is not None else None

    @cached_property
    def rows(self) -> list[LayerRow]:
        """Every compared record of :attr:`curve_step`, in port execution order."""
        if self._table is None:
            return []
        return [self._table.row(int(i)) for i in self._table.step_rows(self.curve_step)]

    def curve(self, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ratio, drift)`` arrays of one step's compared records, without building rows."""
        if self._table is None:
            return np.zeros(0), np.zeros(0)
        rows = self._table.step_rows(self.curve_step if step is None else step)
        return self._table.ratio[rows], self._table.drift[rows]

    @property
    def first_drift_index(self) -> int | None:
        """Index into :attr:`rows` of the first drift's record (or of the row just after it)."""
        if self.first_drift is None or self._table is None:
            return None
        rows = self._table.step_rows(self.first_drift.step)
        return int(np.searchsorted(self._table.match.m_pos[rows], self.first_drift.position))


def diff_traces(
    upstream: Trace,
    port: Trace,
    alignment: Alignment,
    *,
    tolerance: Tolerance | str | None = None,
    step: int | None = None,
    fail_on: Iterable[str] = DEFAULT_FAIL_ON,
) -> DiffResult:
    """Compare ``port`` against ``upstream`` and find the first record that breaks tolerance.

    Args:
        upstream: the reference trace (its values are ``b`` in ``atol + rtol * |b|``).
        port: the trace under test; its execution order defines "first".
        alignment: which upstream module is which port module.
        tolerance: a :class:`Tolerance`, a preset name, or ``None`` for :data:`DEFAULT_PRESET`.
        step: compare this step only; default every step both traces hold.
        fail_on: finding kinds that fail the diff (default :data:`DEFAULT_FAIL_ON`).

    Returns:
        A :class:`DiffResult`, truthy when nothing fatal was found.

    Raises:
        DiffError: no step in common, ``step`` absent, nothing aligned, or nothing comparable.
    """
    tol = _resolve_tolerance(tolerance)
    fail_on = frozenset(fail_on)
    unknown = sorted(fail_on - set(KINDS))
    if unknown:
        raise DiffError(f"fail_on has unknown kind {unknown[0]!r}; valid: {', '.join(KINDS)}")
    match = _Match.build(upstream, port, alignment, step)
    # The traces compared: with the records of a module's batched calls (CFG) combined, see _with_combined.
    upstream, port = match.upstream, match.port
    table = _Table.build(upstream, port, match, tol)
    return _collect(table, tol, fail_on, upstream, port, list(alignment.suspects))


def _resolve_tolerance(tolerance: Tolerance | str | None) -> Tolerance:
    if tolerance is None:
        return PRESETS[DEFAULT_PRESET]
    if isinstance(tolerance, str):
        return preset(tolerance)
    return tolerance


# -- record matching -----------------------------------------------------------------


@dataclass(eq=False)
class _Match:
    """Which records are compared, which are one-sided, and where each sits in port order."""

    pairs: list[tuple[str, str]]  # (port, upstream) per pair id
    steps: list[int]
    steps_only_upstream: list[int]
    steps_only_port: list[int]
    u_step: np.ndarray  # per upstream record, reconciled
    p_step: np.ndarray
    u_pair: np.ndarray  # per upstream record, -1 = not aligned
    p_pair: np.ndarray
    labels: list[str]  # common label vocabulary
    u_label: np.ndarray
    p_label: np.ndarray
    # matched records
    mu: np.ndarray
    mp: np.ndarray
    m_pos: np.ndarray
    # one-sided records (of pairs traced on both sides in that step)
    only_p: np.ndarray
    only_p_pos: np.ndarray
    only_u: np.ndarray
    only_u_pos: np.ndarray
    one_sided_modules: int
    p_module_input: np.ndarray  # per port record: an input of a module other than the root
    p_grouped: np.ndarray  # per port module (+1 for "unknown"): a member of an aligned group
    # The traces compared: the given ones, plus one combined record per group of split calls that one
    # record of the other side holds batched (CFG, see _with_combined); the split records are not matched.
    upstream: Trace
    port: Trace
    # (pair id, step) -> (side that batches, number of calls): one call on that side, several on the other
    batching: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    combined: int = 0  # combined records (both sides)

    @classmethod
    def build(
        cls,
        upstream: Trace,
        port: Trace,
        alignment: Alignment,
        step: int | None,
        _hidden: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> _Match:
        """Match records; ``_hidden`` (second pass) masks the split records a combined record replaces."""
        pairs, u_pair_of, p_pair_of = _pair_tables(upstream, port, alignment)
        uc, pc = upstream.records.columns, port.records.columns
        u_pair = u_pair_of[uc["module"]] if len(upstream.records) else np.zeros(0, dtype=np.int64)
        p_pair = p_pair_of[pc["module"]] if len(port.records) else np.zeros(0, dtype=np.int64)
        u_step, p_step = _reconcile_steps(uc["step"].astype(np.int64), pc["step"].astype(np.int64))
        u_steps = set(_distinct(u_step[u_pair >= 0]).tolist())
        p_steps = set(_distinct(p_step[p_pair >= 0]).tolist())
        common = sorted(u_steps & p_steps)
        empty = [(name, trace) for name, trace in (("upstream", upstream), ("port", port)) if not len(trace.records)]
        if empty:
            which = " and ".join(f"the {name} trace {trace.path}" for name, trace in empty)
            raise DiffError(
                f"{which} recorded nothing (0 records): the model that ran was likely not the attached one nor one "
                "of its submodules, tracing was off, or no step matched FASTVIDEO_TRACE_STEPS (attach warns at close)"
            )
        if not u_steps or not p_steps:
            side = "either side" if not (u_steps or p_steps) else ("upstream" if not u_steps else "the port")
            raise DiffError(
                f"nothing aligned: none of the {len(pairs)} aligned module pair(s) has records on {side} "
                f"(traced modules: upstream {len(_distinct(uc['module']))}, port {len(_distinct(pc['module']))}); "
                "give the aligner a mapping file (--map) or trace the same layers on both sides"
            )
        if step is not None:
            if step not in common:
                raise DiffError(
                    f"step {step} is not in both traces (upstream steps: {_list(sorted(u_steps))}; "
                    f"port steps: {_list(sorted(p_steps))})"
                )
            common = [step]
        elif not common:
            raise DiffError(
                f"the traces share no step with aligned records (upstream steps: {_list(sorted(u_steps))}; "
                f"port steps: {_list(sorted(p_steps))}; aligned module pairs: {len(pairs)})"
            )
        labels: dict[str, int] = {}
        u_label = _label_map(upstream.records.labels, labels)[uc["label"]]
        p_label = _label_map(port.records.labels, labels)[pc["label"]]
        u_module_input = upstream.module_input_records()
        p_module_input = port.module_input_records()
        steps_arr = np.asarray(common, dtype=np.int64)
        u_keep = (u_pair >= 0) & np.isin(u_step, steps_arr)
        p_keep = (p_pair >= 0) & np.isin(p_step, steps_arr)
        if _hidden is not None:
            u_keep &= ~_hidden[0]
            p_keep &= ~_hidden[1]
        u_rows = np.flatnonzero(u_keep)
        p_rows = np.flatnonzero(p_keep)
        # Port execution order: step-major, then seq. Rank = position in that order.
        p_rows = p_rows[np.lexsort((pc["seq"][p_rows], p_step[p_rows]))]
        u_rows = u_rows[np.lexsort((uc["seq"][u_rows], u_step[u_rows]))]
        p_rank = np.arange(len(p_rows), dtype=np.float64)

        n_step, n_pair, n_label = len(common), max(len(pairs), 1), max(len(labels), 1)
        n_call = int(max(uc["call"][u_rows].max(initial=0), pc["call"][p_rows].max(initial=0))) + 1
        u_s = np.searchsorted(steps_arr, u_step[u_rows])
        p_s = np.searchsorted(steps_arr, p_step[p_rows])
        u_key = _key(u_pair[u_rows], u_s, uc["call"][u_rows], u_label[u_rows], n_step, n_call, n_label, n_pair)
        p_key_label = _sole_labels(u_pair[u_rows], u_label[u_rows], p_pair[p_rows], p_label[p_rows], labels)
        p_key = _key(p_pair[p_rows], p_s, pc["call"][p_rows], p_key_label, n_step, n_call, n_label, n_pair)
        batching: dict[tuple[int, int], tuple[str, int]] = {}
        if _hidden is None:
            plan = _BatchPlan.build(
                upstream, port, u_rows, p_rows, u_pair[u_rows], p_pair[p_rows], u_s, p_s,
                u_label[u_rows], p_key_label, common,
            )
            batching = plan.hints
            if plan.u_groups or plan.p_groups:
                up2, hide_u = _with_combined(upstream, plan.u_groups)
                port2, hide_p = _with_combined(port, plan.p_groups)
                match = cls.build(up2, port2, alignment, step, _hidden=(hide_u, hide_p))
                match.batching = batching
                match.combined = len(plan.u_groups) + len(plan.p_groups)
                return match

        order = np.argsort(u_key, kind="stable")
        sorted_keys = u_key[order]
        where = np.minimum(np.searchsorted(sorted_keys, p_key), max(len(sorted_keys) - 1, 0))
        hit = sorted_keys[where] == p_key if len(sorted_keys) else np.zeros(len(p_key), dtype=bool)
        u_hit_at = order[where[hit]]
        u_matched = np.zeros(len(u_rows), dtype=bool)
        u_matched[u_hit_at] = True

        # Only records of module pairs traced on both sides in that step count as missing.
        u_ps = u_pair[u_rows] * n_step + u_s
        p_ps = p_pair[p_rows] * n_step + p_s
        both = _present(u_ps, n_pair * n_step) & _present(p_ps, n_pair * n_step)
        # A module input that finds no partner (``input.hidden_states`` and ``input.mask`` against
        # ``input[0]``) is a difference in calling convention, not a finding.
        only_p_mask = ~hit & both[p_ps] & ~p_module_input[p_rows]
        only_u_mask = ~u_matched & both[u_ps] & ~u_module_input[u_rows]
        one_sided = int(np.sum(_present(u_pair[u_rows], n_pair) ^ _present(p_pair[p_rows], n_pair)))

        # An upstream-only record sits right after the port record matching its predecessor.
        u_rank = np.full(len(u_rows), -1.0)
        u_rank[u_hit_at] = p_rank[hit]
        u_pos = np.maximum.accumulate(u_rank) + 0.5 if len(u_rank) else u_rank

        return cls(
            pairs=pairs,
            steps=common,
            steps_only_upstream=sorted(u_steps - p_steps),
            steps_only_port=sorted(p_steps - u_steps),
            u_step=u_step,
            p_step=p_step,
            u_pair=u_pair,
            p_pair=p_pair,
            labels=list(labels),
            u_label=u_label,
            p_label=p_label,
            mu=u_rows[u_hit_at],
            mp=p_rows[hit],
            m_pos=p_rank[hit],
            only_p=p_rows[only_p_mask],
            only_p_pos=p_rank[only_p_mask],
            only_u=u_rows[only_u_mask],
            only_u_pos=u_pos[only_u_mask],
            one_sided_modules=int(one_sided),
            p_module_input=p_module_input,
            p_grouped=_grouped(port, alignment),
            upstream=upstream,
            port=port,
            batching=batching,
        )


# -- batched calls (CFG) ----------------------------------------------------------------


@dataclass
class _BatchPlan:
    """Which records of one side to combine: a module's calls that the other side made as one batched call.

    A pipeline with classifier-free guidance runs the DiT twice per step (conditional,
    unconditional, batch 1 each) or once on both concatenated on dim 0 (batch 2). Per
    module pair, step and tensor label, when one side has a single call with leading
    dimension ``N*B`` and the other ``N`` calls (0..N-1) with leading dimension ``B``
    and otherwise the same shape and dtype, the ``N`` split records are combined into
    one (:func:`_with_combined`) and compared against the batched record.
    """

    u_groups: list[np.ndarray]  # upstream records to combine, each group in call order
    p_groups: list[np.ndarray]
    hints: dict[tuple[int, int], tuple[str, int]]  # (pair, step) -> (batching side, N calls), matched or not

    @classmethod
    def build(
        cls,
        upstream: Trace,
        port: Trace,
        u_rows: np.ndarray,
        p_rows: np.ndarray,
        u_pair: np.ndarray,
        p_pair: np.ndarray,
        u_s: np.ndarray,
        p_s: np.ndarray,
        u_label: np.ndarray,
        p_label: np.ndarray,
        steps: list[int],
    ) -> _BatchPlan:
        plan = cls([], [], {})
        n_step = max(len(steps), 1)
        size = (int(max(u_pair.max(initial=0), p_pair.max(initial=0))) + 1) * n_step
        u_call = upstream.records.columns["call"][u_rows].astype(np.int64)
        p_call = port.records.columns["call"][p_rows].astype(np.int64)
        u_ps, p_ps = u_pair * n_step + u_s, p_pair * n_step + p_s
        u_max, p_max = np.full(size, -1, dtype=np.int64), np.full(size, -1, dtype=np.int64)
        np.maximum.at(u_max, u_ps, u_call)
        np.maximum.at(p_max, p_ps, p_call)
        sides = (
            ("port", port, p_rows, p_ps, p_label, upstream, u_rows, u_ps, u_label, u_call, u_max, plan.u_groups),
            ("upstream", upstream, u_rows, u_ps, u_label, port, p_rows, p_ps, p_label, p_call, p_max, plan.p_groups),
        )
        for name, b_trace, b_rows, b_ps, b_label, s_trace, s_rows, s_ps, s_label, s_call, s_max, groups in sides:
            b_max = p_max if name == "port" else u_max
            candidate = (b_max == 0) & (s_max >= 1)
            if not candidate.any():
                continue
            for ps in np.flatnonzero(candidate).tolist():
                plan.hints[(ps // n_step, steps[ps % n_step])] = (name, int(s_max[ps]) + 1)
            split: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for i in np.flatnonzero(candidate[s_ps]).tolist():
                split.setdefault((int(s_ps[i]), int(s_label[i])), []).append((int(s_call[i]), int(s_rows[i])))
            for i in np.flatnonzero(candidate[b_ps]).tolist():
                parts = split.get((int(b_ps[i]), int(b_label[i])))
                if not parts:
                    continue
                parts.sort()
                n = int(s_max[b_ps[i]]) + 1
                rows = np.asarray([row for _, row in parts], dtype=np.int64)
                if [call for call, _ in parts] == list(range(n)) and _splits(b_trace, int(b_rows[i]), s_trace, rows):
                    groups.append(rows)
        return plan


def _splits(b_trace: Trace, b_row: int, s_trace: Trace, rows: np.ndarray) -> bool:
    """Records ``rows`` of ``s_trace`` are record ``b_row`` of ``b_trace`` cut along dim 0 (by shape and dtype)."""
    bc, sc = b_trace.records.columns, s_trace.records.columns
    if bc["numel"][b_row] < 0 or (sc["numel"][rows] < 0).any():
        return False
    ndim = int(bc["ndim"][b_row])
    if ndim < 1 or (sc["ndim"][rows] != ndim).any() or len(set(sc["dtype"][rows].tolist())) != 1:
        return False
    shapes = s_trace.records.shape[rows, :ndim]
    b_shape = b_trace.records.shape[b_row, :ndim]
    return bool((shapes[:, 1:] == b_shape[1:]).all() and shapes[:, 0].sum() == b_shape[0])


class _Appended:
    """A flat store (an HDF5 dataset, an array) with values appended, sliced like one array."""

    def __init__(self, base: object, extra: np.ndarray) -> None:
        self.base, self.extra = base, extra
        self.n = len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n + len(self.extra)

    def __getitem__(self, item: slice) -> np.ndarray:
        start, stop, _ = item.indices(len(self))
        parts = []
        if start < min(stop, self.n):
            parts.append(np.asarray(self.base[start : min(stop, self.n)]))  # type: ignore[index]
        if stop > self.n:
            parts.append(self.extra[max(start - self.n, 0) : stop - self.n])
        return np.concatenate(parts) if parts else self.extra[:0]


def _with_combined(trace: Trace, groups: list[np.ndarray]) -> tuple[Trace, np.ndarray]:
    """``trace`` with one record appended per group, the group's tensors concatenated on dim 0; and the groups' mask.

    Moments combine exactly (sums and counts add, min/max combine); recorded stats
    (FastVideo JSONL) too: means weighted by element count, ``std`` pooled, ``l2``
    from its squares. A full tensor is the parts' full tensors concatenated; the
    sample is taken at the batched tensor's own sample positions, which map to
    positions the parts sampled (exactly, for parts of the same sample size), else
    left out (stats only). A combined record sits where the last part was recorded
    (its ``seq``) and carries call 0, the batched call.
    """
    n0 = len(trace.records)
    hidden = np.zeros(n0 + len(groups), dtype=bool)
    if not groups:
        return trace, hidden
    rec = trace.records
    cols = rec.columns
    parts = np.concatenate(groups)
    hidden[parts] = True
    lens = np.asarray([len(g) for g in groups])
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    last = parts[starts + lens - 1]
    numel = np.add.reduceat(cols["numel"][parts], starts)
    new: dict[str, np.ndarray] = {name: cols[name][last].copy() for name in RECORD_COLUMNS}
    new["call"][:] = 0
    new["numel"] = numel
    for name in ("sum", "abs_sum", "sumsq"):
        new[name] = np.add.reduceat(cols[name][parts], starts)
    new["min"] = np.minimum.reduceat(cols["min"][parts], starts)
    new["max"] = np.maximum.reduceat(cols["max"][parts], starts)
    for name in ("nan_count", "inf_count"):
        counted = np.minimum.reduceat(cols[name][parts], starts) >= 0
        new[name] = np.where(counted, np.add.reduceat(cols[name][parts], starts), -1)
    shape = rec.shape[last].copy()
    shape[:, 0] = np.add.reduceat(rec.shape[parts, 0], starts)
    direct = {name: np.concatenate([values, _combine_direct(rec.direct, name, parts, starts, cols["numel"])])
              for name, values in rec.direct.items()}

    samples, full_values = trace.samples, dict(trace.full_values)
    new["sample_offset"][:], new["sample_len"][:] = -1, 0
    new["full_offset"][:], new["full_len"][:], new["full_kind"][:] = -1, 0, FULL_NONE
    extra_full: dict[int, list[np.ndarray]] = {FULL_F32: [], FULL_F64: []}
    extra_len = dict.fromkeys(extra_full, 0)
    extra_samples: list[np.ndarray] = []
    n_samples = len(samples) if samples is not None else 0  # type: ignore[arg-type]
    size = trace.config.get("sample_size")
    for g, group in enumerate(groups):
        kinds = set(cols["full_kind"][group].tolist())
        whole = None
        if len(kinds) == 1 and (kind := kinds.pop()) != FULL_NONE and kind in trace.full_values:
            whole = np.concatenate([np.asarray(trace.full_values[kind][int(o) : int(o) + int(n)])
                                    for o, n in zip(cols["full_offset"][group], cols["full_len"][group], strict=True)])
            new["full_kind"][g], new["full_offset"][g] = kind, len(trace.full_values[kind])  # type: ignore[arg-type]
            new["full_offset"][g] += extra_len[kind]
            new["full_len"][g] = len(whole)
            extra_full[kind].append(whole)
            extra_len[kind] += len(whole)
        sample = _combined_sample(trace, group, whole, size)
        if sample is not None:
            new["sample_offset"][g], new["sample_len"][g] = n_samples, len(sample)
            extra_samples.append(sample)
            n_samples += len(sample)
    for kind, chunks in extra_full.items():
        if chunks:
            full_values[kind] = _Appended(trace.full_values[kind], np.concatenate(chunks))
    if extra_samples:
        base = np.asarray(samples, dtype=np.float64) if samples is not None else np.zeros(0)
        samples = np.concatenate([base, *extra_samples])

    columns = {name: np.concatenate([cols[name], new[name].astype(cols[name].dtype)]) for name in cols}
    records = replace(rec, columns=columns, shape=np.concatenate([rec.shape, shape]), direct=direct)
    ranks = trace.ranks
    if ranks is not None:  # a combined record differs across ranks where one of its parts does
        group_of = np.repeat(np.arange(len(groups)), lens)
        order = np.argsort(parts, kind="stable")
        at = np.flatnonzero(np.isin(ranks.mismatch_record, parts))
        owner = group_of[order[np.searchsorted(parts[order], ranks.mismatch_record[at])]]
        ranks = replace(
            ranks,
            shard_dim=np.concatenate([ranks.shard_dim, np.full(len(groups), -1, dtype=ranks.shard_dim.dtype)]),
            shard_sizes=np.concatenate(
                [ranks.shard_sizes, np.zeros((len(groups), ranks.shard_sizes.shape[1]), dtype=ranks.shard_sizes.dtype)]
            ),
            base_rank=np.concatenate([ranks.base_rank, ranks.base_rank[last]]),
            mismatch_record=np.concatenate([ranks.mismatch_record, n0 + owner]),
            mismatch_rank=np.concatenate([ranks.mismatch_rank, ranks.mismatch_rank[at]]),
            mismatch_check=np.concatenate([ranks.mismatch_check, ranks.mismatch_check[at]]),
            mismatch_value=np.concatenate([ranks.mismatch_value, ranks.mismatch_value[at]]),
        )
    return replace(trace, records=records, samples=samples, full_values=full_values, ranks=ranks), hidden


def _combine_direct(
    direct: dict[str, np.ndarray], name: str, parts: np.ndarray, starts: np.ndarray, numel: np.ndarray
) -> np.ndarray:
    """A recorded stat (FastVideo JSONL) of each group's concatenation, from its parts' (NaN where it cannot be)."""
    v = direct[name][parts]
    w = numel[parts].astype(np.float64)
    w = np.where(w > 0, w, np.nan)
    total = np.add.reduceat(w, starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        if name in ("abs_mean", "mean"):
            return np.add.reduceat(v * w, starts) / total
        if name in ("sum", "nan_count", "inf_count"):
            return np.add.reduceat(v, starts)
        if name == "min":
            return np.minimum.reduceat(v, starts)
        if name == "max":
            return np.maximum.reduceat(v, starts)
        if name == "l2":
            return np.sqrt(np.add.reduceat(v * v, starts))
        if name == "std":  # pooled: within-part variance plus the spread of the part means
            means = direct["mean"][parts] if "mean" in direct else (
                direct["sum"][parts] / w if "sum" in direct else np.full(len(parts), np.nan))
            mean = np.add.reduceat(means * w, starts) / total
            spread = (w - 1.0) * v * v + w * (means - np.repeat(mean, np.diff(np.append(starts, len(parts))))) ** 2
            return np.sqrt(np.add.reduceat(spread, starts) / (total - 1.0))
    return np.full(len(starts), np.nan)


def _sample_positions(numel: int, size: int) -> np.ndarray:
    """The flat positions the ``sample`` stat keeps (tracediff.hooks.stats.sample_positions, in numpy)."""
    if numel <= size:
        return np.arange(numel, dtype=np.int64)
    return np.arange(size, dtype=np.int64) * numel // size


def _combined_sample(trace: Trace, group: np.ndarray, whole: np.ndarray | None, size: object) -> np.ndarray | None:
    """The ``sample`` of the parts' concatenation, at its own positions, or None when the parts do not hold them.

    Each batched sample position falls in one part; for parts sampled with the same
    size it is always one of that part's sample positions (``floor(i*N*m/K) - j*m``
    is ``floor(k*m/K)`` with ``k = i*N - j*K``), and is checked to be.
    """
    cols = trace.records.columns
    numel = cols["numel"][group].astype(np.int64)
    lens = cols["sample_len"][group].astype(np.int64)
    if not isinstance(size, int) or size <= 0:
        short = lens[(lens > 0) & (lens < numel)]
        if not len(short):
            return None
        size = int(short[0])
    positions = _sample_positions(int(numel.sum()), size)
    if whole is not None:
        return np.asarray(whole[positions], dtype=np.float64)
    if trace.samples is None or (lens <= 0).any():
        return None
    bounds = np.cumsum(numel)
    part = np.searchsorted(bounds, positions, side="right")
    out = np.empty(len(positions))
    for k, row in enumerate(group.tolist()):
        sel = part == k
        local = positions[sel] - (bounds[k] - numel[k])
        stored = _sample_positions(int(numel[k]), size)
        if len(stored) != lens[k]:
            return None
        at = np.minimum(np.searchsorted(stored, local), max(len(stored) - 1, 0))
        if len(local) and not (stored[at] == local).all():
            return None
        offset = int(cols["sample_offset"][row])
        out[sel] = np.asarray(trace.samples[offset : offset + int(lens[k])], dtype=np.float64)[at]
    return out


def _pair_tables(
    upstream: Trace, port: Trace, alignment: Alignment
) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """Module index -> pair id on each side (last slot for the ``-1`` "unknown" module).

    A module claimed by two pairs keeps the first: the aligner lists stronger
    evidence first, and a record can only be compared against one counterpart.
    """
    u_index = _first_index(upstream.modules.names)
    p_index = _first_index(port.modules.names)
    u_of = np.full(len(upstream.modules.names) + 1, -1, dtype=np.int64)
    p_of = np.full(len(port.modules.names) + 1, -1, dtype=np.int64)
    pairs: list[tuple[str, str]] = []
    for pair in alignment.pairs:
        ui, pi = u_index.get(pair.upstream), p_index.get(pair.port)
        if ui is None or pi is None or u_of[ui] >= 0 or p_of[pi] >= 0:
            continue
        u_of[ui] = p_of[pi] = len(pairs)
        pairs.append((pair.port, pair.upstream))
    return pairs, u_of, p_of


def _grouped(port: Trace, alignment: Alignment) -> np.ndarray:
    """Per port module (last slot: unknown): whether it belongs to a many-to-one group (aligned, not compared)."""
    members = {name for group in alignment.groups for name in group.port}
    return np.asarray([name in members for name in port.modules.names] + [False], dtype=bool)


def caller_of(name: str, trace: Trace) -> str:
    """The module whose forward called ``name``: its nearest ancestor that runs code.

    ``ModuleList``/``ModuleDict`` only hold children and are never called, so they
    are looked through; the root (``""``) calls the top-level modules.
    """
    table = trace.modules
    classes = dict(zip(table.names, table.classes, strict=False))
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:cut])
        kind = classes.get(ancestor)
        if kind is not None and kind.rsplit(".", 1)[-1] not in NEVER_CALLED:
            return ancestor
    return ""



def _present(values: np.ndarray, size: int) -> np.ndarray:
    """Boolean table: which of ``0..size-1`` occur in ``values`` (linear time, unlike ``np.unique``)."""
    table = np.zeros(size, dtype=bool)
    table[values] = True
    return table


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a small-range integer array (steps), in linear time."""
    if not len(values):
        return values
    low, high = int(values.min()), int(values.max())
    if high - low > 1 << 24:
        return np.unique(values)
    return np.flatnonzero(np.bincount(values - low)) + low


def _first_index(names: list[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)
    return index


def _reconcile_steps(u_step: np.ndarray, p_step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A side recorded without steps (JSONL ``step: null`` -> -1) meets the other's only step.

    FastVideo records ``null`` outside ``trace_step``; tracediff numbers each
    top-level call. When one side has no step at all and the other exactly one,
    they describe the same single forward pass.
    """
    u_set, p_set = set(_distinct(u_step).tolist()), set(_distinct(p_step).tolist())
    if u_set == {-1} and len(p_set) == 1:
        return np.full_like(u_step, p_set.pop()), p_step
    if p_set == {-1} and len(u_set) == 1:
        return u_step, np.full_like(p_step, u_set.pop())
    return u_step, p_step


def _label_map(labels: list[str], vocabulary: dict[str, int]) -> np.ndarray:
    return np.asarray([vocabulary.setdefault(label, len(vocabulary)) for label in labels] or [0], dtype=np.int64)


def _sole_labels(
    u_pair: np.ndarray, u_label: np.ndarray, p_pair: np.ndarray, p_label: np.ndarray, vocabulary: dict[str, int]
) -> np.ndarray:
    """Port labels to match on: a module pair's only output tensor matches whatever each side calls it.

    One implementation returns a tensor (``out``), the other ``(tensor, None)``
    (``out[0]``) or a ``ModelOutput`` holding one tensor (``out.logits``). When
    both modules of a pair produced exactly one distinct output label (and,
    separately, one distinct input label, for the models' own inputs), those are
    the same tensor, so the port's label is read as upstream's. Pairs with
    several tensors on either side keep exact label matching.
    """
    is_input = np.asarray([name.startswith("input") for name in vocabulary] or [False], dtype=bool)
    n_labels = len(is_input)
    out = p_label.copy()
    for kind in (False, True):
        u_sel = is_input[u_label] == kind
        p_sel = is_input[p_label] == kind
        u_combo = np.unique(u_pair[u_sel] * n_labels + u_label[u_sel])
        p_combo = np.unique(p_pair[p_sel] * n_labels + p_label[p_sel])
        u_pairs, u_counts = np.unique(u_combo // n_labels, return_counts=True)
        p_pairs, p_counts = np.unique(p_combo // n_labels, return_counts=True)
        sole = np.intersect1d(u_pairs[u_counts == 1], p_pairs[p_counts == 1])
        if not len(sole):
            continue
        target = np.full(int(max(u_pairs.max(), p_pairs.max())) + 1, -1, dtype=np.int64)
        target[sole] = u_combo[np.isin(u_combo // n_labels, sole)] % n_labels
        rows = np.flatnonzero(p_sel & np.isin(p_pair, sole))
        out[rows] = target[p_pair[rows]]
    return out


def _key(
    pair: np.ndarray,
    step: np.ndarray,
    call: np.ndarray,
    label: np.ndarray,
    n_step: int,
    n_call: int,
    n_label: int,
    n_pair: int,
) -> np.ndarray:
    """One int64 per (pair, step, call, label); mixed-radix, so equal keys mean equal tuples."""
    if n_pair * n_step * n_call * n_label >= 2**62:
        raise DiffError("too many distinct (module, step, call, tensor) combinations to index")
    key = pair.astype(np.int64) * n_step + step
    key = key * n_call + call.astype(np.int64)
    return key * n_label + label


# -- metrics ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Table:
    """Metrics of every matched record pair, column-wise."""

    upstream: Trace
    port: Trace
    match: _Match
    drift: np.ndarray
    ratio: np.ndarray
    check: np.ndarray  # index into _CHECK_NAMES, -1 = unchecked
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
    def build(cls, upstream: Trace, port: Trace, match: _Match, tol: Tolerance) -> _Table:
        mu, mp = match.mu, match.mp
        n = len(mu)
        pair = match.p_pair[mp]
        atol, rtol, stat_lim, am_lim = _tolerance_arrays(match.pairs, tol, pair)
        shape_mm = _shape_mismatch(upstream, port, mu, mp)
        # Outputs that hold one tensor in another layout (same elements) or broadcast (``[32, 64]`` of
        # identical rows against ``[1, 64]``) are compared on the statistics that layout does not change.
        layout, repeated = _layout_equivalent(upstream, port, mu, mp, shape_mm & ~match.p_module_input[mp])
        same_shape = ~shape_mm
        shape_mm = shape_mm & ~layout & ~repeated
        # A module input in another layout (or packed differently) says nothing about the code that
        # made it: such records are left unchecked instead of failing or blaming the caller.
        input_layout = shape_mm & match.p_module_input[mp]
        dtype_mm = _dtype_mismatch(upstream, port, mu, mp)
        nonfinite = _nonfinite(port, mp) & ~_nonfinite(upstream, mu)
        rank_mm = _rank_mismatch(port, mp) | _rank_mismatch(upstream, mu)

        stat_drift = _stat_drifts(upstream, port, mu, mp, atol)
        for name in _CHANGED_BY_REPEATING:
            if name in stat_drift:
                stat_drift[name] = np.where(repeated, np.nan, stat_drift[name])
        el = _ElementMetrics.compute(upstream, port, mu, mp, atol, rtol, same_shape)

        has_el = el.kind > 0
        verdict = _Verdict(n)
        verdict.consider(_ELEMENTS, np.where(has_el, el.ratio, np.nan), el.worst_diff, el.worst_allowed)
        if "abs_mean" in stat_drift:
            d = stat_drift["abs_mean"]
            verdict.consider(_ABS_MEAN_LIMIT, _ratio(d, am_lim), d, am_lim)
        for j, name in enumerate(STAT_CHECKS):
            d = stat_drift.get(name)
            if d is not None:
                verdict.consider(_FIRST_STAT + j, np.where(has_el, np.nan, _ratio(d, stat_lim)), d, stat_lim)
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

        A report asks for a few hundred steps' rows; filtering all records each time cost seconds at 1M records.
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
            check=_CHECK_NAMES[check] if check >= 0 else "",
            value=float(self.value[i]),
            limit=float(self.limit[i]),
            failed=bool(self.failed[i]),
            elements=("", "sample", "full")[int(self.elements[i])],
            max_abs_err=float(self.max_abs_err[i]),
            rel_l2=float(self.rel_l2[i]),
            cosine=float(self.cosine[i]),
            sqnr_db=float(self.sqnr_db[i]),
            stat_drift={name: float(d[i]) for name, d in self.stat_drift.items() if not math.isnan(d[i])},
            port_shape=_shape(self.port, p),
            upstream_shape=_shape(self.upstream, u),
            port_dtype=self.port.records.dtype_of(p),
            upstream_dtype=self.upstream.records.dtype_of(u),
            port_record=p,
            upstream_record=u,
        )


def _input_failures_need_output(failed: np.ndarray, match: _Match, mp: np.ndarray, port: Trace) -> np.ndarray:
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


class _Verdict:
    """The deciding check per record: the one with the largest ``value / limit``."""

    def __init__(self, n: int) -> None:
        self.ratio = np.full(n, -1.0)
        self.check = np.full(n, -1, dtype=np.int64)
        self.value = np.full(n, np.nan)
        self.limit = np.full(n, np.nan)

    def consider(self, code: int, ratio: np.ndarray, value: np.ndarray, limit: np.ndarray) -> None:
        """Take check ``code`` where it applies (ratio not NaN) and beats the current one."""
        better = ratio > self.ratio  # NaN (check not applicable) compares False
        self.ratio[better] = ratio[better]
        self.check[better] = code
        self.value[better] = value[better]
        self.limit[better] = limit[better]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ratio, check)``, NaN and -1 where no check applied."""
        unchecked = self.check < 0
        self.ratio[unchecked] = np.nan
        return self.ratio, self.check


def _tolerance_arrays(
    pairs: list[tuple[str, str]], tol: Tolerance, pair: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per matched record: atol, rtol, stat limit, abs-mean limit (NaN = none), overrides resolved per pair."""
    per_pair = np.zeros((max(len(pairs), 1), 4))
    for k, (port_name, upstream_name) in enumerate(pairs):
        t = tol.for_module(port_name, upstream_name)
        per_pair[k] = (t.atol, t.rtol, t.stat_limit, np.nan if t.abs_mean_limit is None else t.abs_mean_limit)
    values = per_pair[pair] if len(pair) else np.zeros((0, 4))
    return values[:, 0], values[:, 1], values[:, 2], values[:, 3]


def _ratio(value: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """``value / limit``; a zero limit means "any difference fails", NaN in either stays NaN."""
    with np.errstate(invalid="ignore"):
        out = np.where(value > 0, np.inf, np.where(np.isnan(value), np.nan, 0.0))
    np.divide(value, limit, out=out, where=limit > 0)
    return np.where(np.isnan(limit), np.nan, out)


#: Statistics that repeating a tensor along a dimension changes (means and extrema it does not).
_CHANGED_BY_REPEATING = ("l2", "sum", "std")


def _layout_equivalent(
    upstream: Trace, port: Trace, mu: np.ndarray, mp: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Among records of different shape: ``(same element count, one broadcast from the other)``."""
    layout = np.zeros(len(mu), dtype=bool)
    repeated = np.zeros(len(mu), dtype=bool)
    for i in np.flatnonzero(candidates).tolist():
        a, b = upstream.records.shape_of(int(mu[i])), port.records.shape_of(int(mp[i]))
        if _same_layout(a, b):
            layout[i] = True
        elif broadcast_equivalent(a, b):
            repeated[i] = True
    return layout, repeated


def _same_layout(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """One shape is the other with dimensions merged or split in place (``(1, 6, 64)`` and ``(1, 384)``).

    That is a ``view``/``flatten``/``unflatten`` of the same memory order; a transpose
    (``(64, 32)`` against ``(32, 64)``) is not, and stays a shape mismatch.
    """
    x, y = [d for d in a if d != 1], [d for d in b if d != 1]
    return _merges_into(x, y) or _merges_into(y, x)


def _merges_into(coarse: list[int], fine: list[int]) -> bool:
    """``fine``'s dimensions, merged in consecutive runs, give ``coarse``'s."""
    j = 0
    for dim in coarse:
        size = 1
        while size < dim and j < len(fine):
            size *= fine[j]
            j += 1
        if size != dim:
            return False
    return j == len(fine)


def _shape_mismatch(upstream: Trace, port: Trace, mu: np.ndarray, mp: np.ndarray) -> np.ndarray:
    ur, pr = upstream.records, port.records
    known = (ur.columns["numel"][mu] >= 0) & (pr.columns["numel"][mp] >= 0)
    differs = (ur.columns["ndim"][mu] != pr.columns["ndim"][mp]) | np.any(ur.shape[mu] != pr.shape[mp], axis=1)
    return known & differs


def _dtype_mismatch(upstream: Trace, port: Trace, mu: np.ndarray, mp: np.ndarray) -> np.ndarray:
    names: dict[str, int] = {"": 0}
    u_map = np.asarray([names.setdefault(d, len(names)) for d in upstream.records.dtypes] or [0])
    p_map = np.asarray([names.setdefault(d, len(names)) for d in port.records.dtypes] or [0])
    u = u_map[upstream.records.columns["dtype"][mu]] if len(mu) else np.zeros(0, dtype=np.int64)
    p = p_map[port.records.columns["dtype"][mp]] if len(mp) else np.zeros(0, dtype=np.int64)
    return (u != 0) & (p != 0) & (u != p)


def _rank_mismatch(trace: Trace, rows: np.ndarray) -> np.ndarray:
    """Whether each record is a replicated tensor whose copies differ across ranks (merged traces only)."""
    if trace.ranks is None:
        return np.zeros(len(rows), dtype=bool)
    return trace.ranks.mismatched(len(trace.records))[rows]


def _rank_notes(row: LayerRow, table: _Table, kind: str) -> str:
    """Which rank it is: the ranks of a mismatch, or how a drifting sharded record splits over ranks."""
    sides = (("port", table.port, row.port_record), ("upstream", table.upstream, row.upstream_record))
    if kind == "rank_mismatch":
        notes = [
            (f"{name}: " if name == "upstream" else "") + trace.ranks.describe_mismatch(record)
            for name, trace, record in sides
            if trace.ranks is not None and trace.ranks.describe_mismatch(record)
        ]
        return "; ".join(notes)
    for name, trace, record in sides:
        layout = trace.ranks
        if layout is None or int(layout.shard_dim[record]) < 0:
            continue
        shape = trace.records.shape_of(record)
        slices = layout.shard_slices(record, shape)
        where = (
            f"{'' if name == 'port' else 'upstream '}sharded over ranks {', '.join(str(r) for r, _ in slices)} "
            f"along dim {int(layout.shard_dim[record])}"
        )
        other, other_record = (table.upstream, row.upstream_record) if name == "port" else (
            table.port, row.port_record
        )
        mine, theirs = trace.full(record), other.full(other_record)
        if mine is None or theirs is None or mine.shape != theirs.shape:
            return f"{where} (trace the full stat on both sides to see which rank's shard differs)"
        errors = []
        for rank, index in slices:
            a, b = np.asarray(mine[index], np.float64), np.asarray(theirs[index], np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                ref = float(np.sqrt(np.sum(b * b)))
                err = float(np.sqrt(np.sum((a - b) ** 2)))
                errors.append((err / ref if ref > 0 else (0.0 if err == 0 else math.inf), rank))
        worst = max(errors)
        by_rank = ", ".join(f"rank {rank} {number(err)}" for err, rank in errors)
        return f"{where}; rel L2 err by shard: {by_rank} (worst: rank {worst[1]})"
    return ""


def _nonfinite(trace: Trace, rows: np.ndarray) -> np.ndarray:
    """Whether each record held NaN/Inf: from the counts when recorded, else from its stats."""
    cols = trace.records.columns
    nan, inf = cols["nan_count"][rows], cols["inf_count"][rows]
    counted = (nan >= 0) & (inf >= 0) & bool(trace.meta.get("has_moments", False))
    from_counts = (nan > 0) | (inf > 0)
    from_stats = np.zeros(len(rows), dtype=bool)
    for name in ("abs_mean", "sum", "l2", "max", "min", "mean", "std"):
        if name in trace.records.direct:
            from_stats |= ~np.isfinite(trace.records.direct[name][rows])
    return np.where(counted, from_counts, from_stats)


def _stat_drifts(
    upstream: Trace, port: Trace, mu: np.ndarray, mp: np.ndarray, atol: np.ndarray
) -> dict[str, np.ndarray]:
    """Relative drift ``|a - b| / max(scale(b), floor)`` of every stat both traces hold.

    The scale is the stat's own magnitude, except for ``mean`` and ``sum``, which
    are measured against the tensor's absolute mass (abs-mean, abs-sum): a
    zero-mean activation has a sum near zero, and relative drift of that is noise.
    The floor is ``atol`` per element (``atol * sqrt(numel)`` for L2), so a
    tensor that is zero at this tolerance does not produce a huge ratio.
    """
    out: dict[str, np.ndarray] = {}
    numel = upstream.records.columns["numel"][mu].astype(np.float64)
    numel = np.where(numel >= 0, numel, np.nan)
    b_abs_mean = upstream.stat("abs_mean")[mu] if upstream.has_stat("abs_mean") else np.full(len(mu), np.nan)
    for name in STAT_CHECKS:
        if not (upstream.has_stat(name) and port.has_stat(name)):
            continue
        if name in _RECORDED_ONLY and not (name in upstream.records.direct and name in port.records.direct):
            continue
        a, b = port.stat(name)[mp], upstream.stat(name)[mu]
        if name == "l2":
            scale, floor = np.abs(b), atol * np.sqrt(np.nan_to_num(numel, nan=1.0))
        elif name == "mean":  # |mean| <= abs_mean: measure against the mass, not the (near-zero) mean
            scale, floor = b_abs_mean, atol
        elif name == "sum":
            scale, floor = b_abs_mean * numel, atol * numel
        else:
            scale, floor = np.abs(b), atol
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            d = np.abs(a - b) / np.maximum(np.where(np.isfinite(scale), scale, 0.0), floor)
        agree = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
        one_sided = ~agree & ~(np.isfinite(a) & np.isfinite(b))
        d = np.where(agree, 0.0, np.where(one_sided, np.inf, d))
        out[name] = np.where(np.isnan(scale) & ~np.isnan(b), np.nan, d)
    return out


@dataclass(eq=False)
class _ElementMetrics:
    kind: np.ndarray  # 0 none, 1 sample, 2 full
    ratio: np.ndarray
    worst_diff: np.ndarray
    worst_allowed: np.ndarray
    max_abs: np.ndarray
    rel_l2: np.ndarray
    cosine: np.ndarray
    sqnr_db: np.ndarray

    @classmethod
    def compute(
        cls,
        upstream: Trace,
        port: Trace,
        mu: np.ndarray,
        mp: np.ndarray,
        atol: np.ndarray,
        rtol: np.ndarray,
        comparable: np.ndarray,
    ) -> _ElementMetrics:
        n = len(mu)
        out = cls(np.zeros(n, dtype=np.int8), *(np.full(n, np.nan) for _ in range(7)))
        uc, pc = upstream.records.columns, port.records.columns
        full = (
            comparable
            & (uc["full_kind"][mu] != FULL_NONE)
            & (pc["full_kind"][mp] != FULL_NONE)
            & (uc["full_len"][mu] == pc["full_len"][mp])
            & (pc["full_len"][mp] > 0)
        )
        sample = (
            comparable
            & ~full
            & (pc["sample_len"][mp] > 0)
            & (uc["sample_len"][mu] == pc["sample_len"][mp])
            & (upstream.samples is not None)
            & (port.samples is not None)
        )
        for mask, kind in ((full, 2), (sample, 1)):
            idx = np.flatnonzero(mask)
            if not len(idx):
                continue
            a_vals, a_off, lens = _values(port, mp[idx], full=kind == 2)
            b_vals, b_off, _ = _values(upstream, mu[idx], full=kind == 2)
            chunks = _chunks(lens)
            a_parts = _Span(a_vals).each([(a_off[c], lens[c]) for c in chunks])
            b_parts = _Span(b_vals).each([(b_off[c], lens[c]) for c in chunks])
            for chunk, (a_chunk, a_at), (b_chunk, b_at) in zip(chunks, a_parts, b_parts, strict=True):
                sel = idx[chunk]
                res = _chunk_metrics(a_chunk, a_at, b_chunk, b_at, lens[chunk], atol[sel], rtol[sel])
                out.kind[sel] = kind
                for name, values in res.items():
                    getattr(out, name)[sel] = values
        return out


def _values(trace: Trace, rows: np.ndarray, *, full: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A flat float64 array holding the rows' elements, with each row's offset and length."""
    cols = trace.records.columns
    if not full:
        lens = cols["sample_len"][rows].astype(np.int64)
        samples = trace.samples
        if not hasattr(samples, "read_into"):  # read lazily, chunk by chunk (:class:`_Span`)
            samples = np.asarray(samples, dtype=np.float64)
        return samples, cols["sample_offset"][rows], lens  # type: ignore[return-value]
    lens = cols["full_len"][rows].astype(np.int64)
    offsets = np.zeros(len(rows), dtype=np.int64)
    parts: list[np.ndarray] = []
    base = 0
    for kind in (FULL_F32, FULL_F64):
        sel = np.flatnonzero(cols["full_kind"][rows] == kind)
        if not len(sel) or kind not in trace.full_values:
            continue
        start = cols["full_offset"][rows[sel]]
        lo, hi = int(start.min()), int((start + lens[sel]).max())
        parts.append(np.asarray(trace.full_values[kind][lo:hi], dtype=np.float64))
        offsets[sel] = start - lo + base
        base += hi - lo
    values = np.concatenate(parts) if parts else np.zeros(0)
    return values, offsets, lens


class _Span:
    """The values chunks of records need: an array as it is, or a lazy table read chunk by chunk.

    A trace file's samples (:class:`tracediff.store.reader.CommittedValues`) are read one
    chunk's span at a time, the next one in a background thread while this one is
    compared (HDF5 reads release the GIL): reading 2 GB at once cost seconds of page
    faults and as much memory, and reading in turn with the arithmetic left one of two
    cores idle. Records far apart in the file make the whole table read once instead.
    """

    def __init__(self, values: Any) -> None:
        self.values = values

    def each(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per ``(offsets, lens)``: ``(values, offsets into them)`` covering ``offsets[i] .. offsets[i] + lens[i]``."""
        if isinstance(self.values, np.ndarray):
            for offsets, _ in parts:
                yield self.values, offsets
            return
        spans = [(int(o.min()), int((o + n).max())) if len(o) else (0, 0) for o, n in parts]
        if any(hi - lo > 4 * max(int(n.sum()), _CHUNK_ELEMENTS) for (lo, hi), (_, n) in zip(spans, parts, strict=True)):
            whole = np.asarray(self.values, dtype=np.float64)
            for offsets, _ in parts:
                yield whole, offsets
            return
        size = max((hi - lo for lo, hi in spans), default=0)
        buffers = (np.empty(size), np.empty(size))

        def read(i: int) -> np.ndarray:
            lo, hi = spans[i]
            out = buffers[i % 2][: hi - lo]
            self.values.read_into(out, lo)
            return out

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, 0) if parts else None
            for i, (offsets, _) in enumerate(parts):
                assert pending is not None
                values = pending.result()
                # the other buffer is free again: the caller is done with part i - 1
                pending = pool.submit(read, i + 1) if i + 1 < len(parts) else None
                yield values, offsets - spans[i][0]


def _chunks(lens: np.ndarray) -> list[np.ndarray]:
    """Split row indices into runs of at most ``_CHUNK_ELEMENTS`` elements (at least one row each)."""
    if not len(lens):
        return []
    bounds = np.cumsum(lens) // _CHUNK_ELEMENTS
    cuts = np.flatnonzero(np.diff(bounds)) + 1
    return np.split(np.arange(len(lens)), cuts)


def _chunk_metrics(
    a_vals: np.ndarray,
    a_off: np.ndarray,
    b_vals: np.ndarray,
    b_off: np.ndarray,
    lens: np.ndarray,
    atol: np.ndarray,
    rtol: np.ndarray,
) -> dict[str, np.ndarray]:
    """:func:`_segment_metrics`, but records of one length are taken as a 2-D block when that is exact.

    Nearly every record holds the same number of sample elements (``sample_size``); as rows of a
    matrix their elements need no per-element segment ids, repeats or ``reduceat``, which made
    the element check take most of ``first-drift``'s time at 1M records.
    """
    out = {name: np.empty(len(lens)) for name in _SEGMENT_KEYS}
    if not len(lens):
        return out
    for length in np.unique(lens).tolist():
        rows = np.flatnonzero(lens == length)
        res = None
        if length > 0:
            res = _uniform_blocks(a_vals, a_off[rows], b_vals, b_off[rows], length, atol[rows], rtol[rows])
        if res is None:
            res = _segment_metrics(a_vals, a_off[rows], b_vals, b_off[rows], lens[rows], atol[rows], rtol[rows])
        for name in _SEGMENT_KEYS:
            out[name][rows] = res[name]
    return out


_SEGMENT_KEYS = ("ratio", "worst_diff", "worst_allowed", "max_abs", "rel_l2", "cosine", "sqnr_db")
#: Elements per side taken at once by :func:`_uniform_blocks` (2 MiB of float64): its temporaries stay in cache.
_BLOCK_ELEMENTS = 1 << 18


def _uniform_blocks(
    a_vals: np.ndarray,
    a_off: np.ndarray,
    b_vals: np.ndarray,
    b_off: np.ndarray,
    length: int,
    atol: np.ndarray,
    rtol: np.ndarray,
) -> dict[str, np.ndarray] | None:
    """:func:`_uniform_metrics` of records of one ``length``, a block of rows at a time; None outside its fast case.

    Each row's results depend on that row alone, so blocks give exactly the whole-matrix results;
    but a block's copies and temporaries (a few MiB) stay in cache and in memory already mapped,
    where whole-chunk ones (32 MiB each) cost page faults and memory traffic on every pass.
    """
    n = len(a_off)
    if not (np.all(atol > 0) and np.all(rtol >= 0)):
        return None
    out = {name: np.empty(n) for name in _SEGMENT_KEYS}
    step = max(1, _BLOCK_ELEMENTS // length)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        a = _rows_of(a_vals, a_off[lo:hi], length)
        res = _uniform_metrics(a, _rows_of(b_vals, b_off[lo:hi], length), atol[lo:hi], rtol[lo:hi])
        if res is None:  # a non-finite element: the general path takes all of these records, as before
            return None
        for name in _SEGMENT_KEYS:
            out[name][lo:hi] = res[name]
    return out


def _rows_of(values: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """``values[offsets[i] : offsets[i] + length]`` as row ``i`` of a matrix (a view when they are back to back).

    Otherwise rows are copied whole from a sliding-window view: three times faster than
    gathering element by element through an index matrix.
    """
    n = len(offsets)
    if n and int(offsets[0]) >= 0 and (n == 1 or bool(np.all(np.diff(offsets) == length))):
        start = int(offsets[0])
        return values[start : start + n * length].reshape(n, length)
    return np.lib.stride_tricks.sliding_window_view(values, length)[offsets]


def _uniform_metrics(
    a: np.ndarray, b: np.ndarray, atol: np.ndarray, rtol: np.ndarray
) -> dict[str, np.ndarray] | None:
    """:func:`_segment_metrics` of equal-length records (rows of ``a`` and ``b``); None outside its fast case.

    The fast case is every element finite and every row's ``atol`` > 0 (so every allowed
    difference is > 0): then the general function's special cases cannot occur, and its
    results are reproduced exactly, up to the summation order of the sums of squares.
    Temporaries are reused in place: at 1M records each pass over the elements counts.
    """
    if not (np.all(atol > 0) and np.all(rtol >= 0)):
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.subtract(a, b)
        d2 = np.einsum("ij,ij->i", d, d)
    if not np.isfinite(d2).all():  # a non-finite element on either side (or an overflow): the general path
        return None
    a2 = np.einsum("ij,ij->i", a, a)
    b2 = np.einsum("ij,ij->i", b, b)
    ab = np.einsum("ij,ij->i", a, b)
    diff = np.abs(d, out=d)
    allowed = np.abs(b)
    uniform = atol.min() == atol.max() and rtol.min() == rtol.max()
    allowed *= rtol[0] if uniform else rtol[:, None]
    allowed += atol[0] if uniform else atol[:, None]
    el_ratio = np.divide(diff, allowed)
    first = np.argmax(el_ratio, axis=1)  # the first element of the worst ratio, as the general function picks
    at = np.arange(len(first))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_l2 = np.where(b2 > 0, np.sqrt(d2 / b2), np.where(d2 > 0, np.inf, 0.0))
        cosine = np.where((a2 > 0) & (b2 > 0), ab / np.sqrt(a2 * b2), np.where((a2 == 0) & (b2 == 0), 1.0, 0.0))
        sqnr = np.where(d2 > 0, 10.0 * np.log10(b2 / d2), np.inf)
    return {
        "ratio": el_ratio[at, first],
        "worst_diff": diff[at, first],
        "worst_allowed": allowed[at, first],
        "max_abs": diff.max(axis=1),
        "rel_l2": rel_l2,
        "cosine": np.clip(cosine, -1.0, 1.0),
        "sqnr_db": sqnr,
    }


def _segment_metrics(
    a_vals: np.ndarray,
    a_off: np.ndarray,
    b_vals: np.ndarray,
    b_off: np.ndarray,
    lens: np.ndarray,
    atol: np.ndarray,
    rtol: np.ndarray,
) -> dict[str, np.ndarray]:
    """Element metrics of many records at once: gather all elements, reduce per record."""
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    total = int(lens.sum())
    within = np.arange(total) - np.repeat(starts, lens)
    a = a_vals[np.repeat(a_off, lens) + within]
    b = b_vals[np.repeat(b_off, lens) + within]
    seg = np.repeat(np.arange(len(lens)), lens)
    finite = np.isfinite(a) & np.isfinite(b)
    same = ~finite & ((a == b) | (np.isnan(a) & np.isnan(b)))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(a - b), np.where(same, 0.0, np.inf))
        allowed = atol[seg] + rtol[seg] * np.where(np.isfinite(b), np.abs(b), 0.0)
    el_ratio = _ratio(diff, allowed)
    ratio = np.maximum.reduceat(el_ratio, starts)
    first = np.minimum.reduceat(np.where(el_ratio == ratio[seg], np.arange(total), total), starts)
    af, bf = np.where(finite, a, 0.0), np.where(finite, b, 0.0)
    d2 = np.add.reduceat((af - bf) ** 2, starts)
    a2 = np.add.reduceat(af * af, starts)
    b2 = np.add.reduceat(bf * bf, starts)
    ab = np.add.reduceat(af * bf, starts)
    broken = np.add.reduceat((~finite & ~same).astype(np.int64), starts) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_l2 = np.where(b2 > 0, np.sqrt(d2 / b2), np.where(d2 > 0, np.inf, 0.0))
        cosine = np.where((a2 > 0) & (b2 > 0), ab / np.sqrt(a2 * b2), np.where((a2 == 0) & (b2 == 0), 1.0, 0.0))
        sqnr = np.where(d2 > 0, 10.0 * np.log10(b2 / d2), np.inf)
    return {
        "ratio": ratio,
        "worst_diff": diff[first],
        "worst_allowed": allowed[first],
        "max_abs": np.maximum.reduceat(diff, starts),
        "rel_l2": np.where(broken, np.inf, rel_l2),
        "cosine": np.where(broken, np.nan, np.clip(cosine, -1.0, 1.0)),
        "sqnr_db": np.where(broken, -np.inf, sqnr),
    }


# -- findings ------------------------------------------------------------------------------


def _collect(
    table: _Table, tol: Tolerance, fail_on: frozenset[str], upstream: Trace, port: Trace, suspects: list[Suspect]
) -> DiffResult:
    m = table.match
    if not len(m.mu):
        raise DiffError(
            f"nothing to compare: no record of the {len(m.pairs)} aligned module pair(s) appears on both sides "
            f"in step(s) {_list(m.steps)} with the same call and tensor label"
        )
    unchecked = int(np.isnan(table.ratio).sum())
    if unchecked == len(table.ratio):
        raise DiffError(
            "nothing to compare: the traces share no stat (abs_mean, l2, max, ...) and no sample/full elements; "
            f"upstream stats: {_list(upstream.config.get('stats', []))}; "
            f"port stats: {_list(port.config.get('stats', []))}"
        )
    code = {kind: i for i, kind in enumerate(KINDS)}
    matched = np.arange(len(m.mu))
    sources = [
        (code["missing_in_port"], m.u_step[m.only_u], m.only_u_pos, np.arange(len(m.only_u))),
        (code["missing_in_upstream"], m.p_step[m.only_p], m.only_p_pos, np.arange(len(m.only_p))),
        (code["shape_mismatch"], table.step, m.m_pos, matched[table.shape_mismatch]),
        (code["dtype_mismatch"], table.step, m.m_pos, matched[table.dtype_mismatch]),
        (code["nonfinite"], table.step, m.m_pos, matched[table.nonfinite]),
        (code["rank_mismatch"], table.step, m.m_pos, matched[table.rank_mismatch]),
        (code["drift"], table.step, m.m_pos, matched[table.failed]),
    ]
    kinds, steps, pos, refs = [], [], [], []
    for kind, step_col, pos_col, ref in sources:
        if kind in (code["missing_in_port"], code["missing_in_upstream"]):
            step_sel, pos_sel = step_col, pos_col
        else:
            step_sel, pos_sel = step_col[ref], pos_col[ref]
        kinds.append(np.full(len(ref), kind))
        steps.append(step_sel)
        pos.append(pos_sel)
        refs.append(ref)
    kind_arr, step_arr, pos_arr, ref_arr = (np.concatenate(x) for x in (kinds, steps, pos, refs))
    order = np.lexsort((kind_arr, pos_arr, step_arr))
    kind_arr, step_arr, pos_arr, ref_arr = kind_arr[order], step_arr[order], pos_arr[order], ref_arr[order]
    fatal_codes = np.asarray([code[k] for k in sorted(fail_on)], dtype=np.int64)
    fatal = np.isin(kind_arr, fatal_codes)

    make = _FindingFactory(table, fail_on, suspects)
    firsts = np.unique(step_arr * len(KINDS) + kind_arr, return_index=True)[1] if len(kind_arr) else np.zeros(0, int)
    findings = [make(int(kind_arr[i]), int(ref_arr[i]), float(pos_arr[i])) for i in sorted(firsts.tolist())]
    first_drift = None
    last_good = None
    fatal_at = np.flatnonzero(fatal)
    if len(fatal_at):
        i = int(fatal_at[0])
        first_drift = make(int(kind_arr[i]), int(ref_arr[i]), float(pos_arr[i]))
        last_good = _last_good(table, int(step_arr[i]), float(pos_arr[i]))
    counts = {kind: int((kind_arr == code[kind]).sum()) for kind in KINDS}
    curve_step = first_drift.step if first_drift is not None else m.steps[0]
    return DiffResult(
        tolerance=tol,
        first_drift=first_drift,
        last_good=last_good,
        findings=findings,
        counts=counts,
        steps=list(m.steps),
        drifting_steps=sorted(set(step_arr[fatal].tolist())),
        curve_step=curve_step,
        compared=len(m.mu),
        aligned_modules=int(np.count_nonzero(_present(m.p_pair[m.mp], max(len(m.pairs), 1)))),
        unchecked=unchecked,
        steps_only_upstream=m.steps_only_upstream,
        steps_only_port=m.steps_only_port,
        one_sided_modules=m.one_sided_modules,
        fail_on=fail_on,
        upstream_path=upstream.path,
        port_path=port.path,
        module_inputs=bool(m.p_module_input.any()),
        unchecked_inputs=int((np.isnan(table.ratio) & m.p_module_input[m.mp]).sum()),
        alignment_suspects=suspects,
        _table=table,
    )


def _last_good(table: _Table, step: int, pos: float) -> LayerRow | None:
    rows = table.step_rows(step)
    before = rows[(table.match.m_pos[rows] < pos) & ~table.failed[rows] & ~np.isnan(table.ratio[rows])]
    return table.row(int(before[-1])) if len(before) else None


def _unaligned_between(table: _Table, good: LayerRow | None, row: LayerRow) -> list[str]:
    """Port modules with no counterpart whose records lie between the last good record and ``row``.

    Their outputs were never compared, so the error may have been made in any of
    them (FastVideo's attention core applies the rotary embedding and has no
    diffusers module): they come before the caller's own code among the suspects.
    """
    port = table.port
    cols = port.records.columns
    end = int(cols["seq"][row.port_record])
    if good is None:  # nothing before it compared: no window to speak of
        return []
    start = int(cols["seq"][good.port_record])
    inside = table.port_step_window(row.step, start, end)  # per-step index: no scan of every record
    inside = inside[table.port_unaligned[inside]]
    names = [port.module_name(int(module)) for module in cols["module"][inside]]
    return [name for name in dict.fromkeys(names) if name and name != "<unknown>"]


def _ran_before(table: _Table, row: LayerRow) -> list[str]:
    """Port modules that returned before ``row`` was recorded, in its step, in execution order."""
    cols = table.port.records.columns
    before = table.port_step_window(row.step, -math.inf, int(cols["seq"][row.port_record]))
    before = before[table.port_finished[before]]  # outputs: the module had run by then
    return list(dict.fromkeys(table.port.module_name(int(m)) for m in cols["module"][before]))


class _FindingFactory:
    """Builds the few :class:`Finding` objects a report shows, with their one-line messages."""

    def __init__(self, table: _Table, fail_on: frozenset[str], suspects: list[Suspect]) -> None:
        self.table = table
        self.fail_on = fail_on
        self.suspect_of = {suspect.port: suspect for suspect in suspects}

    def __call__(self, kind_code: int, ref: int, position: float) -> Finding:
        kind = KINDS[kind_code]
        t, m = self.table, self.table.match
        if kind == "missing_in_port":
            u = int(m.only_u[ref])
            port_name, upstream_name = m.pairs[int(m.u_pair[u])]
            call = int(t.upstream.records.columns["call"][u])
            label = m.labels[int(m.u_label[u])]
            return Finding(
                kind, int(m.u_step[u]), call, label, port_name, upstream_name, kind in self.fail_on,
                f"upstream {_name(upstream_name)} produced {label} (call {call}) but the port's "
                f"{_name(port_name)} did not" + _batch_note(m, int(m.u_pair[u]), int(m.u_step[u])),
                upstream_record=u,
                position=position,
            )
        if kind == "missing_in_upstream":
            p = int(m.only_p[ref])
            port_name, upstream_name = m.pairs[int(m.p_pair[p])]
            call = int(t.port.records.columns["call"][p])
            label = m.labels[int(m.p_label[p])]
            return Finding(
                kind, int(m.p_step[p]), call, label, port_name, upstream_name, kind in self.fail_on,
                f"port {_name(port_name)} produced {label} (call {call}) but upstream "
                f"{_name(upstream_name)} did not" + _batch_note(m, int(m.p_pair[p]), int(m.p_step[p])),
                port_record=p,
                position=position,
            )
        row = t.row(ref)
        culprit = culprit_upstream = None  # the record's own modules, unless attributed below
        blame, suspects = "own", ()
        unaligned = _unaligned_between(t, _last_good(t, row.step, position), row)
        contradicted = [name for name in _ran_before(t, row) if name in self.suspect_of]
        if m.p_module_input[row.port_record]:
            caller = caller_of(row.port, t.port)
            culprit, culprit_upstream, blame = caller, caller_of(row.upstream, t.upstream), "caller"
            suspects = tuple(dict.fromkeys([*unaligned, caller]))
            if unaligned:  # a module with no counterpart ran in between: it is the first suspect
                culprit, culprit_upstream, blame = unaligned[0], None, "unaligned"
        elif not m.p_module_input.any():  # without inputs, the error may also come from before it
            suspects = tuple(dict.fromkeys([row.port, *unaligned, caller_of(row.port, t.port)]))
        if contradicted:  # values contradicted its pairing while everything before agreed: look there first
            culprit, blame = contradicted[0], "suspect"
            culprit_upstream = self.suspect_of[culprit].upstream
            callers = [caller_of(culprit, t.port)]
            if callers[0]:
                callers.append(caller_of(callers[0], t.port))
            # Its input may already have differed (inputs not recorded): its callers' own code comes next.
            suspects = tuple(dict.fromkeys([culprit, *(c for c in callers if c), *suspects, row.port]))
        return Finding(
            kind, row.step, row.call, row.label, row.port, row.upstream, kind in self.fail_on,
            _message(kind, row, t), row=row, port_record=row.port_record, upstream_record=row.upstream_record,
            position=position, culprit=culprit, culprit_upstream=culprit_upstream, suspects=suspects, blame=blame,
        )


def _message(kind: str, row: LayerRow, table: _Table) -> str:
    if kind == "rank_mismatch":
        return _rank_notes(row, table, kind)
    text = _plain_message(kind, row, table)
    if kind == "drift" and (table.port.ranks is not None or table.upstream.ranks is not None):
        note = _rank_notes(row, table, kind)
        text += f"; {note}" if note else ""
    return text


def _plain_message(kind: str, row: LayerRow, table: _Table) -> str:
    if kind == "shape_mismatch":
        pair = int(table.match.p_pair[row.port_record])
        return (f"shape {_fmt_shape(row.port_shape)} in the port vs {_fmt_shape(row.upstream_shape)} upstream"
                + _batch_note(table.match, pair, row.step))
    if kind == "dtype_mismatch":
        return f"dtype {row.port_dtype} in the port vs {row.upstream_dtype} upstream"
    if kind == "nonfinite":
        cols = table.port.records.columns
        nan, inf = int(cols["nan_count"][row.port_record]), int(cols["inf_count"][row.port_record])
        counts = f"{nan} NaN, {inf} Inf" if nan >= 0 and inf >= 0 else "non-finite stats"
        return f"first NaN/Inf: the port's output has {counts}; upstream's is finite"
    text = f"{row.metric} {number(row.value)} > tol {number(row.limit)}" + (
        f" at the worst element (tol = atol + rtol*|upstream| there; err/tol {number(row.ratio)}, "
        f"max abs err {number(row.max_abs_err)}, rel L2 err {number(row.rel_l2)})"
        if row.check == "elements" else f" (err/tol {number(row.ratio)})"
    )
    if row.port_shape != row.upstream_shape:  # compared as a broadcast: perhaps calls batched on one side only
        text += _batch_note(table.match, int(table.match.p_pair[row.port_record]), row.step)
    return text


def _batch_note(match: _Match, pair: int, step: int) -> str:
    """Why a module's calls did not line up, when one side ran it once and the other several times in that step."""
    hint = match.batching.get((pair, step))
    if hint is None:
        return ""
    side, n = hint
    who, other = ("the port", "upstream's") if side == "port" else ("upstream", "the port's")
    return (f"; {who} batches {n} calls into one (CFG?), but this tensor does not split into {other} "
            f"{n} calls along dim 0")


def _shape(trace: Trace, index: int) -> tuple[int, ...] | None:
    return None if trace.records.columns["numel"][index] < 0 else trace.records.shape_of(index)


def _fmt_shape(shape: tuple[int, ...] | None) -> str:
    return "?" if shape is None else "(" + ", ".join(map(str, shape)) + ")"


def _name(name: str) -> str:
    return repr(name) if name else "<model>"


def _list(values: Iterable[object]) -> str:
    items = [str(v) for v in values]
    if not items:
        return "none"
    return ", ".join(items[:12]) + (f", … ({len(items)} in all)" if len(items) > 12 else "")


__all__ = [
    "DEFAULT_FAIL_ON",
    "KINDS",
    "STAT_CHECKS",
    "DiffResult",
    "Finding",
    "FindingKind",
    "LayerRow",
    "caller_of",
    "diff_traces",
]
