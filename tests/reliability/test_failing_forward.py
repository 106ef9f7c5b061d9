"""A forward that raises (caught by the program) must not break step tracking.

Implicit steps (``attach`` without ``trace_step``, and the script tracer): each
completed top-level call is committed when it returns, so a later SIGKILL keeps
every one of them; the failed call's partial records are dropped and its step
number stays unused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tracediff import attach, open_trace, trace_step
from tracediff.config import TraceConfig

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("raising_run.py")


def _run(tmp_path: Path, mode: str, name: str, *extra: str) -> tuple[int, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTVIDEO_TRACE_", "TRACEDIFF_"))}
    env["PYTHONPATH"] = str(REPO)
    out = tmp_path / name
    if mode == "attach":
        out = out.with_suffix(".h5")
        cmd = [sys.executable, str(SCRIPT), str(out), "attach", *extra]
    else:
        cmd = [sys.executable, "-m", "tracediff.pipeline.script", "--side", "port", "--out", str(out), "--",
               str(SCRIPT), "-", "script", *extra]
        out = out / "port.Flaky.h5"
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    return proc.returncode, out


def _by_step(path: Path) -> dict[int, list[tuple]]:
    with open_trace(path) as trace:
        cols = trace.records.columns
        modules = trace.record_modules()
        out: dict[int, list[tuple]] = {}
        for i in range(len(trace.records)):
            row = (str(modules[i]), int(cols["call"][i]), trace.records.label_of(i), float(cols["sum"][i]))
            sample = trace.sample(i)
            row += (None if sample is None else tuple(np.asarray(sample).tolist()),)
            out.setdefault(int(cols["step"][i]), []).append(row)
        return out


@pytest.mark.parametrize("mode", ["attach", "script"])
def test_completed_calls_survive_a_raise_then_sigkill(tmp_path: Path, mode: str) -> None:
    status, killed = _run(tmp_path, mode, "killed")
    assert status == -signal.SIGKILL
    ref_status, reference = _run(tmp_path, mode, "reference", "OK")
    assert ref_status == 0
    got, ref = _by_step(killed), _by_step(reference)
    assert sorted(ref) == [0, 1, 2, 3, 4, 5]
    # every completed call is on disk, each exactly as in a run where call 2 did not raise;
    # the failed call's partial records (inputs, embed, mid) were dropped, its step left unused
    assert sorted(got) == [0, 1, 3, 4, 5]
    for step in got:
        assert got[step] == ref[step], step


class _Raises(Exception):
    """The exception the tests' modules raise on purpose."""


class _Flaky(nn.Module):
    """Two linear layers; with ``fail`` set, the forward raises after the first one ran."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if self.fail:
            raise _Raises("half-way")
        return self.b(x)


def test_a_failed_call_inside_trace_step_leaves_only_the_completed_calls(tmp_path: Path) -> None:
    """Explicit steps: the failed call's records are dropped, the step keeps the calls that completed."""
    torch.manual_seed(0)
    model = _Flaky()
    x = torch.randn(2, 4)
    config = TraceConfig(stats="abs_mean,sum,min,max", inputs=False)
    with attach(model, side="port", config=config, output=tmp_path / "t.h5") as handle:
        with trace_step(0):
            model(x)
            model.fail = True
            with pytest.raises(_Raises):
                model(x)
            model.fail = False
            model(x)
        with trace_step(1):
            model(x)
    assert handle.records_written > 0
    with open_trace(tmp_path / "t.h5") as trace:
        cols = trace.records.columns
        rows = [(int(cols["step"][i]), str(trace.record_modules()[i]), int(cols["call"][i]), trace.records.label_of(i))
                for i in range(len(trace.records))]

    def one_call(step: int, call: int) -> list[tuple]:  # the model's input, a, b, the model's output
        return [(step, "", call, "input[0]"), (step, "a", call, "out"), (step, "b", call, "out"),
                (step, "", call, "out")]

    # Step 0: the two completed calls (calls 0 and 1), in order; nothing of the failed one in between.
    assert [r for r in rows if r[0] == 0] == one_call(0, 0) + one_call(0, 1)
    assert [r for r in rows if r[0] == 1] == one_call(1, 0)


def test_a_child_exception_caught_inside_the_model_keeps_call_numbers_matched(tmp_path: Path) -> None:
    """A child that raises and is caught by its parent uses up its call: inputs and outputs still pair."""

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.child = _Flaky()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.child.fail = True
            with contextlib.suppress(_Raises):
                self.child(x)
            self.child.fail = False
            return self.child(x)

    torch.manual_seed(0)
    model = Parent()
    config = TraceConfig(stats="abs_mean,sum", inputs=True)
    with attach(model, side="port", config=config, output=tmp_path / "t.h5"):
        with trace_step(0):
            out = model(torch.randn(2, 4))
    with open_trace(tmp_path / "t.h5") as trace:
        labels, modules = trace.record_labels(), trace.record_modules()
        calls = trace.records.columns["call"]
        child = [(str(labels[i]), int(calls[i])) for i in range(len(trace.records)) if modules[i] == "child"]
    # The failed call 0 left its input only; the completed call 1 has its input and its output.
    assert ("input[0]", 1) in child and ("out", 1) in child
    assert ("out", 0) not in child
    assert torch.isfinite(out).all()
