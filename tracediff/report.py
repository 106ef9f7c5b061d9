"""Render a :class:`~tracediff.diff.DiffResult`: rich terminal report, JSON, standalone HTML.

Rendering only reads the result; every decision (what drifts, what is first)
was made by :mod:`tracediff.diff`. Module names come from user models and are
never trusted as markup: the terminal report builds :class:`rich.text.Text`
objects, the HTML report escapes every name.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracediff.config import ENV_INPUTS
from tracediff.diff import DiffResult, Finding, LayerRow, caller_of

#: Rows shown before and after the first drift in the terminal and HTML tables.
CONTEXT_ROWS = 5
#: Curve scale: tolerance used (drift / limit) from 1e-6 to 1e2, log scale.
_CURVE_LO, _CURVE_HI = -6.0, 2.0
_BARS = " ▁▂▃▄▅▆▇█"
#: HTML: draw one marker per point (with a tooltip) up to this many points.
_HTML_MARKERS = 1500
_HTML_TABLE_MAX = 5000


# -- shared wording --------------------------------------------------------------------


def wide_console(stream: Any, *, min_width: int = 120) -> Console:
    """A console on ``stream`` at least ``min_width`` columns wide, so module names stay whole."""
    return Console(file=stream, width=max(Console(file=stream).width, min_width))


def display_name(name: str | None) -> str:
    """A module name for people: the root module is ``<model>``."""
    if name is None:
        return "-"
    return name if name else "<model>"


def headline(result: DiffResult) -> str:
    """The one line that answers the question.

    ``first drift: blocks.7.ffn.fc_in (upstream blocks.7.ffn.net.0.proj), step 0,
    call 0, tensor out: max abs error 3.1e-02 > tol 1.0e-05``
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
    for line in _detail_lines(result):
        console.print(Text("  " + line), soft_wrap=True)
    rows, hit = context_rows(result, context=context)
    if rows:
        title = "closest to tolerance" if ok else f"layers around the first drift (step {result.curve_step})"
        console.print(_table(rows, hit, title=title, width=console.width))
    ratio, _ = result.curve()
    if len(ratio):
        width = max(min(console.width - 1, 120), 20)
        console.print(_curve(ratio, result.first_drift_index if not ok else None, step=result.curve_step, width=width))


