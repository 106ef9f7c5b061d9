"""One ``tracediff run`` of a run spec: trace both sides with a progress display, analyse, print the report.

Kept apart from the CLI module so that a driver can run a whole spec without going through argparse. PyTorch is
imported only once the progress display is up (it alone can take seconds), so a run is never silent.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.console import Console

from tracediff.pipeline.run_folder import REPORT_HTML, prepare_out_dir, written_files
from tracediff.pipeline.spec import FIELDS, RunSpec, spec_path
from tracediff.render.progress import RunProgress, next_command, open_progress, print_closing, spec_arguments

if TYPE_CHECKING:
    from tracediff.pipeline.runner import SideResult


def command_words(args: argparse.Namespace) -> list[str]:
    """The words naming the run spec of a parsed ``run`` command line (file or demo, and its spec flags)."""
    flags = [(field.flag.replace("-kwargs", "-kwarg"), getattr(args, f"spec__{field.section}__{field.key}", None))
             for field in FIELDS]
    return spec_arguments(args.target, args.demo, flags)


def trace_with_progress(spec: RunSpec, out_dir: Path, *, isolate_sides: bool,
                        progress: RunProgress) -> dict[str, SideResult]:
    """Trace both sides, telling ``progress`` each phase, step and record count."""
    progress.phase("import")
    from tracediff.pipeline.runner import trace_both  # lazy: torch is imported with the progress display up

    return trace_both(spec, out_dir, isolate_sides=isolate_sides, progress=progress)


def run_session(spec: RunSpec, out_dir: Path, *, isolate_sides: bool = False, as_json: bool = False,
                progress: bool = True, force: bool = False, next_args: Sequence[str] | None = None) -> int:
    """Trace, align, diff, write ``report.json``/``report.html``, print; return the exit code.

    ``progress``: phases on stderr (a live display on a terminal, else one line each).
    ``next_args``: the words that name this spec on a command line (file or ``--demo BUG``, flags);
    with them the run ends with the next command to try. Both end lines go to stdout, or to
    stderr with ``as_json`` (stdout holds only the JSON), where ``progress=False`` silences them.
    """
    created = prepare_out_dir(out_dir, force=force)
    display = open_progress(show=progress)
    failed = True
    try:
        try:
            results = trace_with_progress(spec, out_dir, isolate_sides=isolate_sides, progress=display)
        except BaseException:
            if created and not any(out_dir.iterdir()):
                shutil.rmtree(out_dir, ignore_errors=True)
            raise

        def stage(name: str) -> None:
            if name == "done":
                display.finish()  # the report is printed next: the live display must be gone
            else:
                display.phase(name)

        code = report_run(spec, results, out_dir, as_json=as_json, stream=sys.stdout, progress=stage)
        failed = False
    finally:
        display.finish(failed=failed)
    if not as_json or progress:
        console = Console(stderr=True) if as_json else Console(file=sys.stdout, soft_wrap=True)
        print_closing(console, out_dir / REPORT_HTML, next_command(code, next_args, spec=spec, out_dir=out_dir))
    return code


def report_run(spec: RunSpec, results: Mapping[str, SideResult], out_dir: Path, *, as_json: bool, stream: TextIO,
               progress: Callable[[str], None] | None = None) -> int:
    """The end of a run: analyse the two traces, write the reports, print; 0 without drift, else 1.

    ``progress`` hears each stage (see :func:`~tracediff.pipeline.analyse.analyse`), then ``done`` before
    anything is printed.
    """
    # lazy: numpy, h5py and the analysis load once the progress display is up
    from tracediff.pipeline.analyse import analyse
    from tracediff.render.report import failure_lines, wide_console

    context = {
        "spec": spec.source,
        "steps": spec.steps,
        "seconds": {side: round(result.seconds, 3) for side, result in results.items()},
        "records": {side: result.records for side, result in results.items()},
    }
    analysis = analyse(results["upstream"].trace, results["port"].trace, mapping=spec_path(spec.map, spec.base_dir),
                       param_map=spec_path(spec.param_map, spec.base_dir), tolerance=spec.tolerance(),
                       out_dir=out_dir, context=context, progress=progress)
    if progress:
        progress("done")
    if as_json:
        stream.write(analysis.report_json.read_text() if analysis.report_json else "{}")
        return 0 if analysis else 1
    console = wide_console(stream)
    failures = {side: r.failures for side, r in results.items() if r.failures}
    for line in failure_lines(failures):
        console.print(f"warning: {line}", style="yellow", highlight=False, markup=False)
    analysis.render(console)
    console.print(f"traces and reports: {out_dir}/ ({', '.join(sorted(p.name for p in written_files(out_dir)))})",
                  highlight=False, markup=False)
    return 0 if analysis else 1
