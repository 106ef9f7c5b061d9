"""What a ``tracediff run`` is doing right now: phase lines, step and record progress, the closing hints.

A long run used to be silent for seconds (importing PyTorch, building and loading a
large model) and then moved one step at a time. Every stage now announces itself
through a :class:`RunProgress` sink:

* :class:`LiveProgress`: on a terminal, a rich display on stderr; finished phases stay
  as lines with their time, the running one spins, tracing shows a bar that advances
  as module calls are recorded (within a step, not only per step);
* :class:`PlainProgress`: when stderr is a file or pipe, one line per phase and step
  with the seconds since the start, so logs show where a run spends its time;
* :class:`PipeProgress`: in the ``--isolate-sides`` worker, the same events as JSON
  lines on a pipe; :func:`forward_events` replays them into the parent's sink.

Within-step progress costs the model nothing: no hook or per-call work is added. The
recorder already counts what it captures (:attr:`tracediff.hooks.TraceHandle.records_captured`);
the display's refresh thread reads that counter, and the expected count per step is
known once the first step has run (before that the bar is indeterminate and shows the count).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.style import Style
from rich.text import Text

#: phase name -> what the line says (``{side}`` is filled in)
PHASES = {
    "import": "loading PyTorch",
    "start": "starting the {side} process",
    "build": "building {side}",
    "weights": "loading {side} weights",
    "convert": "converting and loading {side} weights",
    "attach": "attaching the recorder to {side} (fingerprinting weights)",
    "trace": "tracing {side}",
    "align": "aligning modules",
    "preflight": "pre-flight: checking weights and inputs",
    "diff": "diffing",
    "report": "writing reports",
}

ReadCount = Callable[[], int]


def phase_label(name: str, side: str | None = None) -> str:
    """The human text of a phase (an unknown name is shown as it is)."""
    return PHASES.get(name, name).format(side=side or "")


class RunProgress:
    """A sink for a run's progress events. This base class ignores them all (``--no-progress``)."""

    def phase(self, name: str, side: str | None = None) -> None:
        """A phase begins (the previous one ends); ``name`` is a key of :data:`PHASES`."""

    def step(self, side: str, step: int, steps: int, per_step: int | None) -> None:
        """Tracing ``side`` starts step ``step`` of ``steps`` (``step == steps``: done).

        ``per_step``: records one step captured, once a step has run (None before).
        """

    def watch(self, side: str, read: ReadCount | None) -> None:
        """``read()`` gives the records captured so far in the running step; None: stop reading."""

    def finish(self, *, failed: bool = False) -> None:
        """The run's work is done (``failed``: it stopped in the running phase): close the display.

        Calling it again does nothing.
        """


class StepCounter:
    """Records captured per step, read from the recorder's own counter (no per-call work).

    ``read`` returns the total captured since the recorder was attached.
    """

    def __init__(self, read: ReadCount) -> None:
        self._read = read
        self._base = read()
        self.per_step: int | None = None

    def begin(self) -> None:
        """A step starts: count from here."""
        self._base = self._read()

    def end(self) -> None:
        """A step ended: what it captured is the expected count of the next ones."""
        done = self.in_step()
        if done > 0:
            self.per_step = max(self.per_step or 0, done)

    def in_step(self) -> int:
        """Records captured so far in the running step."""
        return max(0, self._read() - self._base)