def _detail_lines(result: DiffResult) -> list[str]:
    lines = []
    first = result.first_drift
    if first is not None:
        good = result.last_good
        lines.append(
            "last good: "
            + (
                f"{display_name(good.port)} (upstream {display_name(good.upstream)}), call {good.call}, "
                f"tensor {good.label}, drift {_num(good.drift)}"
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
    else:
        for finding in result.findings[:3]:
            lines.append(f"note: {finding.kind.replace('_', ' ')} at {display_name(finding.port)}: {finding.message}")
    if first is not None:  # without a drift the headline already says all this
        lines.append(
            f"compared {result.compared} records of {result.aligned_modules} aligned modules, "
            f"step{'s' if len(result.steps) != 1 else ''} {_steps(result.steps)}; {result.tolerance.describe()}"
        )
    skipped = []
    if result.unchecked:
        reshaped = (f" ({result.unchecked_inputs} of them module inputs of another shape on each side)"
                    if result.unchecked_inputs else "")
        skipped.append(f"{result.unchecked} records had nothing comparable{reshaped}")
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
    # Names get what the other columns (about 64 characters) leave; past that they fold.
    room = max((width - 64) // 2, 8)
    name_width = {
        "port module": min(max((len(display_name(r.port)) for r in rows), default=8), room),
        "upstream module": min(max((len(display_name(r.upstream)) for r in rows), default=8), room),
        "check": 8,
    }
    for column, justify in (
        ("#", "right"), ("port module", "left"), ("upstream module", "left"), ("call", "right"),
        ("tensor", "left"), ("drift", "right"), ("tol used", "right"), ("check", "left"),
    ):
        # Module names fold rather than being cut: the name is the answer.
        table.add_column(column, justify=justify, overflow="fold", min_width=name_width.get(column))  # type: ignore[arg-type]
    for i, row in enumerate(rows):
        style = "bold red" if i == hit else ("red" if row.failed else "")
        table.add_row(
            Text(str(row.index)), Text(display_name(row.port)), Text(display_name(row.upstream)),
            Text(str(row.call)), Text(row.label), Text(_num(row.drift)),
            Text(_num(row.ratio) + (" ✗" if row.failed else "  ")), Text(row.check or "-"),
            style=style,
        )
    return table


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
        f"drift curve, step {step}, {n} records (tolerance used, a bar step per decade: "
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
    """Everything a machine needs, as plain JSON types (NaN and infinities become ``null``)."""
    return {
        "ok": bool(result),
        "headline": headline(result),
        "upstream": result.upstream_path,
        "port": result.port_path,
        "tolerance": result.tolerance.to_dict(),
        "fail_on": sorted(result.fail_on),
        "steps": result.steps,
        "drifting_steps": result.drifting_steps,
        "curve_step": result.curve_step,
        "compared": result.compared,
        "aligned_modules": result.aligned_modules,
        "unchecked": result.unchecked,
        "unchecked_inputs": result.unchecked_inputs,
        "one_sided_modules": result.one_sided_modules,
        "steps_only_upstream": result.steps_only_upstream,
        "steps_only_port": result.steps_only_port,
        "counts": result.counts,
        "first_drift": _finding_dict(result.first_drift) if result.first_drift is not None else None,
        "last_good": _row_dict(result.last_good) if result.last_good is not None else None,
        "findings": [_finding_dict(f) for f in result.findings],
        "rows": [_row_dict(r) for r in result.rows],
        "alignment_suspects": [s.to_dict() for s in result.alignment_suspects],
    }



def _finding_dict(finding: Finding) -> dict[str, Any]:
    return {
        "kind": finding.kind,
        "fatal": finding.fatal,
        "step": finding.step,
        "call": finding.call,
        "tensor": finding.label,
        "port": finding.port,
        "upstream": finding.upstream,
        "culprit": finding.culprit,
        "culprit_upstream": finding.culprit_upstream,
        "suspects": list(finding.suspects),
        "before_call": finding.before_call,
        "blame": finding.blame,
        "message": finding.message,
        "metric": finding.metric,
        "value": _clean(finding.value),
        "limit": _clean(finding.limit),
        "port_record": finding.port_record,
        "upstream_record": finding.upstream_record,
    }


def _row_dict(row: LayerRow) -> dict[str, Any]:
    return {
        "index": row.index,
        "step": row.step,
        "call": row.call,
        "tensor": row.label,
        "port": row.port,
        "upstream": row.upstream,
        "drift": _clean(row.drift),
        "ratio": _clean(row.ratio),
        "check": row.check,
        "value": _clean(row.value),
        "limit": _clean(row.limit),
        "failed": row.failed,
        "elements": row.elements,
        "max_abs_err": _clean(row.max_abs_err),
        "rel_l2": _clean(row.rel_l2),
        "cosine": _clean(row.cosine),
        "sqnr_db": _clean(row.sqnr_db),
        "stat_drift": {k: _clean(v) for k, v in row.stat_drift.items()},
        "port_shape": list(row.port_shape) if row.port_shape is not None else None,
        "upstream_shape": list(row.upstream_shape) if row.upstream_shape is not None else None,
        "port_dtype": row.port_dtype,
        "upstream_dtype": row.upstream_dtype,
    }


def _clean(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# -- HTML ------------------------------------------------------------------------------


def to_html(result: DiffResult, *, title: str = "tracediff first-drift report") -> str:
    """A standalone page: headline, SVG drift chart, tables. No scripts, no external resources."""
    esc = _esc
    ok = result.first_drift is None
    rows, hit = context_rows(result)
    details = "".join(f"<li>{esc(line)}</li>" for line in _detail_lines(result))
    around = _html_table(rows, hit)
    all_rows = result.rows[:_HTML_TABLE_MAX]
    more = len(result.rows) - len(all_rows)
    full = _html_table(all_rows, result.first_drift_index if not ok else None)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
h1 {{ font-size: 1.3em; }}
.headline {{ font-family: ui-monospace, monospace; padding: .6em; border-radius: 4px;
  background: {'#e8f5e9' if ok else '#ffebee'}; border: 1px solid {'#66bb6a' if ok else '#e57373'}; }}
table {{ border-collapse: collapse; font-family: ui-monospace, monospace; font-size: .85em; margin: 1em 0; }}
th, td {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; }}
td.num {{ text-align: right; }}
tr.failed td {{ color: #c62828; }}
tr.first td {{ background: #ffcdd2; font-weight: bold; }}
svg text {{ font-family: system-ui, sans-serif; font-size: 11px; }}
</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="headline">{esc(headline(result))}</p>
<ul>{details}</ul>
<p>upstream: <code>{esc(result.upstream_path)}</code><br>port: <code>{esc(result.port_path)}</code></p>
<h2>Drift per aligned layer (step {result.curve_step})</h2>
{svg_chart(result)}
<h2>{'Closest to tolerance' if ok else 'Layers around the first drift'}</h2>
{around}
<details><summary>All {len(result.rows)} compared records of step {result.curve_step}
{f'(first {len(all_rows)} shown)' if more > 0 else ''}</summary>
{full}
</details>
</body></html>
"""


def write_html(result: DiffResult, path: str | Path) -> Path:
    """Write :func:`to_html` to ``path`` (UTF-8) and return the path."""
    target = Path(path)
    target.write_text(to_html(result), encoding="utf-8")
    return target


def svg_chart(result: DiffResult, *, width: int = 960, height: int = 320) -> str:
    """Inline SVG: tolerance used per record (log scale) in port execution order.

    The dashed line at 1 is the tolerance (whatever per-module override applied,
    since each point is already divided by its own limit); points above it
    break tolerance, and the first drift is ringed and labelled.
    """
    ratio, drift = result.curve()
    rows_needed = len(ratio) <= _HTML_MARKERS
    left, right, top, bottom = 60, 20, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(ratio)
    if not n:
        return "<p>(no compared records)</p>"
    finite = ratio[np.isfinite(ratio) & (ratio > 0)]
    lo = math.floor(min(np.log10(finite.min()) if len(finite) else -6.0, -1.0))
    lo = max(lo, -12)
    hi = math.ceil(max(np.log10(finite.max()) if len(finite) else 0.0, 1.0))

    def x_of(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y_of(r: float) -> float:
        if math.isnan(r):
            return math.nan
        value = hi if math.isinf(r) else (lo if r <= 0 else min(max(math.log10(r), lo), hi))
        return top + plot_h * (hi - value) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="drift per layer">']
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>')
    for decade in range(lo, hi + 1):
        y = y_of(10.0**decade)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">1e{decade}</text>')
    y_tol = y_of(1.0)
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y_tol:.1f}" y2="{y_tol:.1f}" '
                 'stroke="#c62828" stroke-dasharray="6 4"/>')
    parts.append(f'<text x="{left + plot_w - 4}" y="{y_tol - 4:.1f}" text-anchor="end" fill="#c62828">tolerance</text>')
    points = " ".join(f"{x_of(i):.1f},{y_of(float(r)):.1f}" for i, r in enumerate(ratio) if not math.isnan(r))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#1565c0" stroke-width="1.2"/>')
    rows = result.rows if rows_needed else None
    for i, r in enumerate(ratio.tolist()):
        if math.isnan(r) or (not rows_needed and r <= 1):
            continue
        color = "#c62828" if r > 1 else "#1565c0"
        tip = ""
        if rows is not None:
            row = rows[i]
            tip = (f"<title>#{i} {_esc(display_name(row.port))} (upstream {_esc(display_name(row.upstream))}) "
                   f"{_esc(row.label)}: drift {_num(float(drift[i]))}, tolerance used {_num(r)}</title>")
        parts.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(r):.1f}" r="2.5" fill="{color}">{tip}</circle>')
    at = result.first_drift_index
    first = result.first_drift
    if first is not None and at is not None and at < n:
        x, y = x_of(at), y_of(float(ratio[at]))
        if math.isnan(y):
            y = y_tol
        anchor = "end" if x > left + plot_w * 0.7 else "start"
        dx = -10 if anchor == "end" else 10
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="none" stroke="#c62828" stroke-width="2"/>')
        parts.append(f'<text x="{x + dx:.1f}" y="{max(y - 10, top + 12):.1f}" text-anchor="{anchor}" fill="#c62828">'
                     f"first drift: {_esc(display_name(first.culprit))}</text>")
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">'
                 f"aligned records in port execution order (step {result.curve_step}), {n} in all</text>")
    parts.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">drift / tolerance</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _html_table(rows: list[LayerRow], hit: int | None) -> str:
    head = ("#", "port module", "upstream module", "call", "tensor", "drift", "tol used", "check", "max abs err",
            "rel L2", "cosine", "SQNR dB", "shape", "dtype")
    out = ["<table><thead><tr>", *(f"<th>{_esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = "first" if i == hit else ("failed" if row.failed else "")
        cells = [
            (str(row.index), True), (display_name(row.port), False), (display_name(row.upstream), False),
            (str(row.call), True), (row.label, False), (_num(row.drift), True), (_num(row.ratio), True),
            (row.metric, False), (_num(row.max_abs_err), True), (_num(row.rel_l2), True), (_num(row.cosine), True),
            (_num(row.sqnr_db), True), (_shape(row.port_shape), False),
            (row.port_dtype + ("" if row.port_dtype == row.upstream_dtype else f" / {row.upstream_dtype}"), False),
        ]
        out.append(f'<tr class="{cls}">' + "".join(
            f'<td class="num">{_esc(v)}</td>' if num else f"<td>{_esc(v)}</td>" for v, num in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# -- formatting ------------------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def _shape(shape: tuple[int, ...] | None) -> str:
    return "?" if shape is None else "×".join(map(str, shape)) or "()"


def _steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) > 3 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}–{steps[-1]}"
    shown = ", ".join(map(str, steps[:10]))
    return shown + (f", … ({len(steps)} in all)" if len(steps) > 10 else "")
