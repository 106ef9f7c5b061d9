"""The outcome of a diff: what was compared, the findings, the first fatal one; truthy when clean."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from tracediff.align.alignment import Suspect
from tracediff.diff.finding import DEFAULT_FAIL_ON, Finding, LayerRow
from tracediff.diff.table import RecordTable
from tracediff.results import json_ready
from tracediff.store.trace import Trace
from tracediff.tolerance import Tolerance


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
    #: the checked record pairs behind ``rows`` (rows of every step are built from it on demand)
    table: InitVar[RecordTable | None] = None
    _table: RecordTable | None = field(default=None, init=False, repr=False)

    def __post_init__(self, table: RecordTable | None) -> None:
        self._table = table

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


    def step_rows(self, step: int) -> list[LayerRow]:
        """Every compared record of ``step``, in port execution order (:attr:`rows` for the curve step)."""
        if step == self.curve_step:
            return self.rows
        if self._table is None:
            return []
        return [self._table.row(int(i)) for i in self._table.step_rows(step)]

    def step_row_count(self, step: int) -> int:
        """``len(self.step_rows(step))`` without building the rows."""
        if step == self.curve_step:
            return len(self.rows)
        return 0 if self._table is None else len(self._table.step_rows(step))

    def to_json(self) -> dict[str, Any]:
        """The diff's data as JSON: the verdict, what was compared, the findings and the curve step's rows."""
        return json_ready({
            "ok": bool(self),
            "upstream": self.upstream_path,
            "port": self.port_path,
            "tolerance": self.tolerance.to_dict(),
            "fail_on": sorted(self.fail_on),
            "steps": self.steps,
            "drifting_steps": self.drifting_steps,
            "curve_step": self.curve_step,
            "compared": self.compared,
            "aligned_modules": self.aligned_modules,
            "unchecked": self.unchecked,
            "unchecked_inputs": self.unchecked_inputs,
            "one_sided_modules": self.one_sided_modules,
            "steps_only_upstream": self.steps_only_upstream,
            "steps_only_port": self.steps_only_port,
            "counts": self.counts,
            "first_drift": self.first_drift,
            "last_good": self.last_good,
            "findings": self.findings,
            "rows": self.rows,
            "alignment_suspects": [suspect.to_dict() for suspect in self.alignment_suspects],
        })
