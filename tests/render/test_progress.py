"""A run is never silent: phase lines, within-step record progress, and the closing hints (issue #19, problem 8)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from rich.console import Console

from tests.cli_helpers import report_lines, run_cli
from tracediff.config import TraceConfig
from tracediff.demo.models import make_inputs, make_upstream
from tracediff.pipeline.runner import trace_model
from tracediff.render.progress import LiveProgress, PlainProgress, RunProgress

PHASE_LINE = re.compile(r"^tracediff +\d+\.\d+s  (.*)$")

#: the phases of an in-process run of the demo, in order (the demo builds its weights in its factories)
RUN_PHASES = [
    "loading PyTorch",
    "building upstream",
    "attaching the recorder to upstream",
    "tracing upstream",
    "building port",
    "attaching the recorder to port",
    "tracing port",
    "aligning modules",
    "pre-flight",
    "diffing",
    "writing reports",
    "done",
]


def phase_lines(stderr: str) -> list[str]:
    """The text of stderr's progress lines (``tracediff  1.2s  TEXT``)."""
    return [match.group(1) for line in stderr.splitlines() if (match := PHASE_LINE.match(line))]


def assert_in_order(lines: list[str], expected: list[str]) -> None:
    """Each expected phase starts some line, in this order."""
    position = 0
    for phase in expected:
        found = next((i for i in range(position, len(lines)) if lines[i].startswith(phase)), None)
        assert found is not None, f"{phase!r} missing after line {position} in {lines}"
        position = found + 1


