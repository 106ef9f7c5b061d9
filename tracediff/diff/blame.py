"""Which port module to blame for a finding: the record's own, its caller, or one that ran unchecked before it.

A record that already differs when its module is called (a module input) was made wrong by the caller's own
code; a module with no upstream counterpart that ran since the last good record may hold the error too; a
module whose values contradicted its presumed counterpart (an alignment suspect) is looked at first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tracediff.align.alignment import NEVER_CALLED, Suspect
from tracediff.diff.finding import LayerRow
from tracediff.diff.table import RecordTable
from tracediff.store.trace import Trace


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


def last_good(table: RecordTable, step: int, pos: float) -> LayerRow | None:
    """The last compared record of ``step`` before position ``pos`` that is within tolerance."""
    rows = table.step_rows(step)
    before = rows[(table.match.m_pos[rows] < pos) & ~table.failed[rows] & ~np.isnan(table.ratio[rows])]
    return table.row(int(before[-1])) if len(before) else None


@dataclass(frozen=True)
class Blame:
    """Who is blamed for a finding at a compared record (the fields of the same names on ``Finding``)."""

    culprit: str | None = None  # None: the record's own modules
    culprit_upstream: str | None = None
    blame: str = "own"
    suspects: tuple[str, ...] = ()


def blame_for(table: RecordTable, row: LayerRow, position: float, suspect_of: dict[str, Suspect]) -> Blame:
    """Attribute the finding at ``row`` (at ``position`` in port order); ``suspect_of``: alignment suspects by port."""
    m = table.match
    culprit = culprit_upstream = None  # the record's own modules, unless attributed below
    blame = "own"
    suspects: tuple[str, ...] = ()
    unaligned = _unaligned_between(table, last_good(table, row.step, position), row)
    contradicted = [name for name in _ran_before(table, row) if name in suspect_of]
    if m.p_module_input[row.port_record]:
        caller = caller_of(row.port, table.port)
        culprit, culprit_upstream, blame = caller, caller_of(row.upstream, table.upstream), "caller"
        suspects = tuple(dict.fromkeys([*unaligned, caller]))
        if unaligned:  # a module with no counterpart ran in between: it is the first suspect
            culprit, culprit_upstream, blame = unaligned[0], None, "unaligned"
    elif not m.p_module_input.any():  # without inputs, the error may also come from before it
        suspects = tuple(dict.fromkeys([row.port, *unaligned, caller_of(row.port, table.port)]))
    if contradicted:  # values contradicted its pairing while everything before agreed: look there first
        culprit, blame = contradicted[0], "suspect"
        culprit_upstream = suspect_of[culprit].upstream
        callers = [caller_of(culprit, table.port)]
        if callers[0]:
            callers.append(caller_of(callers[0], table.port))
        # Its input may already have differed (inputs not recorded): its callers' own code comes next.
        suspects = tuple(dict.fromkeys([culprit, *(c for c in callers if c), *suspects, row.port]))
    return Blame(culprit, culprit_upstream, blame, suspects)


def _unaligned_between(table: RecordTable, good: LayerRow | None, row: LayerRow) -> list[str]:
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


def _ran_before(table: RecordTable, row: LayerRow) -> list[str]:
    """Port modules that returned before ``row`` was recorded, in its step, in execution order."""
    cols = table.port.records.columns
    before = table.port_step_window(row.step, -math.inf, int(cols["seq"][row.port_record]))
    before = before[table.port_finished[before]]  # outputs: the module had run by then
    return list(dict.fromkeys(table.port.module_name(int(m)) for m in cols["module"][before]))
