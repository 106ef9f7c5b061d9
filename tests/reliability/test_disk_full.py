"""Disk full: tracing ends with one clear warning, the file keeps every committed step, the program runs on.

Two real ways to run out of space, no mocks: a file-size limit (``ulimit -f``,
``RLIMIT_FSIZE``) set in a subprocess, with SIGXFSZ both ignored and at its
default (which kills the process on the first write past the limit, so the
writer must never attempt one); and a tiny tmpfs that fills up mid-run (needs
root to mount; skipped with the reason where it cannot be mounted).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tracediff import TraceConfig, TraceConfigError, attach, open_trace
from tracediff.commands.show import summarise
from tracediff.store.diskspace import close_or_discard

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("disk_full_run.py")
STEPS = 24


def _clean_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return {k: v for k, v in env.items() if not k.startswith(("FASTVIDEO_TRACE_", "TRACEDIFF_"))}


def _run_plan(tmp_path: Path, plan: list[dict]) -> list[dict]:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(WORKER), str(REPO), str(plan_file)], capture_output=True, text=True,
                          env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr  # never killed (SIGXFSZ), never crashed at exit
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _check_stopped_run(result: dict, reference, boundaries: set[int]) -> int:
    """One warning, the program ran to the end, the file holds whole steps of the reference."""
    where = json.dumps(result)[:600]
    assert result["steps_run"] == STEPS and result["outputs_unchanged"], where
    with open_trace(result["out"]) as trace:
        n = len(trace.records)
        assert n in boundaries, where
        for name, column in trace.records.columns.items():
            assert np.array_equal(column, reference.records.columns[name][:n], equal_nan=True), (where, name)
        for i in range(0, n, max(1, n // 7)):
            assert np.array_equal(trace.full(i), reference.full(i)), where
        if n < len(reference.records):
            assert len(result["warnings"]) == 1, where
            assert result["out"] in result["warnings"][0] and "tracing stopped" in result["warnings"][0], where
            assert trace.meta.get("stopped"), where  # the file says why it ends early...
            assert summarise(trace)["stopped"] == trace.meta["stopped"]  # ...and 'tracediff show' prints it
        else:
            assert result["warnings"] == [], where
        return len(trace.steps)


def _reference(path: str) -> tuple[object, set[int]]:
    reference = open_trace(path)
    assert reference.complete and reference.steps == list(range(STEPS))
    steps = reference.records.columns["step"]
    return reference, {0} | {int(np.searchsorted(steps, s, side="right")) for s in range(STEPS)}


def test_file_size_limit_stops_tracing_cleanly(tmp_path, tally) -> None:
    rng = random.Random(7)
    fractions = sorted(rng.uniform(0.05, 0.95) for _ in range(6))
    plan = [{"out": str(tmp_path / "reference.h5")}]
    for i, fraction in enumerate(fractions):
        plan.append({"out": str(tmp_path / f"fsize-ignored-{i}.h5"), "limit": fraction, "sigxfsz": "ignore"})
    for i, fraction in enumerate(fractions[::2]):
        plan.append({"out": str(tmp_path / f"fsize-default-{i}.h5"), "limit": fraction, "sigxfsz": "default"})
    results = _run_plan(tmp_path, plan)
    assert len(results) == len(plan)
    reference, boundaries = _reference(plan[0]["out"])
    with reference:
        kept = []
        for result in results[1:]:
            assert os.path.getsize(result["out"]) <= result["limit"]
            assert "ulimit -f" in result["warnings"][0]
            kept.append(_check_stopped_run(result, reference, boundaries))
    ignored, default = kept[: len(fractions)], kept[len(fractions):]
    assert ignored == sorted(ignored) and default == sorted(default)  # more room, more steps
    assert max(kept) > 0 and min(kept) < STEPS
    tally["disk_full"] += len(results) - 1


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_filesystem_filling_up_mid_run(tmp_path, tiny_tmpfs, tally) -> None:
    plan = [{"out": str(tmp_path / "reference.h5")}]
    for at_step in (2, 9):
        plan.append({"out": str(tiny_tmpfs / f"filled-{at_step}.h5"),
                     "fill": {"path": str(tiny_tmpfs / f"filler-{at_step}"), "leave": 200_000, "at_step": at_step}})
    results = _run_plan(tmp_path, plan)
    reference, boundaries = _reference(plan[0]["out"])
    with reference:
        for result, at_step in zip(results[1:], (2, 9), strict=True):
            assert "disk nearly full" in result["warnings"][0], result
            assert _check_stopped_run(result, reference, boundaries) == at_step + 1
    tally["disk_full"] += len(results) - 1


def test_a_full_filesystem_is_refused_at_attach_time(tiny_tmpfs, tiny_net) -> None:
    with open(tiny_tmpfs / "filler", "wb") as handle:
        stats = os.statvfs(tiny_tmpfs)
        handle.write(b"\0" * (stats.f_bfree * stats.f_frsize - 50_000))
    out = tiny_tmpfs / "t.h5"
    with pytest.raises(TraceConfigError, match=r"cannot start a trace there: disk nearly full") as err:
        attach(tiny_net, config=TraceConfig(), output=out)
    assert str(out) in str(err.value)
    assert not out.exists() and not list(tiny_tmpfs.glob(".t.h5*")) and not (tiny_tmpfs / "t.h5.lock").exists()


FAILED_WRITE = """
import resource, signal, sys
from types import SimpleNamespace
import h5py, numpy as np
sys.path.insert(0, {repo!r})
from tracediff.store.diskspace import close_or_discard, guard_write

