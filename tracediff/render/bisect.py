"""Render a :class:`~tracediff.bisect.result.BisectResult`: one headline, the path, the levels, the operator.

Rendering only reads the result. Module names and source lines come from user
code and are never trusted as rich markup: everything is built from
:class:`rich.text.Text` or printed with ``markup=False``.
"""

from __future__ import annotations

import io
import json
from typing import Any

from rich import box
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from tracediff.bisect.metrics import Metrics
from tracediff.bisect.result import BisectResult, Level, ModuleMeasurement, OpFinding, OpRef, Source
from tracediff.modtree import join_name
from tracediff.render.preflight import cause_line, preflight_json, render_preflight, summary
from tracediff.render.report import display_name
from tracediff.vocabulary import number

LEGEND = ("local rel L2 err: ||port - upstream|| / ||upstream|| of the module's output when fed upstream's inputs; "
          "err/tol: the worst element's |port - upstream| / (atol + rtol*|upstream|), ✗ over 1; accumulated: rel L2 "
          "err running freely; amplif.: accumulated / local; input drift: rel L2 err of the module's own inputs "
          "before upstream's replaced them")


def headline(result: BisectResult) -> str:
    """The one line that answers the question."""
    passes = f"{result.forward_passes} forward passes"
    if result.culprit is None:
        modules = len(result.path[0].modules) if result.path else 0
        within = "within their noise floor" if result.noise_floor else "within tolerance"
        output = f"model outputs {within}" if result.output is not None else "model outputs not compared"
        return (f"no local drift: {modules} top-level modules isolated in step {result.step}, none adds error; "
                f"{output} ({result.tolerance.describe()}); {passes}")
    error = result.culprit_error
    what = _error_phrase(error, result) if error is not None else _output_phrase(result.output)
    text = (f"culprit: {display_name(result.culprit)} (upstream {display_name(result.culprit_upstream)}), "
            f"step {result.step}: {what}")
    op = result.operator
    if op is not None and op.port_op is not None and op.port_op.source is not None:
        text += f"; first differing operator: {op.port_op.name} at {short(op.port_op.source)}"
    elif op is not None and op.settings is not None:
        text += f"; settings differ: {op.settings[0]} vs upstream {op.settings[1]}"
    return f"{text}; {passes}"


def _error_phrase(error: ModuleMeasurement, result: BisectResult) -> str:
    local = error.local
    assert local is not None
    text = (f"local rel L2 err {number(local.rel_l2)}, max abs err {number(local.max_abs)}, "
            f"err/tol {number(local.ratio)}")
    if result.noise_floor and error.noise_ratio is not None:
        text += f", {number(error.noise_ratio)}× its noise floor"
    return text


def _output_phrase(output: Metrics | None) -> str:
    if output is None:
        return "the model outputs differ"
    return (f"no aligned module adds error but the model outputs differ (rel L2 err {number(output.rel_l2)}, "
            f"err/tol {number(output.ratio)})")


def render_terminal(result: BisectResult, console: Console | None = None) -> None:
    """Print the report: headline, path from the root to the culprit, each level's table, the operator."""
    console = console or Console()
    if result.preflight is not None and not result.preflight:
        render_preflight(result.preflight, console)  # conversion mistakes first: they explain the culprit
        cause = likely_cause(result)
        if cause:
            console.print(Text(cause, style="bold"), soft_wrap=True)
    style = "bold green" if result else "bold red"
    console.print(Text(headline(result), style=style), soft_wrap=True)  # one line, for grep and logs
    for line in _details(result):
        console.print(Text(f"  {line}"))
    if result.culprit is not None and result.chain:
        console.print(_path_table(result))
    for level in result.path:
        console.print(_level_table(level, result))
    console.print(Text(LEGEND, style="dim"))
    if result.operator is not None:
        for line in operator_lines(result.operator):
            console.print(Text(line), soft_wrap=True)  # source lines stay whole
    for note in result.notes:
        console.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
    if result.preflight is not None and result.preflight:  # clean: one line last, the headline stays first
        console.print(Text(summary(result.preflight), style="dim"), soft_wrap=True)


def text(result: BisectResult, *, width: int = 140) -> str:
    """The terminal report as plain text (for pytest failure sections and logs)."""
    buffer = io.StringIO()
    render_terminal(result, Console(file=buffer, width=width, color_system=None, force_terminal=False))
    return buffer.getvalue()


