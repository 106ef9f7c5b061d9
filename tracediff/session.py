"""One ``tracediff run``: trace both sides with a progress display, then report.

Kept apart from the CLI module so the pytest plugin and bisection can drive a
whole run without going through argparse.
"""

from __future__ import annotations

import shutil
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tracediff.errors import SpecError
from tracediff.runner import TRACE_FILES, ProgressFn, SideResult, trace_both
from tracediff.spec import RunSpec


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


def trace_with_progress(spec: RunSpec, out_dir: Path, *, isolate_sides: bool, show: bool) -> dict[str, SideResult]:
    """Trace both sides, showing which side and step is running on stderr."""
    console = Console(stderr=True)
    display: AbstractContextManager[Any] = (
        Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        if show
        else nullcontext()
    )
    with display as progress:
        tasks: dict[str, Any] = {}

        def report(side: str, step: int, steps: int) -> None:
            if progress is None:
                return
            if side not in tasks:
                tasks[side] = progress.add_task(side, total=steps)
            progress.update(tasks[side], completed=step)

        callback: ProgressFn | None = report if show else None
        return trace_both(spec, out_dir, isolate_sides=isolate_sides, progress=callback)


def run_session(spec: RunSpec, out_dir: Path, *, isolate_sides: bool = False, as_json: bool = False,
                progress: bool = True, force: bool = False) -> int:
    """Trace, align, diff, write ``report.json``/``report.html``, print; return the exit code."""
    created = prepare_out_dir(out_dir, force=force)
    try:
        results = trace_with_progress(spec, out_dir, isolate_sides=isolate_sides, show=progress and not as_json)
    except BaseException:
        if created and not any(out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    from tracediff.analysis import analyse_run

    return analyse_run(spec, results, out_dir, as_json=as_json, stream=sys.stdout)
