"""Traces in, verdict out: align, diff, and write the reports next to the traces.

``run``, the pytest plugin and bisection all end the same way; this module is
that shared ending, so each of them only decides where traces come from.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from tracediff.align.alignment import Alignment
from tracediff.diff import DiffResult, diff_traces
from tracediff.preflight import PreflightResult, check_traces
from tracediff.render.html import write_html
from tracediff.render.preflight import preflight_json, render_preflight
from tracediff.render.report import failure_lines, headline, render_terminal, to_json, wide_console
from tracediff.store.load import load_trace
from tracediff.tolerance import DEFAULT_PRESET, Tolerance, fp32_note_for, preset

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


@dataclass
class Analysis:
    """The outcome of comparing two traces. Truthy when nothing drifts."""

    alignment: Alignment
    result: DiffResult
    upstream: Path
    port: Path
    report_json: Path | None = None
    report_html: Path | None = None
    #: weights and inputs checked before any layer is blamed (shown first)
    preflight: PreflightResult | None = None
    #: a loose preset passed what ``fp32`` flags on an fp32 run (:func:`tracediff.tolerance.fp32_note`)
    preset_note: str | None = None

    def __bool__(self) -> bool:
        return bool(self.result)

    @property
    def headline(self) -> str:
        return headline(self.result)

    def text(self, *, width: int = 140) -> str:
        """The terminal report as plain text (for pytest failure sections and logs)."""
        buffer = io.StringIO()
        console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
        if self.preflight is not None:
            render_preflight(self.preflight, console, diff=self.result)
        render_terminal(self.result, console)
        if self.preset_note:
            console.print(self.preset_note, highlight=False, markup=False, soft_wrap=True)
        return buffer.getvalue()


def tolerance_from(*, preset_name: str | None = None, atol: float | None = None,
                   rtol: float | None = None) -> Tolerance:
    """A preset, or explicit atol/rtol (stats then follow rtol)."""
    if atol is not None and rtol is not None:
        return Tolerance(atol=atol, rtol=rtol, stat_rtol=rtol)
    return preset(preset_name or DEFAULT_PRESET)


def analyse(
    upstream: Path,
    port: Path,
    *,
    mapping: Mapping[str, Any] | str | Path | None = None,
    param_map: Mapping[str, Any] | str | Path | None = None,
    tolerance: Tolerance | str | None = None,
    step: int | None = None,
    out_dir: Path | None = None,
    context: Mapping[str, Any] | None = None,
    models: tuple[Any, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Analysis:
    """Align and diff two trace files; with ``out_dir``, write report.json and report.html there.

    The pre-flight (weights and inputs, :mod:`tracediff.preflight`) runs first; with
    ``models`` (the traced upstream and port, still in memory) weights are compared
    exactly instead of from the traces' fingerprints. ``progress`` is called with each stage's
    name as it starts (``align``, ``preflight``, ``diff``, ``report``).

    Raises:
        TracediffError: unreadable trace, bad mapping, nothing aligned.
    """
    from tracediff.align.aligner import align

    stage = progress or (lambda name: None)
    with load_trace(upstream) as up_trace, load_trace(port) as port_trace:
        stage("align")
        alignment = align(up_trace, port_trace, mapping=mapping, param_map=param_map)
        stage("preflight")
        preflight = check_traces(up_trace, port_trace, alignment=alignment, param_map=param_map, models=models)
        stage("diff")
        result = diff_traces(up_trace, port_trace, alignment, tolerance=tolerance, step=step)
        note = fp32_note_for(up_trace, port_trace, alignment, result)
    analysis = Analysis(alignment=alignment, result=result, upstream=Path(upstream), port=Path(port),
                        preflight=preflight, preset_note=note)
    if out_dir is not None:
        stage("report")
        analysis.report_json = out_dir / REPORT_JSON
        payload = {**to_json(result), "preflight": preflight_json(preflight, result),
                   "traces": {"upstream": str(upstream), "port": str(port)}, "preset_note": note,
                   **({"run": dict(context)} if context else {})}
        analysis.report_json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        analysis.report_html = write_html(result, out_dir / REPORT_HTML)
    return analysis


def analyse_run(spec: Any, results: Mapping[str, Any], out_dir: Path, *, as_json: bool, stream: TextIO,
                progress: Callable[[str], None] | None = None) -> int:
    """The end of ``tracediff run``: analyse the two traces, write reports, print, return 0/1.

    ``progress`` hears each stage (see :func:`analyse`), then ``done`` before anything is printed.
    """
    mapping = spec_path(spec.map, spec.base_dir)
    param_map = spec_path(spec.param_map, spec.base_dir)
    tolerance = tolerance_from(preset_name=spec.preset, atol=spec.atol, rtol=spec.rtol)
    context = {
        "spec": spec.source,
        "steps": spec.steps,
        "seconds": {side: round(result.seconds, 3) for side, result in results.items()},
        "records": {side: result.records for side, result in results.items()},
    }
    analysis = analyse(results["upstream"].trace, results["port"].trace, mapping=mapping, param_map=param_map,
                       tolerance=tolerance, out_dir=out_dir, context=context, progress=progress)
    if progress:
        progress("done")
    if as_json:
        stream.write(analysis.report_json.read_text() if analysis.report_json else "{}")
    else:
        console = wide_console(stream)
        failures = {side: r.failures for side, r in results.items() if r.failures}
        for line in failure_lines(failures):
            console.print(f"warning: {line}", style="yellow", highlight=False, markup=False)
        if analysis.preflight is not None:
            render_preflight(analysis.preflight, console, diff=analysis.result)
        render_terminal(analysis.result, console)
        if analysis.preset_note:
            console.print(analysis.preset_note, style="yellow", highlight=False, markup=False, soft_wrap=True)
        console.print(f"traces and reports: {out_dir}/ ({', '.join(sorted(p.name for p in _outputs(out_dir)))})",
                      highlight=False, markup=False)
    return 0 if analysis else 1


def spec_path(value: str | None, base: Path) -> str | None:
    """Resolve a spec-relative file path; leave 'module:ATTR' references alone."""
    if value is None:
        return None
    candidate = Path(value)
    if not candidate.is_absolute() and (base / candidate).exists():
        return str(base / candidate)
    return value


def _outputs(out_dir: Path) -> list[Path]:
    return [p for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
