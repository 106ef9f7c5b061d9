"""Two traces in, a verdict out: align, check weights and inputs, diff, and write the reports.

``run``, ``first-drift``, the pytest plugin and bisection all compare traces through this module; each of them
only decides where the traces come from and how the verdict is shown.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tracediff.align.aligner import align
from tracediff.align.alignment import Alignment
from tracediff.diff import DEFAULT_FAIL_ON, DiffResult, diff_traces, fp32_note_for
from tracediff.merge import load_merged
from tracediff.pipeline.run_folder import REPORT_HTML, REPORT_JSON
from tracediff.pipeline.sides import require_aligned
from tracediff.preflight import PreflightResult, check_traces
from tracediff.render.html import write_html
from tracediff.render.preflight import preflight_json, render_preflight
from tracediff.render.report import headline, render_terminal, to_json
from tracediff.results import json_ready
from tracediff.store.trace import Trace
from tracediff.tolerance import Tolerance


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
    #: a loose preset passed what ``fp32`` flags on an fp32 run (:func:`tracediff.diff.fp32_note_for`)
    preset_note: str | None = None

    def __bool__(self) -> bool:
        return bool(self.result)

    @property
    def headline(self) -> str:
        return headline(self.result)

    def summary(self) -> dict[str, Any]:
        """The diff and the pre-flight as plain JSON types (what ``first-drift --json`` prints)."""
        preflight = {} if self.preflight is None else {"preflight": preflight_json(self.preflight, self.result)}
        return {**to_json(self.result), **preflight}

    def report(self, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``report.json`` payload: :meth:`summary`, both traces, the preset note and the run's ``context``."""
        return {**self.summary(), "traces": {"upstream": str(self.upstream), "port": str(self.port)},
                "preset_note": self.preset_note, **({"run": dict(context)} if context else {})}

    def to_json(self) -> dict[str, Any]:
        return json_ready(self.report())

    def render(self, console: Console) -> None:
        """The terminal report: pre-flight, the first drift with its context, the preset note."""
        if self.preflight is not None:
            render_preflight(self.preflight, console, diff=self.result)
        render_terminal(self.result, console)
        if self.preset_note:
            console.print(self.preset_note, style="yellow", highlight=False, markup=False, soft_wrap=True)

    def text(self, *, width: int = 140) -> str:
        """The terminal report as plain text (for pytest failure sections and logs)."""
        buffer = io.StringIO()
        self.render(Console(file=buffer, width=width, color_system=None, force_terminal=False))
        return buffer.getvalue()


def dumps(payload: Mapping[str, Any]) -> str:
    """A report as the JSON text tracediff writes: indented, one final newline, built in one piece."""
    return json.dumps(payload, indent=2, default=str) + "\n"


def analyse_traces(
    upstream: Trace,
    port: Trace,
    *,
    mapping: Mapping[str, Any] | str | Path | None = None,
    param_map: Mapping[str, Any] | str | Path | None = None,
    tolerance: Tolerance | str | None = None,
    step: int | None = None,
    fail_on: Iterable[str] = DEFAULT_FAIL_ON,
    models: tuple[Any, Any] | None = None,
    names: tuple[str, str] | None = None,
    fp32_check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Analysis:
    """Align, run the pre-flight and diff two open traces.

    Args:
        models: the traced upstream and port, still in memory: weights are then compared
            exactly instead of from the traces' fingerprints.
        names: how the user named the two sides; with them, a pair where nothing aligned is refused
            (:func:`~tracediff.pipeline.sides.require_aligned`) instead of reported as all missing.
        fp32_check: look for what the ``fp32`` preset flags and a looser tolerance passed (``preset_note``).
        progress: called with each stage's name as it starts (``align``, ``preflight``, ``diff``).

    Raises:
        TracediffError: bad mapping, nothing aligned, a step out of range.
    """
    stage = progress or (lambda name: None)
    stage("align")
    alignment = align(upstream, port, mapping=mapping, param_map=param_map)
    if names is not None:
        require_aligned(alignment, *names)
    stage("preflight")
    preflight = check_traces(upstream, port, alignment=alignment, param_map=param_map, models=models)
    stage("diff")
    result = diff_traces(upstream, port, alignment, tolerance=tolerance, step=step, fail_on=fail_on)
    note = fp32_note_for(upstream, port, alignment, result) if fp32_check else None
    return Analysis(alignment=alignment, result=result, upstream=Path(upstream.path), port=Path(port.path),
                    preflight=preflight, preset_note=note)


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
    """Analyse two trace files (:func:`analyse_traces`); with ``out_dir``, write report.json and report.html there.

    ``context`` goes into report.json as ``run``; ``progress`` also hears ``report`` before the files are written.

    Raises:
        TracediffError: unreadable trace, bad mapping, nothing aligned.
    """
    with load_merged(upstream) as up_trace, load_merged(port) as port_trace:
        analysis = analyse_traces(up_trace, port_trace, mapping=mapping, param_map=param_map, tolerance=tolerance,
                                  step=step, models=models, progress=progress)
    analysis.upstream, analysis.port = Path(upstream), Path(port)
    if out_dir is not None:
        if progress:
            progress("report")
        analysis.report_json = out_dir / REPORT_JSON
        analysis.report_json.write_text(dumps(analysis.report(context)))
        analysis.report_html = write_html(analysis.result, out_dir / REPORT_HTML)
    return analysis