class Writer:
    # The shape of TraceWriter.write_step: HDF5 objects alive in the frame when the write fails.
    def __init__(self, path):
        self._file = h5py.File(path, "w")
        self._file.create_dataset("x", shape=(0,), maxshape=(None,), chunks=(1 << 14,), dtype="f8")

    @guard_write
    def write_step(self, step, batch):
        if step == 1:  # the space goes away after the room check passed, as when another process fills the disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (self._file.id.get_filesize() + 4096, resource.RLIM_INFINITY))
        data = self._file["x"]
        start = data.shape[0]
        data.resize((start + batch.columns["x"].size,))
        data[start:] = batch.columns["x"]
        self._file.flush()

def batch(n):
    return SimpleNamespace(columns={{"x": np.full(n, 1.0)}}, shape=np.zeros((0, 8)), samples=None, full_f32=None,
                           full_f64=None, labels=[], dtypes=[])

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
writer = Writer({path!r})
writer.write_step(0, batch(1000))
try:
    writer.write_step(1, batch(1 << 20))
except Exception as exc:
    print("write failed:", type(exc).__name__)
close_or_discard(writer._file)
print("closed")
"""


def test_a_write_that_fails_anyway_detaches_the_file(tmp_path) -> None:
    """Space gone between the check and the write: no retried flushes, no crash at exit, earlier data kept."""
    path = tmp_path / "f.h5"
    proc = subprocess.run([sys.executable, "-c", FAILED_WRITE.format(repo=str(REPO), path=str(path))],
                          capture_output=True, text=True, timeout=120, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    assert "write failed: OSError" in proc.stdout and "closed" in proc.stdout
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    with h5py.File(path, "r") as handle:  # what was flushed before the failure is still there
        assert handle["x"].shape == (1000,) and handle["x"][-1] == 1.0


def test_close_or_discard_closes_a_healthy_file(tmp_path) -> None:
    handle = h5py.File(tmp_path / "ok.h5", "w")
    handle["x"] = np.arange(3)
    close_or_discard(handle)
    with h5py.File(tmp_path / "ok.h5", "r") as again:
        assert again["x"][()].tolist() == [0, 1, 2]
