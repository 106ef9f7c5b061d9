"""One ``tracediff run``: trace both sides with a progress display, then report.

Kept apart from the CLI module so the pytest plugin and bisection can drive a
whole run without going through argparse. PyTorch is imported only once the
progress display is up (it alone can take seconds), so a run is never silent.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tracediff.errors import SpecError
from tracediff.pipeline.spec import FIELDS, RunSpec
from tracediff.render.progress import RunProgress, next_command, open_progress, print_closing, spec_arguments

if TYPE_CHECKING:
    from tracediff.pipeline.runner import SideResult

#: the trace files of a run (defined here, not in the runner, so this module does not import PyTorch)
TRACE_FILES = {"upstream": "upstream.h5", "port": "port.h5"}


def prepare_out_dir(out_dir: Path, *, force: bool) -> bool:
    """Refuse to overwrite earlier traces unless forced; return whether we created the folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SpecError(f"--out {str(out_dir)!r} is a file; give a folder for the traces and reports")
    existing = [out_dir / name for name in (*TRACE_FILES.values(), "report.json", "report.html")]
    clash = [path for path in existing if path.exists()]
    if clash and not force:
        raise SpecError(f"--out {str(out_dir)!r} already holds {clash[0].name}; pass --force to overwrite "
                        "or choose another folder")
    for path in clash:
        path.unlink()
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    return created


def command_words(args: argparse.Namespace) -> list[str]:
    """The words naming the run spec of a parsed ``run`` command line (file or demo, and its spec flags)."""
    flags = [(field.flag.replace("-kwargs", "-kwarg"), getattr(args, f"spec__{field.section}__{field.key}", None))
             for field in FIELDS]
    return spec_arguments(args.target, args.demo, flags)


def trace_with_progress(spec: RunSpec, out_dir: Path, *, isolate_sides: bool,
                        progress: RunProgress) -> dict[str, SideResult]:
    """Trace both sides, telling ``progress`` each phase, step and record count."""
    progress.phase("import")
    from tracediff.pipeline.runner import trace_both

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
        from tracediff.pipeline.analyse import REPORT_HTML, analyse_run

        def stage(name: str) -> None:
            if name == "done":
                display.finish()  # the report is printed next: the live display must be gone
            else:
                display.phase(name)

        code = analyse_run(spec, results, out_dir, as_json=as_json, stream=sys.stdout, progress=stage)
        failed = False
    finally:
        display.finish(failed=failed)
    if not as_json or progress:
        console = Console(stderr=True) if as_json else Console(file=sys.stdout, soft_wrap=True)
        print_closing(console, out_dir / REPORT_HTML, next_command(code, next_args, spec=spec, out_dir=out_dir))
    return code
