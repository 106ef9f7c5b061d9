"""The standalone HTML report: one offline file with an interactive drift chart.

What the page holds: the headline and detail lines (the same words as the
terminal, :mod:`tracediff.vocabulary`), a chart of err/tol per record that
fills the window's width (block labels on the x-axis, zoom by dragging a range,
the mouse wheel or the from/to fields), a step selector over every compared
step, a details panel for the record clicked (in the chart or the table), the
table around the first drift and a table of the records in view.

The data is embedded as JSON in a ``<script type="application/json">`` block
and drawn by a small inline script: no CDN, no external resource, nothing
fetched. Module names come from user models: the JSON escapes ``<``, ``>``,
``&`` and quotes, the script only ever sets ``textContent``, and the static
parts are HTML-escaped. Without JavaScript the static chart of the first
drift's step and its tables still read.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tracediff.diff import DiffResult, LayerRow
from tracediff.render.report import context_rows, detail_lines, display_name, headline, shape_text, table_cells
from tracediff.vocabulary import COLUMNS, LEGEND, number

#: Records embedded for the step selector, over all steps (the first drift's step always whole).
MAX_EMBEDDED_ROWS = 200_000
#: The static chart draws one marker per point up to this many points.
_STATIC_MARKERS = 1500


def to_html(result: DiffResult, *, title: str = "tracediff first-drift report") -> str:
    """A standalone page: headline, interactive drift chart, step selector, record details, tables."""
    esc = _esc
    ok = result.first_drift is None
    rows, hit = context_rows(result)
    details = "".join(f"<li>{esc(line)}</li>" for line in detail_lines(result))
    around = _html_table(rows, hit)
    data = report_data(result)
    steps = data["steps"]
    options = "".join(
        f'<option value="{i}"{" selected" if s["step"] == result.curve_step else ""}>step {s["step"]}'
        f'{" ✗" if s["drifts"] else ""}</option>'
        for i, s in enumerate(steps)
    )
    left_out = data["steps_left_out"]
    more = (f'<p class="note">steps {esc(", ".join(map(str, left_out)))} not embedded (over '
            f"{MAX_EMBEDDED_ROWS} records in all): run first-drift --step N --html for one of them</p>"
            if left_out else "")
    legend = "".join(f"<dt>{esc(c.header)}</dt><dd>{esc(c.meaning)} <code>{esc(c.key)}</code></dd>" for c in COLUMNS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{_CSS.replace("@OK_BG@", "#e8f5e9" if ok else "#ffebee").replace("@OK_BORDER@", "#66bb6a" if ok else "#e57373")}
</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="headline">{esc(headline(result))}</p>
<ul>{details}</ul>
<p>upstream: <code>{esc(result.upstream_path)}</code><br>port: <code>{esc(result.port_path)}</code></p>
<h2>err/tol per aligned record</h2>
<div class="controls">
<label>step <select id="step">{options}</select></label>
<label>records <input id="from" type="number" min="0" step="1" value="0"></label>
<label>to <input id="to" type="number" min="0" step="1" value="0"></label>
<button id="reset" type="button">whole step</button>
<span id="range"></span>
</div>
{more}
<div id="chart-box">
{svg_chart(result)}
</div>
<p class="hint">Click a point for its details; drag across the chart to zoom into a range, scroll to zoom, \
"whole step" to zoom out. Points above the dashed line break tolerance.</p>
<div id="details" class="details"><p>Click a point or a table row.</p></div>
<h2>{'Closest to tolerance' if ok else 'Layers around the first drift'} (step {result.curve_step})</h2>
<div class="scroll" id="around">{around}</div>
<p class="legend">{esc(LEGEND)}</p>
<h2>Records in view</h2>
<div class="scroll"><table id="records"><thead><tr>{"".join(f"<th>{esc(c.header)}</th>" for c in COLUMNS)}</tr>\
</thead><tbody id="records-body"></tbody></table></div>
<details><summary>Columns</summary><dl class="columns">{legend}</dl>
<p>cosine similarity is in the JSON report only: for the small errors a parity test looks at it is
1 - (rel L2 err)²/2, which reads 1.00 until rel L2 err passes about 0.1.</p></details>
<script type="application/json" id="tracediff-data">{_json_for_script(data)}</script>
<script>{_JS}</script>
</body></html>
"""