def test_run_shows_each_phase_in_order_and_ends_with_bisect_and_the_report_path(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = run_cli("run", "--out", str(out))  # stderr is a pipe: plain lines, one per phase and step
    assert proc.returncode == 1, proc.stderr
    lines = phase_lines(proc.stderr)
    assert_in_order(lines, RUN_PHASES)
    assert_in_order(lines, ["tracing upstream: step 1/3", "tracing upstream: step 2/3", "traced upstream: 3/3 steps"])
    second = next(line for line in lines if line.startswith("tracing port: step 2/3"))
    assert "records a step" in second  # the expected count per step is known once step 0 has run
    tail = report_lines(proc.stdout)
    assert f"html report: {(out / 'report.html').resolve()}" in tail
    assert "next: tracediff bisect --demo gelu_tanh" in tail


def test_a_spec_with_weights_shows_their_loading_and_bisect_names_the_spec_and_flags(tmp_path) -> None:
    from safetensors.torch import save_file

    from tests.pipeline.test_run import GOOD_SPEC, _spec
    from tracediff.demo.models import make_upstream

    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in make_upstream(0).state_dict().items()},
              str(tmp_path / "ckpt" / "model.safetensors"))
    spec = _spec(tmp_path, GOOD_SPEC.replace('factory = "models.py:build_upstream"',
                                             'factory = "models.py:build_upstream"\nweights = "ckpt"'))
    proc = run_cli("run", str(spec), "--steps", "1", "--port-kwarg", "bug=ln_eps", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert_in_order(phase_lines(proc.stderr), ["building upstream", "loading upstream weights", "tracing upstream",
                                               "building port", "tracing port"])
    assert "loading port weights" not in proc.stderr  # the port has no weights of its own in this spec
    assert f"next: tracediff bisect {spec} --port-kwarg bug=ln_eps --steps 1" in proc.stdout.splitlines()


def test_no_progress_is_silent_and_a_clean_run_suggests_no_bisect(tmp_path) -> None:
    proc = run_cli("run", "--demo", "clean", "--out", str(tmp_path / "clean"), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert phase_lines(proc.stderr) == []
    assert "loading PyTorch" not in proc.stderr and "tracing" not in proc.stderr
    nexts = [line for line in proc.stdout.splitlines() if line.startswith("next:")]
    assert nexts == ["next: tracediff run --demo"]
    assert "bisect" not in proc.stdout


def test_json_keeps_stdout_pure_and_progress_on_stderr(tmp_path) -> None:
    proc = run_cli("run", "--demo", "clean", "--steps", "1", "--json", "--out", str(tmp_path / "j"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["first_drift"] is None
    assert_in_order(phase_lines(proc.stderr), ["tracing upstream", "tracing port", "writing reports", "done"])
    assert "next: tracediff run --demo" in proc.stderr.splitlines()


def test_isolated_sides_report_their_phases_across_the_process_boundary(tmp_path) -> None:
    proc = run_cli("run", "--demo", "clean", "--steps", "2", "--isolate-sides", "--out", str(tmp_path / "iso"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_in_order(phase_lines(proc.stderr), [
        "starting the upstream process", "building upstream", "tracing upstream", "tracing upstream: step 2/2",
        "traced upstream: 2/2 steps", "starting the port process", "building port", "tracing port",
        "traced port: 2/2 steps", "aligning modules", "done",
    ])


class Recorded(RunProgress):
    """A sink that keeps what it was told (a real sink, as the display is one)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int | None]] = []
        self.phases: list[str] = []
        self.read = None

    def phase(self, name: str, side: str | None = None) -> None:
        self.phases.append(name)

    def step(self, side: str, step: int, steps: int, per_step: int | None) -> None:
        self.steps.append((step, steps, per_step))

    def watch(self, side: str, read) -> None:
        self.read = read


def test_within_step_progress_is_read_from_the_recorders_counter(tmp_path) -> None:
    """Midway through each step's forward the reader says how many records that step has captured so far."""
    model = make_upstream(0)
    sink = Recorded()
    midway: list[int] = []
    # The test's own hook stands in for rich's refresh thread: it reads the counter mid-forward.
    model.blocks[1].register_forward_pre_hook(lambda module, args: midway.append(sink.read()))
    result = trace_model(model, side="upstream", steps=[make_inputs(0, step=s) for s in range(3)], count=3,
                         output=tmp_path / "up.h5", config=TraceConfig(stats=("abs_mean", "sum")), progress=sink)
    assert sink.phases == ["attach", "trace"]
    per_step = sink.steps[1][2]
    assert sink.steps[0] == (0, 3, None)  # nothing known before the first step has run
    assert per_step is not None and per_step * 3 == result.records
    assert sink.steps == [(0, 3, None), (1, 3, per_step), (2, 3, per_step), (3, 3, per_step)]
    assert len(midway) == 3
    assert all(0 < count < per_step for count in midway), (midway, per_step)  # within a step, not per step
    assert midway[0] == midway[1] == midway[2]  # counted from each step's start
    assert sink.read is None  # the reader is withdrawn once tracing ends


def test_the_terminal_display_shows_the_counter_against_the_expected_total() -> None:
    buffer = io.StringIO()
    display = LiveProgress(Console(file=buffer, force_terminal=True, width=140, color_system=None))
    display.phase("trace", "port")
    display.step("port", 1, 3, 100)
    display.watch("port", lambda: 40)
    display.finish()
    assert "tracing port" in buffer.getvalue()
    assert "step 2/3 · 140/300 records" in buffer.getvalue()


def test_terminal_links_the_report(tmp_path: Path) -> None:
    from tracediff.render.progress import print_closing

    html = tmp_path / "report.html"
    html.write_text("<html></html>")
    buffer = io.StringIO()
    print_closing(Console(file=buffer, force_terminal=True, width=200), html, "tracediff bisect x.toml")
    text = buffer.getvalue()
    assert "\x1b]8;" in text and html.resolve().as_uri() in text  # an OSC 8 hyperlink to the file
    assert "next: tracediff bisect x.toml" in text


def test_a_failed_run_says_where_it_stopped_instead_of_done() -> None:
    lines = io.StringIO()
    plain = PlainProgress(lines)
    plain.phase("trace", "port")
    plain.finish(failed=True)
    assert phase_lines(lines.getvalue()) == ["tracing port", "stopped while tracing port"]
    screen = io.StringIO()
    live = LiveProgress(Console(file=screen, force_terminal=True, width=140, color_system=None))
    live.phase("build", "port")
    live.finish(failed=True)
    assert "building port ✗ stopped" in screen.getvalue()
