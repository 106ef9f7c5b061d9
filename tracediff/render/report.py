"""Render a :class:`~tracediff.diff.DiffResult`: rich terminal report and JSON (HTML: :mod:`tracediff.render.html`).

Rendering only reads the result; every decision (what drifts, what is first)
was made by :mod:`tracediff.diff`. Module names come from user models and are
never trusted as markup: the terminal report builds :class:`rich.text.Text`
objects, the HTML report escapes every name. Column names, metric names and
number formatting come from :mod:`tracediff.vocabulary`, shared by all three.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracediff.config import ENV_INPUTS
from tracediff.diff import DiffResult, Finding, LayerRow, caller_of
from tracediff.vocabulary import COLUMNS, LEGEND, TERMINAL_COLUMNS, error_summary, number

#: Rows shown before and after the first drift in the terminal and HTML tables.
CONTEXT_ROWS = 5
#: Curve scale: err/tol (value / limit) from 1e-6 to 1e2, log scale.
_CURVE_LO, _CURVE_HI = -6.0, 2.0
_BARS = " ▁▂▃▄▅▆▇█"
#: Width of a console on a pipe or file: tables take only what they need, so names are never folded or cut.
PIPE_WIDTH = 1000


# -- shared wording --------------------------------------------------------------------


def wide_console(stream: Any = None, *, min_width: int = 120) -> Console:
    """A console on ``stream`` (default stdout) where module names stay whole.

    On a terminal: at least ``min_width`` columns (names fold, never cut). On a
    pipe or a file (a CI log, ``| tee``): :data:`PIPE_WIDTH` columns whatever
    ``COLUMNS`` says, since a log has no width and a cut name (``blocks…``) is
    useless there; tables still take only the width they need.
    """
    stream = sys.stdout if stream is None else stream
    probe = Console(file=stream)
    if not probe.is_terminal:
        return Console(file=stream, width=PIPE_WIDTH, color_system=None, force_terminal=False)
    return Console(file=stream, width=max(probe.width, min_width))


def display_name(name: str | None) -> str:
    """A module name for people: the root module is ``<model>``."""
    if name is None:
        return "-"
    return name if name else "<model>"


def failure_lines(failures: dict[str, dict[str, str]]) -> list[str]:
    """Recording failures, one line each: ``{side: {module: error}}`` -> ``side: recording 'm' failed (Type: …)``.

    Each error is cut to its type and first sentence (:func:`~tracediff.vocabulary.error_summary`, for traces
    written before the recorder did so), and the same module failing the same way on both sides is one line.
    """
    merged: dict[tuple[str, str], list[str]] = {}
    for side, failed in failures.items():
        for module, error in failed.items():
            sides = merged.setdefault((module, error_summary(error)), [])
            if side not in sides:
                sides.append(side)
    return [
        (f"{' and '.join(s for s in sides if s)}: " if any(sides) else "")
        + f"recording {display_name(module)!r} failed ({error}); its records are skipped"
        for (module, error), sides in merged.items()
    ]


def headline(result: DiffResult) -> str:
    """The one line that answers the question.

    ``first drift: blocks.7.ffn.fc_in (upstream blocks.7.ffn.net.0.proj), step 0,
    call 0, tensor out: abs error 3.1e-02 > tol 1.0e-05 at the worst element (…)``
    """
    first = result.first_drift
    if first is None:
        return (
            f"no drift: {result.compared} records of {result.aligned_modules} aligned modules within tolerance "
            f"in step{'s' if len(result.steps) != 1 else ''} {_steps(result.steps)} ({result.tolerance.describe()})"
        )
    what = first.message if first.kind == "drift" else f"{first.kind.replace('_', ' ')}: {first.message}"
    if first.blame == "unaligned":
        rest = [display_name(name) for name in first.suspects[1:]]
        return (
            f"first drift: {display_name(first.culprit)} (no upstream counterpart), step {first.step}: it ran "
            f"after the last good record and before {display_name(first.port)} (upstream "
            f"{display_name(first.upstream)}), whose {first.label} (call {first.call}) already differs: {what}"
            + (f"; next suspect: {', '.join(rest)}'s own code" if rest else "")
        )
    if first.blame == "suspect":
        return (
            f"first drift: {display_name(first.culprit)} (alignment suspect: upstream "
            f"{display_name(first.culprit_upstream)} by order and shape only), step {first.step}: its output "
            f"already differs grossly from that module's while everything before it agrees, and the next compared "
            f"record, {display_name(first.port)}'s {first.label} (call {first.call}), differs: {what}"
        )
    if first.before_call:
        return (
            f"first drift: {display_name(first.culprit)} (upstream {display_name(first.culprit_upstream)}), "
            f"step {first.step}: its own code, before it calls {display_name(first.port)} "
            f"(upstream {display_name(first.upstream)}), whose {first.label} (call {first.call}) "
            f"already differs: {what}"
        )
    return (
        f"first drift: {display_name(first.port)} (upstream {display_name(first.upstream)}), "
        f"step {first.step}, call {first.call}, tensor {first.label}: {what}"
    )


def context_rows(result: DiffResult, *, context: int = CONTEXT_ROWS) -> tuple[list[LayerRow], int | None]:
    """Rows around the first drift, or the ones closest to tolerance when nothing drifts.

    Returns:
        ``(rows, highlighted)``: ``highlighted`` indexes the first drift's row in ``rows``.
    """
    rows = result.rows
    at = result.first_drift_index
    if at is None:
        ranked = sorted((r for r in rows if r.checked), key=lambda r: -r.ratio)[: 2 * context]
        return sorted(ranked, key=lambda r: r.index), None
    start = max(at - context, 0)
    shown = rows[start : at + context + 1]
    first = result.first_drift
    hit = at - start if first is not None and first.row is not None and at < len(rows) else None
    return shown, hit


# -- terminal --------------------------------------------------------------------------


def render_terminal(result: DiffResult, console: Console | None = None, *, context: int = CONTEXT_ROWS) -> None:
    """Print the headline, the layers around the first drift, and the drift curve."""
    console = console or Console()
    ok = result.first_drift is None
    console.print(Text(headline(result), style="bold green" if ok else "bold red"), soft_wrap=True)
    for line in detail_lines(result):
        console.print(Text("  " + line), soft_wrap=True)
    rows, hit = context_rows(result, context=context)
    if rows:
        title = "closest to tolerance" if ok else f"layers around the first drift (step {result.curve_step})"
        console.print(_table(rows, hit, title=title, width=console.width))
        console.print(Text(LEGEND, style="dim"), soft_wrap=True)
    ratio, _ = result.curve()
    if len(ratio):
        width = max(min(console.width - 1, 120), 20)
        console.print(_curve(ratio, result.first_drift_index if not ok else None, step=result.curve_step, width=width))


def detail_lines(result: DiffResult) -> list[str]:
    """The lines under the headline (last good, later steps, notes, what was compared and what was not)."""
    lines = []
    first = result.first_drift
    if first is not None:
        good = result.last_good
        lines.append(
            "last good: "
            + (
                f"{display_name(good.port)} (upstream {display_name(good.upstream)}), call {good.call}, "
                f"tensor {good.label}, err/tol {number(good.ratio)}"
                if good is not None
                else f"none: the first compared record of step {first.step} already breaks tolerance"
            )
        )
        port_trace = result.port_trace
        if not first.before_call and not result.module_inputs and first.port and port_trace is not None:
            others = [display_name(name) for name in first.suspects[1:]] or [
                display_name(caller_of(first.port, port_trace))]
            lines.append(
                f"module inputs were not recorded: if {display_name(first.port)}'s own code is right, the error was "
                f"made before it ran, in {' or '.join(others)}; trace with {ENV_INPUTS}=1 to tell"
            )
        later = [s for s in result.drifting_steps if s != first.step]
        if later:
            lines.append(f"also drifts in step{'s' if len(later) > 1 else ''} {_steps(later)}")
        for finding in _notes_before(result):
            lines.append(f"note before it: {finding.kind.replace('_', ' ')} at {display_name(finding.port)}: "
                         f"{finding.message}")
    for suspect in result.alignment_suspects:
        lines.append(
            f"alignment suspect (not a finding): upstream {display_name(suspect.upstream)} and port "
            f"{display_name(suspect.port)} were left unpaired: {suspect.reason}; if they are the same module, "
            f"put {suspect.hint()} in a map file (--map)"
        )
    if first is None:  # non-fatal findings of a passing diff (with a drift, notes before it are listed above)
        for finding in result.findings[:3]:
            lines.append(f"note: {finding.kind.replace('_', ' ')} at {display_name(finding.port)}: {finding.message}")
    if first is not None:  # without a drift the headline already says all this
        lines.append(
            f"compared {result.compared} records of {result.aligned_modules} aligned modules, "
            f"step{'s' if len(result.steps) != 1 else ''} {_steps(result.steps)}; {result.tolerance.describe()}"
        )
    skipped = []
    if result.unchecked_inputs:
        skipped.append(
            f"{_count(result.unchecked_inputs, 'module input')} not checked: shaped differently on the two sides "
            "(another layout or packing of the same data; module outputs of another shape are findings)")
    if result.unchecked > result.unchecked_inputs:
        skipped.append(f"{_count(result.unchecked - result.unchecked_inputs, 'record')} not checked: no statistic "
                       "or element recorded on both sides")
    if result.one_sided_modules:
        skipped.append(f"{result.one_sided_modules} aligned modules were traced on one side only")
    if result.steps_only_upstream or result.steps_only_port:
        skipped.append(
            f"steps only upstream: {_steps(result.steps_only_upstream)}, only port: {_steps(result.steps_only_port)}"
        )
    if skipped:
        lines.append("; ".join(skipped))
    return lines


def _notes_before(result: DiffResult) -> list[Finding]:
    """Non-fatal findings in the first drift's step that come before it (a likely explanation)."""
    first = result.first_drift
    if first is None:
        return []
    return [
        f
        for f in result.findings
        if not f.fatal and f.step == first.step and f.position < first.position
    ][:3]