def write_html(result: DiffResult, path: str | Path) -> Path:
    """Write :func:`to_html` to ``path`` (UTF-8) and return the path."""
    target = Path(path)
    target.write_text(to_html(result), encoding="utf-8")
    return target


def block_of(name: str) -> str:
    """The block a module belongs to, for x-axis labels: the name up to its first index.

    ``transformer_blocks.2.ffn.act`` -> ``transformer_blocks.2``; ``patch_embed.proj`` -> ``patch_embed``;
    the root -> ``<model>``.
    """
    if not name:
        return "<model>"
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def block_starts(names: list[str]) -> list[tuple[int, str]]:
    """``(record index, block)`` where the block of the port module changes, in execution order."""
    out: list[tuple[int, str]] = []
    previous = None
    for i, name in enumerate(names):
        block = block_of(name)
        if block != previous:
            out.append((i, block))
            previous = block
    return out


def report_data(result: DiffResult) -> dict[str, Any]:
    """What the page's script draws: every embedded step's records, column-wise, names interned."""
    names: dict[str, int] = {}

    def intern(value: str) -> int:
        return names.setdefault(value, len(names))

    steps_out: list[dict[str, Any]] = []
    budget = MAX_EMBEDDED_ROWS
    left_out: list[int] = []
    for step in result.steps:
        # counted before the rows are built: on a large trace most steps are left out, and building
        # their rows (a Python object each) would cost more than all the rest of first-drift --html
        if step != result.curve_step and _step_count(result, step) > budget:
            left_out.append(step)
            continue
        rows = _step_rows(result, step)
        budget -= len(rows)
        if step == result.curve_step:
            first = result.first_drift_index if result.first_drift is not None else None
        else:
            first = next((r.index for r in rows if r.failed), None)
        steps_out.append({
            "step": step,
            "drifts": step in result.drifting_steps,
            "first": first,
            "blocks": [[i, intern(b)] for i, b in block_starts([r.port for r in rows])],
            "rows": {
                "port": [intern(display_name(r.port)) for r in rows],
                "upstream": [intern(display_name(r.upstream)) for r in rows],
                "call": [r.call for r in rows],
                "tensor": [intern(r.label) for r in rows],
                "check": [intern(r.check or "-") for r in rows],
                "value": [_chart_number(r.value) for r in rows],
                "limit": [_chart_number(r.limit) for r in rows],
                "ratio": [_chart_number(r.ratio) for r in rows],
                "rel_l2": [_chart_number(r.rel_l2) for r in rows],
                "max_abs_err": [_chart_number(r.max_abs_err) for r in rows],
                "sqnr_db": [_chart_number(r.sqnr_db) for r in rows],
                "failed": [1 if r.failed else 0 for r in rows],
                "port_shape": [intern(shape_text(r.port_shape)) for r in rows],
                "upstream_shape": [intern(shape_text(r.upstream_shape)) for r in rows],
                "port_dtype": [intern(r.port_dtype) for r in rows],
                "upstream_dtype": [intern(r.upstream_dtype) for r in rows],
                "elements": [intern(r.elements or "stats only") for r in rows],
            },
        })
    return {
        "names": list(names),
        "curve_step": result.curve_step,
        "steps": steps_out,
        "steps_left_out": left_out,
        "columns": [c.header for c in COLUMNS],
    }


