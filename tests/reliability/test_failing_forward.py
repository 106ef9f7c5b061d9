"""A forward that raises (caught by the program) must not break step tracking.

Implicit steps (``attach`` without ``trace_step``, and the script tracer): each
completed top-level call is committed when it returns, so a later SIGKILL keeps
every one of them; the failed call's partial records are dropped and its step
number stays unused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tracediff import open_trace

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
        cmd = [sys.executable, "-m", "tracediff.script_tracer", "--side", "port", "--out", str(out), "--",
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