# -- plain lines (stderr is not a terminal) ----------------------------------------------------------
class PlainProgress(RunProgress):
    """One line per phase and step, with the seconds since the run started."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._start = time.perf_counter()
        self._finished = False
        self._current = ""
        self._lock = threading.Lock()

    def _line(self, text: str) -> None:
        stream = self._stream or sys.stderr
        with self._lock:
            stream.write(f"tracediff {time.perf_counter() - self._start:7.1f}s  {text}\n")
            stream.flush()

    def phase(self, name: str, side: str | None = None) -> None:
        self._current = phase_label(name, side)
        self._line(self._current)

    def step(self, side: str, step: int, steps: int, per_step: int | None) -> None:
        records = f" ({per_step:,} records a step)" if per_step else ""
        if step >= steps:
            self._line(f"traced {side}: {steps}/{steps} steps{records}")
        else:
            self._line(f"tracing {side}: step {step + 1}/{steps}{records}")

    def finish(self, *, failed: bool = False) -> None:
        if not self._finished:
            self._finished = True
            self._line(f"stopped while {self._current}" if failed and self._current else "done")


# -- rich display (stderr is a terminal) -------------------------------------------------------------
class _Watched:
    def __init__(self, task: Any) -> None:
        self.task = task
        self.step = 0
        self.steps = 0
        self.per_step: int | None = None
        self.read: ReadCount | None = None


class _Bars(Progress):
    """A Progress that polls the record counters each time it renders (on rich's refresh thread)."""

    def __init__(self, poll: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        self._poll = poll  # before Progress.__init__, which may render already
        super().__init__(*args, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        self._poll()
        yield from super().get_renderables()


class LiveProgress(RunProgress):
    """The terminal display: one row per phase (done ones keep their time), live bars while tracing."""

    def __init__(self, console: Console) -> None:
        self._current: Any = None
        self._current_label = ""
        self._watched: dict[str, _Watched] = {}
        self._lock = threading.RLock()
        self._finished = False
        self._bars = _Bars(
            self._poll_if_free,
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            redirect_stdout=sys.stdout.isatty(),  # never route a piped stdout (--json) to the display
        )
        self._bars.start()

    def phase(self, name: str, side: str | None = None) -> None:
        with self._lock:
            self._end_current()
            self._current_label = phase_label(name, side)
            self._current = self._bars.add_task(self._current_label, total=None, detail="")
            if name == "trace" and side is not None:
                self._watched[side] = _Watched(self._current)

    def step(self, side: str, step: int, steps: int, per_step: int | None) -> None:
        with self._lock:
            watched = self._watched.get(side)
            if watched is None:
                return
            watched.step, watched.steps, watched.per_step = step, steps, per_step
        self._poll()

    def watch(self, side: str, read: ReadCount | None) -> None:
        with self._lock:
            if side in self._watched:
                self._watched[side].read = read

    def finish(self, *, failed: bool = False) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self._end_current(failed=failed)
        self._bars.stop()

    def _end_current(self, *, failed: bool = False) -> None:
        if self._current is not None and failed:
            self._bars.stop_task(self._current)
            self._bars.update(self._current, description=f"{self._current_label} [red]✗ stopped[/]")
            self._current = None
        if self._current is not None:
            self._poll()
            self._bars.update(self._current, total=1, completed=1)
            self._bars.stop_task(self._current)
            self._current = None

    def _poll(self) -> None:
        with self._lock:
            for watched in self._watched.values():
                self._show(watched)

    def _poll_if_free(self) -> None:
        # On rich's refresh thread, which holds the display's lock: waiting for ours here could deadlock
        # with a phase() that holds ours and asks rich to refresh. Skipping one frame costs nothing.
        if self._lock.acquire(blocking=False):
            try:
                self._poll()
            finally:
                self._lock.release()

    def _show(self, watched: _Watched) -> None:
        done = watched.step >= watched.steps > 0
        in_step = 0 if done or watched.read is None else watched.read()
        step_text = f"{watched.steps}/{watched.steps} steps" if done else f"step {watched.step + 1}/{watched.steps}"
        if watched.per_step:
            total = watched.steps * watched.per_step
            completed = total if done else watched.step * watched.per_step + min(in_step, watched.per_step)
            detail = f"{step_text} · {completed:,}/{total:,} records"
            self._bars.update(watched.task, total=total, completed=completed, detail=detail)
        else:
            self._bars.update(watched.task, total=None, detail=f"{step_text} · {in_step:,} records")


def open_progress(*, show: bool, stream: TextIO | None = None) -> RunProgress:
    """The sink for a run: nothing (``show=False``), the live display on a terminal, else plain lines."""
    if not show:
        return RunProgress()
    target = stream or sys.stderr
    console = Console(file=target)
    if console.is_terminal and not console.is_dumb_terminal:
        return LiveProgress(console)
    return PlainProgress(target)


# -- across the --isolate-sides process boundary ---------------------------------------------------
class PipeProgress(RunProgress):
    """The worker's sink: each event as a JSON line on a pipe; record counts polled by a thread."""

    POLL_SECONDS = 0.1

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._reads: dict[str, ReadCount] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _send(self, **event: Any) -> None:
        data = (json.dumps(event) + "\n").encode()
        # the parent went away (OSError): the trace itself matters more than its progress
        with self._lock, contextlib.suppress(OSError):
            if self._fd >= 0:
                os.write(self._fd, data)  # one write per line (below PIPE_BUF: never interleaved)

    def phase(self, name: str, side: str | None = None) -> None:
        self._send(event="phase", name=name, side=side)

    def step(self, side: str, step: int, steps: int, per_step: int | None) -> None:
        self._send(event="step", side=side, step=step, steps=steps, per_step=per_step)

    def watch(self, side: str, read: ReadCount | None) -> None:
        self._send(event="watch", side=side, on=read is not None)
        if read is None:
            self._reads.pop(side, None)
            return
        self._reads[side] = read
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="tracediff-progress", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        last: dict[str, int] = {}
        while not self._stop.wait(self.POLL_SECONDS):
            for side, read in list(self._reads.items()):
                value = read()
                if last.get(side) != value:
                    last[side] = value
                    self._send(event="records", side=side, value=value)

    def finish(self, *, failed: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock, contextlib.suppress(OSError):
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1


def forward_events(fd: int, sink: RunProgress) -> None:
    """Read a worker's :class:`PipeProgress` lines from ``fd`` until it closes; replay them into ``sink``."""
    counts: dict[str, int] = {}
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            side = event.get("side")
            if kind == "phase":
                sink.phase(event["name"], side)
            elif kind == "step":
                sink.step(side, event["step"], event["steps"], event["per_step"])
            elif kind == "records":
                counts[side] = int(event["value"])
            elif kind == "watch":
                counts[side] = 0
                sink.watch(side, _count_of(counts, side) if event["on"] else None)


def _count_of(counts: dict[str, int], side: str) -> ReadCount:
    """Reads ``side``'s latest record count, as the events update ``counts``."""
    return lambda: counts.get(side, 0)


# -- the end of a run: the report's path and the next command ----------------------------------------
def spec_arguments(target: Sequence[str], demo: str | None, flags: Sequence[tuple[str, Any]]) -> list[str]:
    """The command-line words that describe a run spec: the file or ``--demo BUG``, then its flags.

    ``flags``: ``(flag, value)`` as parsed (lists repeat the flag, booleans are ``true``/``false``).
    """
    words = list(target)
    if not words:
        words = ["--demo", demo or "gelu_tanh"]
    for flag, value in flags:
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            words += [flag, str(item).lower() if isinstance(item, bool) else str(item)]
    return words


def next_command(code: int, spec_args: Sequence[str] | None, *, spec: Any, out_dir: Path) -> str | None:
    """The command to try after a run that exited ``code`` (None: no useful suggestion).

    A drift: bisect the same spec, which names the module and operator that add the error. No drift on
    the clean demo: the demo with its planted bug. No drift under a looser preset: the same traces at fp32.
    """
    if spec_args is None:
        return None
    words = list(spec_args)
    if code == 1:
        return "tracediff bisect " + shlex.join(words)
    if code != 0:
        return None
    if words[:2] == ["--demo", "clean"]:
        return "tracediff run --demo"
    preset = getattr(spec, "preset", None)
    if preset not in (None, "fp32") and getattr(spec, "atol", None) is None:
        return "tracediff first-drift " + shlex.join(
            [str(out_dir / "upstream.h5"), str(out_dir / "port.h5"), "--preset", "fp32"])
    return None


def print_closing(console: Console, report_html: Path | None, next_cmd: str | None) -> None:
    """The HTML report's absolute path (a clickable link on a terminal) and the next command."""
    if report_html is not None and report_html.exists():
        path = report_html.resolve()
        line = Text("html report: ")
        line.append(str(path), style=Style(link=path.as_uri()) if console.is_terminal else None)
        console.print(line, highlight=False, soft_wrap=True)
    if next_cmd:
        console.print(Text(f"next: {next_cmd}"), highlight=False, soft_wrap=True)