def likely_cause(result: BisectResult) -> str | None:
    """The pre-flight finding that explains the culprit, if the pre-flight ran and has one."""
    if result.preflight is None or result.culprit is None:
        return None
    return cause_line(result.preflight, result.culprit, result.step)


def to_json(result: BisectResult) -> dict[str, Any]:
    """Everything a machine needs, as plain JSON types (non-finite numbers become ``null``).

    The result's figures, with the words added here: the headline, and the pre-flight's lines with the likely
    cause of the culprit.
    """
    data = result.to_json()
    out = {"ok": data.pop("ok"), "headline": headline(result), **data}
    if result.preflight is not None:
        drifted = result.culprit is not None
        out["preflight"] = preflight_json(result.preflight, first_drift_port=result.culprit,
                                          first_drift_step=result.step if drifted else None)
    return out


def dumps(result: BisectResult) -> str:
    return json.dumps(to_json(result), indent=2) + "\n"


def _details(result: BisectResult) -> list[str]:
    lines = []
    if result.found_in is not None and result.culprit is not None:
        lines.append(f"{display_name(result.culprit)} has no upstream counterpart: the operator trace of "
                     f"{display_name(result.found_in)} found the first differing operator in its forward")
    if result.steps_checked > 1 and result.culprit is not None:
        lines.append(f"step {result.step} is the first of {result.steps_checked} steps checked whose top level drifts")
    elif result.steps_checked > 1:
        lines.append(f"{result.steps_checked} steps checked, none drifts; the table shows the last")
    if result.output is not None:
        if result.noise_floor and result.output_floor is not None:
            verdict = "differ beyond" if result.output_drifts else "stay within"
            lines.append(f"model outputs {verdict} {number(result.noise_factor)}× their noise floor: rel L2 err "
                         f"{number(result.output.rel_l2)}, floor {number(result.output_floor.rel_l2)} "
                         f"(err/tol {number(result.output.ratio)})")
        else:
            verdict = "break" if result.output_drifts else "are within"
            lines.append(f"model outputs {verdict} tolerance: rel L2 err {number(result.output.rel_l2)}, "
                         f"err/tol {number(result.output.ratio)}")
    judge = (f"local errors judged against each module's noise floor (drift above {number(result.noise_factor)}× it)"
             if result.noise_floor else "local errors judged against the tolerance")
    lines.append(f"{judge}; {result.tolerance.describe()}")
    passes = f"{result.forward_passes} forward passes over {len(result.path)} level(s)"
    if result.module_calls:
        passes += f", {result.module_calls} single-module calls for the operator trace"
    lines.append(passes)
    return lines


def _path_table(result: BisectResult) -> Table:
    table = Table(title="path from the model root to the culprit", title_justify="left", box=box.SIMPLE_HEAD)
    columns: list[tuple[str, JustifyMethod]] = [
        ("depth", "right"), ("port module", "left"), ("upstream module", "left"), ("local rel L2 err", "right"),
        ("err/tol", "right"), ("accumulated", "right"), ("amplif.", "right")]
    for header, justify in columns:
        table.add_column(header, justify=justify, no_wrap=True)
    for depth, error in enumerate(result.chain):
        table.add_row(str(depth), Text(display_name(error.port)), Text(display_name(error.upstream)),
                      _rel(error.local), _ratio(error.local), _rel(error.accumulated), _amp(error))
    last = result.path[-1] if result.path else None
    if last is not None and last.culprit is None and last.depth > 0:
        table.add_row(str(last.depth), Text(f"({len(last.modules)} aligned children, none adds error)",
                                            style="dim"), "", "", "", "", "")
    return table


def _level_table(level: Level, result: BisectResult) -> Table:
    parent = display_name(level.parent)
    title = (f"depth {level.depth}: " + ("top-level modules" if level.depth == 0 else f"inside {parent}")
             + f" (step {level.step}, {level.forward_passes} forward passes)")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    calls = any(error.call for error in level.modules)  # the column only when a module runs twice
    call: list[tuple[str, JustifyMethod]] = [("call", "right")] if calls else []
    columns: list[tuple[str, JustifyMethod]] = [
        ("port module", "left"), ("upstream module", "left"), *call,
        ("local rel L2 err", "right"), ("err/tol", "right"), ("accumulated", "right"), ("amplif.", "right")]
    if result.noise_floor:
        columns += [("noise floor", "right"), ("× floor", "right")]
    columns += [("note", "left")]
    for header, justify in columns:
        if header == "note":
            table.add_column(header, justify="left", min_width=10, overflow="fold")
        else:
            table.add_column(header, justify=justify, no_wrap=True)
    for error in level.modules:
        style = "bold red" if error is level.culprit else ("red" if error.drifts else None)
        row: list[Any] = [Text(display_name(error.port), style=style or ""), Text(display_name(error.upstream)),
                          *([str(error.call)] if calls else []), _rel(error.local), _ratio(error.local),
                          _rel(error.accumulated), _amp(error)]
        if result.noise_floor:
            row += [_rel(error.noise), number(error.noise_ratio) if error.noise_ratio is not None else "-"]
        row.append(Text(_note(error, level), style="dim"))
        table.add_row(*row)
    return table