def svg_chart(result: DiffResult, *, width: int = 960, plot_height: int = 250) -> str:
    """The chart as the page first shows it (the script redraws it at the window's width).

    err/tol per record of the first drift's step on a log scale, block labels on
    the x-axis, the dashed tolerance line at 1 (each point is already divided by
    its own limit) and the first drift ringed.
    """
    ratio, _ = result.curve()
    n = len(ratio)
    if not n:
        return '<svg id="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 960 40" width="100%">' \
               '<text x="10" y="24">(no compared records)</text></svg>'
    rows = result.rows
    blocks = block_starts([r.port for r in rows])
    longest = max((len(b) for _, b in blocks), default=0)
    left, right, top, bottom = 64, 16, 16, int(min(max(14 + 6.5 * longest, 40), 220))
    plot_w, plot_h = width - left - right, plot_height
    height = top + plot_h + bottom
    finite = ratio[np.isfinite(ratio) & (ratio > 0)]
    lo = max(math.floor(min(np.log10(finite.min()) if len(finite) else -6.0, -1.0)), -12)
    hi = math.ceil(max(np.log10(finite.max()) if len(finite) else 0.0, 1.0))

    def x_of(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y_of(r: float) -> float:
        value = hi if math.isinf(r) else (lo if r <= 0 else min(max(math.log10(r), lo), hi))
        return top + plot_h * (hi - value) / (hi - lo)

    parts = [f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
             f'role="img" aria-label="err/tol per record">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>']
    for decade in range(lo, hi + 1):
        y = y_of(10.0**decade)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">1e{decade}</text>')
    last_x = -1e9
    for i, block in blocks:
        x = x_of(i)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#e0e0e0"/>')
        if x - last_x >= 14:
            y = top + plot_h + 6
            parts.append(f'<text class="block-label" x="{x + 4:.1f}" y="{y}" text-anchor="end" '
                         f'transform="rotate(-90 {x + 4:.1f} {y})">{_esc(block)}</text>')
            last_x = x
    y_tol = y_of(1.0)
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y_tol:.1f}" y2="{y_tol:.1f}" '
                 'stroke="#c62828" stroke-dasharray="6 4"/>')
    points = " ".join(f"{x_of(i):.1f},{y_of(float(r)):.1f}" for i, r in enumerate(ratio) if not math.isnan(r))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#1565c0" stroke-width="1.2"/>')
    for i, r in enumerate(ratio.tolist()):
        if math.isnan(r) or (n > _STATIC_MARKERS and r <= 1):
            continue
        row = rows[i]
        color = "#c62828" if r > 1 else "#1565c0"
        parts.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(r):.1f}" r="2.5" fill="{color}">'
                     f"<title>#{i} {_esc(display_name(row.port))} (upstream {_esc(display_name(row.upstream))}) "
                     f"{_esc(row.label)}: err/tol {number(r)}</title></circle>")
    at, first = result.first_drift_index, result.first_drift
    if first is not None and at is not None and at < n:
        y = y_of(float(ratio[at])) if not math.isnan(ratio[at]) else y_tol
        parts.append(f'<circle cx="{x_of(at):.1f}" cy="{y:.1f}" r="7" fill="none" stroke="#c62828" stroke-width="2"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def _step_count(result: DiffResult, step: int) -> int:
    return result.step_row_count(step)


def _step_rows(result: DiffResult, step: int) -> list[LayerRow]:
    return result.step_rows(step)


def _html_table(rows: list[LayerRow], hit: int | None) -> str:
    out = ["<table><thead><tr>", *(f"<th>{_esc(c.header)}</th>" for c in COLUMNS), "</tr></thead><tbody>"]
    numeric = {"#", "call", "error", "tol", "err/tol", "rel L2 err", "max abs err", "SQNR dB"}
    for i, row in enumerate(rows):
        cls = "first" if i == hit else ("failed" if row.failed else "")
        cells = table_cells(row, COLUMNS)
        out.append(f'<tr class="{cls}" data-i="{row.index}">' + "".join(
            f'<td class="num">{_esc(v.strip())}</td>' if c.header in numeric else f"<td>{_esc(v)}</td>"
            for c, v in zip(COLUMNS, cells, strict=True)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _json_for_script(data: dict[str, Any]) -> str:
    """JSON that cannot end the script element or open markup, whatever the module names hold."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escaped)
    return text


def _chart_number(value: float) -> float | str | None:
    """A value for the page's script: ``None`` for NaN, infinities as ``"inf"``/``"-inf"`` (the chart draws them)."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
.headline { font-family: ui-monospace, monospace; padding: .6em; border-radius: 4px; overflow-wrap: anywhere;
  background: @OK_BG@; border: 1px solid @OK_BORDER@; }
table { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: .85em; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; white-space: nowrap; }
th { background: #f5f5f5; position: sticky; top: 0; }
td.num { text-align: right; }
tr.failed td { color: #c62828; }
tr.first td { background: #ffcdd2; font-weight: bold; }
tr.selected td { outline: 2px solid #1565c0; }
tbody tr { cursor: pointer; }
#chart-box { width: 100%; }
#chart { display: block; width: 100%; user-select: none; cursor: crosshair; }
#chart text { font-family: system-ui, sans-serif; font-size: 11px; }
.controls { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; margin: .5em 0; }
.controls input { width: 6em; }
.details { border: 1px solid #ccc; border-radius: 4px; padding: .5em 1em; background: #fafafa; }
.details dl, dl.columns { display: grid; grid-template-columns: max-content 1fr; gap: 2px 1em; margin: .3em 0; }
.details dt, dl.columns dt { font-weight: bold; } .details dd, dl.columns dd { margin: 0; overflow-wrap: anywhere; }
.scroll { max-height: 30em; overflow: auto; }
.hint, .legend, .note { color: #555; font-size: .9em; }
"""

# Plain script, no library: draws the chart at the window's width, and handles steps, zoom and details.
_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("tracediff-data").textContent);
  var names = data.names;
  var svg = document.getElementById("chart");
  var NS = svg.namespaceURI;
  var stepSel = document.getElementById("step");
  var fromIn = document.getElementById("from"), toIn = document.getElementById("to");
  var details = document.getElementById("details");
  var tbody = document.getElementById("records-body");
  var M = {left: 64, right: 16, top: 16, bottom: 96}, PLOT_H = 250, H = 360, MAX_POINTS = 2000, MAX_TABLE = 3000;
  var cur = null, view = [0, 0], selected = null, geom = null, drag = null;

  function num(v) {  // tracediff.vocabulary.number, digit for digit
    if (v === null || v === undefined || (typeof v === "number" && isNaN(v))) return "-";
    if (v === "inf" || v === Infinity) return "inf";
    if (v === "-inf" || v === -Infinity) return "-inf";
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e-3 && a < 1e4) {
      var s = v.toPrecision(3);
      if (s.indexOf("e") < 0) return s.indexOf(".") < 0 ? s : s.replace(/0+$/, "").replace(/\.$/, "");
    }
    var m = v.toExponential(2).match(/^(-?[\d.]+)e([+-])(\d+)$/);
    return m[1] + "e" + m[2] + (m[3].length < 2 ? "0" + m[3] : m[3]);
  }
  function el(tag, attrs, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  data.steps.forEach(function (s) {  // infinities travel as "inf"/"-inf" (JSON has none)
    ["value", "limit", "ratio", "rel_l2", "max_abs_err", "sqnr_db"].forEach(function (k) {
      s.rows[k] = s.rows[k].map(function (v) { return v === "inf" ? Infinity : (v === "-inf" ? -Infinity : v); });
    });
  });
  function count() { return cur.rows.ratio.length; }
  function name(col, i) { return names[cur.rows[col][i]]; }

  function setStep(k) {
    cur = data.steps[k];
    view = [0, Math.max(count() - 1, 0)];
    selected = cur.first;
    draw(); fillTable(); show(selected);
  }
  function setView(lo, hi) {
    var n = count();
    lo = Math.max(0, Math.min(Math.round(lo), n - 1)); hi = Math.max(0, Math.min(Math.round(hi), n - 1));
    if (hi - lo < 2) { var mid = (lo + hi) / 2; lo = Math.max(0, Math.floor(mid - 1)); hi = Math.min(n - 1, lo + 2); }
    view = [lo, hi];
    draw(); fillTable();
  }

  function draw() {
    var W = Math.max(Math.round(svg.getBoundingClientRect().width), 200), longest = 0;
    cur.blocks.forEach(function (b) { longest = Math.max(longest, names[b[1]].length); });
    M.bottom = Math.min(Math.max(14 + 6.5 * longest, 40), 220);  // vertical block labels, whole
    H = M.top + PLOT_H + M.bottom;
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.style.height = H + "px";
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var n = count(), lo0 = view[0], hi0 = view[1];
    var pw = W - M.left - M.right, ph = H - M.top - M.bottom;
    var ratio = cur.rows.ratio, fmin = Infinity, fmax = -Infinity, i;
    for (i = lo0; i <= hi0; i++) {
      var r = ratio[i];
      if (typeof r === "number" && r > 0) { fmin = Math.min(fmin, r); fmax = Math.max(fmax, r); }
    }
    var lo = Math.max(Math.floor(Math.min(isFinite(fmin) ? Math.log10(fmin) : -6, -1)), -12);
    var hi = Math.ceil(Math.max(isFinite(fmax) ? Math.log10(fmax) : 0, 1));
    function x(j) { return M.left + (hi0 > lo0 ? pw * (j - lo0) / (hi0 - lo0) : pw / 2); }
    function y(r) {
      var v = r === null ? null : (r <= 0 ? lo : Math.min(Math.max(Math.log10(r), lo), hi));
      return v === null ? null : M.top + ph * (hi - v) / (hi - lo);
    }
    geom = {W: W, pw: pw, x: x};
    svg.appendChild(el("rect", {x: M.left, y: M.top, width: pw, height: ph, fill: "#fafafa", stroke: "#ccc"}));
    for (var d = lo; d <= hi; d++) {
      var yd = y(Math.pow(10, d));
      svg.appendChild(el("line", {x1: M.left, x2: M.left + pw, y1: yd, y2: yd, stroke: "#eee"}));
      svg.appendChild(el("text", {x: M.left - 6, y: yd + 4, "text-anchor": "end"}, "1e" + d));
    }
    var lastX = -1e9, blocks = cur.blocks, shown = [];
    for (var b = 0; b < blocks.length; b++) {  // the block a zoomed view starts in is labelled too
      var start = blocks[b][0], end = b + 1 < blocks.length ? blocks[b + 1][0] : n;
      if (end <= lo0 || start > hi0) continue;
      shown.push([Math.max(start, lo0), names[blocks[b][1]], start >= lo0]);
    }
    shown.forEach(function (s) {
      var bx = x(s[0]);
      if (s[2]) svg.appendChild(el("line", {x1: bx, x2: bx, y1: M.top, y2: M.top + ph, stroke: "#e0e0e0"}));
      if (bx - lastX < 14) return;
      var by = M.top + ph + 6;
      svg.appendChild(el("text", {"class": "block-label", x: bx + 4, y: by, "text-anchor": "end",
                                  transform: "rotate(-90 " + (bx + 4) + " " + by + ")"}, s[1]));
      lastX = bx;
    });
    var yt = y(1);
    svg.appendChild(el("line", {x1: M.left, x2: M.left + pw, y1: yt, y2: yt, stroke: "#c62828",
                                "stroke-dasharray": "6 4", id: "tol-line"}));
    svg.appendChild(el("text", {x: M.left + pw - 4, y: yt - 4, "text-anchor": "end", fill: "#c62828"}, "tolerance"));
    var pts = [];
    for (i = lo0; i <= hi0; i++) if (ratio[i] !== null) pts.push(x(i).toFixed(1) + "," + y(ratio[i]).toFixed(1));
    svg.appendChild(el("polyline", {points: pts.join(" "), fill: "none", stroke: "#1565c0", "stroke-width": 1.2}));
    var dense = hi0 - lo0 + 1 > MAX_POINTS;
    for (i = lo0; i <= hi0; i++) {
      if (ratio[i] === null || (dense && ratio[i] <= 1)) continue;
      var c = el("circle", {"class": "point", cx: x(i), cy: y(ratio[i]), r: 3, "data-i": i,
                            fill: ratio[i] > 1 ? "#c62828" : "#1565c0"});
      c.appendChild(el("title", {}, "#" + i + " " + name("port", i) + " (upstream " + name("upstream", i) + ") " +
                                    name("tensor", i) + ": err/tol " + num(ratio[i])));
      svg.appendChild(c);
    }
    if (cur.first !== null && cur.first >= lo0 && cur.first <= hi0) {
      var fy = ratio[cur.first] === null ? yt : y(ratio[cur.first]);
      svg.appendChild(el("circle", {cx: x(cur.first), cy: fy, r: 7, fill: "none", stroke: "#c62828",
                                    "stroke-width": 2, id: "first-ring"}));
    }
    if (selected !== null && selected >= lo0 && selected <= hi0) {
      svg.appendChild(el("line", {x1: x(selected), x2: x(selected), y1: M.top, y2: M.top + ph, stroke: "#1565c0",
                                  "stroke-dasharray": "2 2", id: "selected-line"}));
    }
    svg.appendChild(el("text", {x: 14, y: M.top + ph / 2, "text-anchor": "middle",
                                transform: "rotate(-90 14 " + (M.top + ph / 2) + ")"}, "err / tol"));
    fromIn.max = toIn.max = String(n - 1);
    fromIn.value = String(lo0); toIn.value = String(hi0);
    document.getElementById("range").textContent =
      "records " + lo0 + "–" + hi0 + " of " + n + " (step " + cur.step + ")";
  }

  function indexAt(clientX) {
    var px = clientX - svg.getBoundingClientRect().left;
    var t = Math.min(Math.max((px - M.left) / geom.pw, 0), 1);
    return Math.round(view[0] + t * (view[1] - view[0]));
  }

  function fillTable() {
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    var hi = Math.min(view[1], view[0] + MAX_TABLE - 1);
    for (var i = view[0]; i <= hi; i++) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-i", i);
      var cls = i === cur.first ? "first" : (cur.rows.failed[i] ? "failed" : "");
      if (i === selected) cls += " selected";
      tr.className = cls;
      cells(i).forEach(function (c) {
        var td = document.createElement("td");
        td.textContent = c[1];
        if (c[2]) td.className = "num";
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    }
  }

  function cells(i) {  // [header, text, numeric], in tracediff.vocabulary.COLUMNS order
    var R = cur.rows, ps = names[R.port_shape[i]], us = names[R.upstream_shape[i]];
    var pd = names[R.port_dtype[i]], ud = names[R.upstream_dtype[i]];
    return [["#", String(i), 1], ["port module", name("port", i)], ["upstream module", name("upstream", i)],
            ["call", String(R.call[i]), 1], ["tensor", name("tensor", i)], ["check", name("check", i)],
            ["error", num(R.value[i]), 1], ["tol", num(R.limit[i]), 1],
            ["err/tol", num(R.ratio[i]) + (R.failed[i] ? " ✗" : ""), 1], ["rel L2 err", num(R.rel_l2[i]), 1],
            ["max abs err", num(R.max_abs_err[i]), 1], ["SQNR dB", num(R.sqnr_db[i]), 1],
            ["shape", ps === us ? ps : ps + " / " + us], ["dtype", pd === ud ? pd : pd + " / " + ud]];
  }

  function show(i) {
    while (details.firstChild) details.removeChild(details.firstChild);
    if (i === null || i === undefined || i >= count()) {
      var p = document.createElement("p");
      p.textContent = "Click a point or a table row.";
      details.appendChild(p);
      return;
    }
    var R = cur.rows;
    var verdict = R.ratio[i] === null ? "not checked" : (R.failed[i] ? "breaks tolerance" : "within tolerance");
    var h = document.createElement("h3");
    h.textContent = "record #" + i + " of step " + cur.step + ": " + verdict +
      (i === cur.first ? " (first drift)" : "");
    details.appendChild(h);
    var dl = document.createElement("dl");
    var items = cells(i).slice(1);
    items.splice(5, 0, ["elements", name("elements", i)]);
    items.push(["upstream shape", names[R.upstream_shape[i]]], ["upstream dtype", names[R.upstream_dtype[i]]]);
    items.forEach(function (c) {
      var dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = c[0]; dd.textContent = c[1];
      dl.appendChild(dt); dl.appendChild(dd);
    });
    details.appendChild(dl);
  }

  function select(i) {
    selected = i;
    draw(); fillTable(); show(i);
  }

  stepSel.addEventListener("change", function () { setStep(Number(stepSel.value)); });
  document.getElementById("reset").addEventListener("click", function () { setView(0, count() - 1); });
  fromIn.addEventListener("change", function () {
    var v = Number(fromIn.value);
    setView(v, Math.max(view[1], v + 2));
  });
  toIn.addEventListener("change", function () {
    var v = Number(toIn.value);
    setView(Math.min(view[0], v - 2), v);
  });
  tbody.addEventListener("click", function (ev) {
    var tr = ev.target.closest("tr");
    if (tr) select(Number(tr.getAttribute("data-i")));
  });
  document.getElementById("around").addEventListener("click", function (ev) {  // rows of the first drift's step
    var tr = ev.target.closest("tbody tr");
    if (!tr) return;
    data.steps.forEach(function (s, j) {
      if (s.step === data.curve_step && cur.step !== s.step) { stepSel.value = String(j); setStep(j); }
    });
    select(Number(tr.getAttribute("data-i")));
  });
  svg.addEventListener("mousedown", function (ev) {
    var px = ev.clientX - svg.getBoundingClientRect().left;
    drag = {x0: ev.clientX, rect: el("rect", {x: px, y: M.top, width: 0, height: H - M.top - M.bottom,
                                                fill: "#1565c0", "fill-opacity": 0.12, id: "brush"})};
    svg.appendChild(drag.rect);
    ev.preventDefault();
  });
  window.addEventListener("mousemove", function (ev) {
    if (!drag) return;
    var left = svg.getBoundingClientRect().left, a = drag.x0 - left, b = ev.clientX - left;
    drag.rect.setAttribute("x", Math.min(a, b));
    drag.rect.setAttribute("width", Math.abs(b - a));
  });
  window.addEventListener("mouseup", function (ev) {
    if (!drag) return;
    var x0 = drag.x0;
    drag = null;
    if (Math.abs(ev.clientX - x0) > 5) {
      var a = indexAt(x0), b = indexAt(ev.clientX);
      setView(Math.min(a, b), Math.max(a, b));
    } else {
      var target = ev.target;
      select(target && target.getAttribute && target.getAttribute("data-i") !== null && svg.contains(target)
             ? Number(target.getAttribute("data-i")) : indexAt(ev.clientX));
    }
  });
  svg.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var at = indexAt(ev.clientX), f = ev.deltaY < 0 ? 0.7 : 1 / 0.7;
    var lo = at - (at - view[0]) * f, hi = at + (view[1] - at) * f;
    if (f > 1 && hi - lo >= count() - 1) { lo = 0; hi = count() - 1; }
    setView(lo, hi);
  }, {passive: false});
  window.addEventListener("resize", function () { if (cur) draw(); });

  if (data.steps.length) {
    var k = 0;
    data.steps.forEach(function (s, j) { if (s.step === data.curve_step) k = j; });
    stepSel.value = String(k);
    setStep(k);
  }
})();
"""


__all__ = ["MAX_EMBEDDED_ROWS", "block_of", "block_starts", "report_data", "svg_chart", "to_html", "write_html"]