def _table(rows: list[LayerRow], hit: int | None, *, title: str, width: int) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    # Names get what the other columns (about 70 characters) leave; past that they fold, never cut.
    room = max((width - 70) // 2, 8)
    name_width = {
        "port module": min(max((len(display_name(r.port)) for r in rows), default=8), room),
        "upstream module": min(max((len(display_name(r.upstream)) for r in rows), default=8), room),
    }
    for column in TERMINAL_COLUMNS:
        justify = "left" if column.header in ("port module", "upstream module", "tensor", "check") else "right"
        table.add_column(column.header, justify=justify, overflow="fold",  # type: ignore[arg-type]
                         min_width=name_width.get(column.header))
    for i, row in enumerate(rows):
        style = "bold red" if i == hit else ("red" if row.failed else "")
        table.add_row(*(Text(cell) for cell in table_cells(row, TERMINAL_COLUMNS)), style=style)
    return table


def table_cells(row: LayerRow, columns: tuple[Any, ...] = COLUMNS) -> list[str]:
    """A row's cells under ``columns`` (:data:`tracediff.vocabulary.COLUMNS`), as every table prints them."""
    values = {
        "#": str(row.index),
        "port module": display_name(row.port),
        "upstream module": display_name(row.upstream),
        "call": str(row.call),
        "tensor": row.label,
        "check": row.check or "-",
        "error": number(row.value),
        "tol": number(row.limit),
        "err/tol": number(row.ratio) + (" ✗" if row.failed else "  "),
        "rel L2 err": number(row.rel_l2),
        "max abs err": number(row.max_abs_err),
        "SQNR dB": number(row.sqnr_db),
        "shape": shape_text(row.port_shape) + ("" if row.port_shape == row.upstream_shape
                                           else f" / {shape_text(row.upstream_shape)}"),
        "dtype": row.port_dtype + ("" if row.port_dtype == row.upstream_dtype else f" / {row.upstream_dtype}"),
    }
    return [values[column.header] for column in columns]


def curve_levels(ratio: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket a ratio curve into ``width`` columns: ``(bar level 0..8, bucket max ratio)``."""
    n = len(ratio)
    buckets = min(width, n)
    edges = (np.arange(buckets + 1) * n) // buckets
    filled = np.where(np.isnan(ratio), 0.0, ratio)
    peak = np.maximum.reduceat(filled, edges[:-1])
    with np.errstate(divide="ignore"):
        logs = np.log10(np.maximum(peak, 1e-30))
    # One level per decade: level 6 is (0.1, 1] (within tolerance), 7 is (1, 10], 8 above.
    level = np.clip(np.ceil((logs - _CURVE_LO) / (_CURVE_HI - _CURVE_LO) * 8), 0, 8).astype(int)
    level[(peak > 0) & (level == 0)] = 1
    return level, peak


def _curve(ratio: np.ndarray, first: int | None, *, step: int, width: int) -> Text:
    level, peak = curve_levels(ratio, width)
    n = len(ratio)
    text = Text(
        f"drift curve, step {step}, {n} records (err/tol, a bar step per decade: "
        "▆ up to tol, ▇ █ over, · identical)\n",
        style="dim",
    )
    for lvl, top in zip(level.tolist(), peak.tolist(), strict=True):
        bar = "·" if top == 0 else _BARS[lvl]
        text.append(bar, style="red" if top > 1 else ("yellow" if top > 0.1 else "green"))
    if first is not None and n:
        column = min(first * len(level) // n, len(level) - 1)
        text.append("\n" + " " * column + "▲ first drift", style="bold red")
    return text


# -- JSON ------------------------------------------------------------------------------


def to_json(result: DiffResult) -> dict[str, Any]:
    """Everything a machine needs, as plain JSON types (NaN and infinities become ``null``).

    The result's own data (:meth:`~tracediff.diff.DiffResult.to_json`) with the words a person reads added: the
    headline and what each table column means.
    """
    data = result.to_json()
    return {
        "ok": data.pop("ok"),
        "headline": headline(result),
        **data,
        "columns": [{"column": c.header, "key": c.key, "meaning": c.meaning} for c in COLUMNS],
    }


# -- formatting ------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def shape_text(shape: tuple[int, ...] | None) -> str:
    """A shape as the tables print it: ``2×16×64``, ``()`` for a scalar, ``?`` when not recorded."""
    return "?" if shape is None else "×".join(map(str, shape)) or "()"


def _steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) > 3 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}–{steps[-1]}"
    shown = ", ".join(map(str, steps[:10]))
    return shown + (f", … ({len(steps)} in all)" if len(steps) > 10 else "")