def _note(error: ModuleMeasurement, level: Level) -> str:
    if not error.isolatable:
        return "not isolatable (see notes)"
    parts = []
    if error is level.culprit:
        parts.append("← culprit")
    elif error.drifts:
        parts.append("adds error")
    if error.inputs_forced and error.input_drift is not None and error.input_drift.failed:
        parts.append(f"input drift {number(error.input_drift.rel_l2)}")
    if error.transformed:
        parts.append("transformed")
    return "; ".join(parts)


def operator_lines(finding: OpFinding) -> list[str]:
    """The operator-level section, as plain lines."""
    lines = [f"operator level: inside {display_name(finding.module)} (upstream "
             f"{display_name(finding.upstream_module)}), {finding.port_ops} port / {finding.upstream_ops} upstream "
             f"operator outputs, {finding.matched} port outputs matched upstream"]
    if finding.settings is not None:
        lines.append(f"  settings differ: port {finding.settings[0]}  vs  upstream {finding.settings[1]}")
    if finding.port_op is None:
        if finding.note:
            lines.append(f"  {finding.note}")
        return lines
    assert finding.upstream_op is not None
    lines.append(f"  first differing operator: {finding.port_op.name} {_shape(finding.port_op)}"
                 + (f", rel L2 err {number(finding.metrics.rel_l2)}, max abs err {number(finding.metrics.max_abs)}"
                    if finding.metrics is not None else ""))
    lines.append(f"    port:     {_where(finding.port_op)}{_ran_in(finding.port_op, finding.module)}")
    lines.append(f"    upstream: {_where(finding.upstream_op)}  [{finding.upstream_op.name} "
                 f"{_shape(finding.upstream_op)}]{_ran_in(finding.upstream_op, finding.upstream_module)}")
    if finding.last_match is not None:
        port, upstream = finding.last_match
        lines.append(f"  last matching operator: {_where(port)}  ≙  upstream {_where(upstream)}")
    if finding.suspects:
        lines.append("  computed from port operators with no upstream counterpart (earliest first):")
        for ref, count in _grouped(finding.suspects):
            lines.append(f"    {_where(ref)}  [{ref.name}{f' ×{count}' if count > 1 else ''}]")
    return lines


def _grouped(refs: list[OpRef]) -> list[tuple[OpRef, int]]:
    """Suspects on the same line with the same operator, shown once with a count."""
    out: dict[tuple[Any, ...], list[Any]] = {}
    for ref in refs:
        key = (ref.name, ref.source.file if ref.source else None, ref.source.line if ref.source else ref.index)
        if key in out:
            out[key][1] += 1
        else:
            out[key] = [ref, 1]
    return [(ref, count) for ref, count in out.values()]


def _where(ref: OpRef) -> str:
    if ref.source is None:
        return f"{ref.name} (no source line)"
    return f"{short(ref.source)}: {ref.source.code}"


def short(source: Source) -> str:
    """``models/attn.py:42 in forward``: the last two parts of the path, the line and the function."""
    tail = "/".join(source.file.replace("\\", "/").split("/")[-2:])
    return f"{tail}:{source.line} in {source.function}"


def _ran_in(ref: OpRef, traced: str) -> str:
    """Where a looked-through child's operator ran: that child's full name."""
    if not ref.module:
        return ""
    return f"  (in {join_name(traced, ref.module)})"


def _shape(ref: OpRef) -> str:
    return "(" + ", ".join(map(str, ref.shape)) + f") {ref.dtype}"


def _rel(metrics: Metrics | None) -> str:
    return "-" if metrics is None else number(metrics.rel_l2)


def _ratio(metrics: Metrics | None) -> Text:
    if metrics is None:
        return Text("-")
    return Text(number(metrics.ratio) + (" ✗" if metrics.failed else ""), style="red" if metrics.failed else "")


def _amp(error: ModuleMeasurement) -> str:
    amp = error.amplification
    return "-" if amp is None else number(amp)
