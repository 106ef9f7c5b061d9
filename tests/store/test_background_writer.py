"""The background trace writer: order, bounded queue, failures, and crash safety.

On a GPU the recorder writes every step through it; here it is driven on the CPU.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TinyNet
from tracediff import TraceConfig, attach, open_trace, trace_step
from tracediff.store.background import BackgroundWriter
from tracediff.store.format import RECORD_COLUMNS
from tracediff.store.trace import ModuleTable
from tracediff.store.writer import StepBatch, TraceWriter

REPO = Path(__file__).resolve().parents[2]


def _writer(path: Path) -> TraceWriter:
    table = ModuleTable(names=["", "a"], classes=["M", "L"], params=[], param_moments=np.zeros((0, 7)),
                        param_samples=np.zeros((0, 32)), param_samples_t=np.zeros((0, 32)))
    return TraceWriter(path, attrs={"side": "port", "has_moments": True}, module_table=table)


def _batch(step: int, n: int = 3) -> StepBatch:
    columns = {name: np.zeros(n, dtype=dtype) for name, dtype in RECORD_COLUMNS.items()}
    columns["seq"] = np.arange(n) + step * n
    columns["step"][:] = step
    columns["module"][:] = 1
    columns["sum"] = np.full(n, float(step))
    full = [np.full(5, step, dtype=np.float32) for _ in range(n)]
    columns["full_kind"][:] = 1
    columns["full_offset"] = np.arange(n) * 5
    columns["full_len"][:] = 5
    columns["ndim"][:], columns["numel"][:] = 1, 5
    shape = np.full((n, 8), -1)
    shape[:, 0] = 5
    return StepBatch(columns=columns, shape=shape, labels=["out"] * n, dtypes=["float32"] * n,
                     full_f32=full)


def test_steps_are_written_in_order_and_close_is_idempotent(tmp_path) -> None:
    done: list[int] = []
    writer = BackgroundWriter(_writer(tmp_path / "t.h5"))
    for step in range(6):
        writer.submit(step, lambda s=step: _batch(s), nbytes=60, on_done=lambda s=step: done.append(s))
    writer.set_attr("note", "x")
    writer.close()
    writer.close()
    assert done == list(range(6))
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.complete and trace.steps == list(range(6))
        assert trace.meta["note"] == "x"
        np.testing.assert_array_equal(trace.records.columns["sum"], np.repeat(np.arange(6.0), 3))
        assert all((trace.full(i) == i // 3).all() for i in range(18))


def test_queue_is_bounded_by_steps(tmp_path) -> None:
    gate = threading.Event()
    writer = BackgroundWriter(_writer(tmp_path / "t.h5"), max_steps=2)

    def slow(step: int) -> StepBatch:
        gate.wait(10)
        return _batch(step)

    writer.submit(0, lambda: slow(0))
    writer.submit(1, lambda: slow(1))
    third = threading.Thread(target=writer.submit, args=(2, lambda: slow(2)))
    third.start()
    time.sleep(0.2)
    assert third.is_alive()  # blocked: two steps in flight
    gate.set()
    third.join(10)
    assert not third.is_alive()
    writer.close()
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0, 1, 2]


def test_queue_is_bounded_by_bytes_but_one_step_always_goes(tmp_path) -> None:
    gate = threading.Event()
    writer = BackgroundWriter(_writer(tmp_path / "t.h5"), max_steps=8, max_bytes=100)
    writer.submit(0, lambda: (gate.wait(10), _batch(0))[1], nbytes=1000)  # larger than the bound: still accepted
    second = threading.Thread(target=writer.submit, args=(1, lambda: _batch(1)), kwargs={"nbytes": 10})
    second.start()
    time.sleep(0.2)
    assert second.is_alive()
    gate.set()
    second.join(10)
    writer.close()
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0, 1]


def test_a_failed_write_is_raised_once_and_later_steps_are_dropped(tmp_path) -> None:
    writer = BackgroundWriter(_writer(tmp_path / "t.h5"))
    writer.submit(0, lambda: _batch(0))

    def broken() -> StepBatch:
        raise OSError(28, "No space left on device")

    writer.submit(1, broken)
    writer.drain()
    assert writer.failed_step == 1
    with pytest.raises(OSError, match="No space"):
        writer.submit(2, lambda: _batch(2))
    writer.close()  # reported already: closes quietly
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0]


def test_recorder_through_background_writer_matches_synchronous(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    xs = [torch.randn(3, 4) for _ in range(4)]
    config = TraceConfig(stats="abs_mean,sum,min,max,std,sample,full")
    for name, background in (("sync.h5", False), ("async.h5", True)):
        handle = attach(model, config=config, output=tmp_path / name)
        if background:
            handle.recorder._background = BackgroundWriter(handle.recorder.writer, max_steps=1)
        for step, x in enumerate(xs):
            with trace_step(step):
                model(x)
        handle.close()
        assert handle.records_written == 4 * 16  # per step: the input, 14 called submodules, the output
    with open_trace(tmp_path / "sync.h5") as a, open_trace(tmp_path / "async.h5") as b:
        for column in RECORD_COLUMNS:
            np.testing.assert_array_equal(a.records.columns[column], b.records.columns[column])
        np.testing.assert_array_equal(np.asarray(a.samples), np.asarray(b.samples))
        for i in range(len(a.records)):
            np.testing.assert_array_equal(a.full(i), b.full(i))


def test_recorder_warns_once_when_a_background_write_fails(tmp_path, monkeypatch) -> None:
    model = TinyNet()
    handle = attach(model, config=TraceConfig(stats="abs_mean"), output=tmp_path / "t.h5")
    handle.recorder._background = BackgroundWriter(handle.recorder.writer)
    real = handle.recorder.writer.write_step
    calls = []

    def flaky(step, batch):
        calls.append(step)
        if step == 1:
            raise OSError(28, "No space left on device")
        real(step, batch)

    monkeypatch.setattr(handle.recorder.writer, "write_step", flaky)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            with trace_step(step):
                model(torch.randn(2, 4))
            handle.recorder.drain()
        handle.close()
    messages = [str(w.message) for w in caught if "tracediff" in str(w.message)]
    assert len(messages) == 1 and "failed at step 1" in messages[0], messages
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {repo!r})
    from tests.conftest import TinyNet
    from tracediff import TraceConfig, attach, trace_step
    from tracediff.store.background import BackgroundWriter

    torch.manual_seed(0)
    model = TinyNet()

    def die_in_step_5(module, args, output):
        if step_now[0] == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    step_now = [0]
    model.blocks[1].register_forward_hook(die_in_step_5)
    handle = attach(model, side="ref", config=TraceConfig(stats="abs_mean,sum,sample,full"), output={out!r})
    handle.recorder._background = BackgroundWriter(handle.recorder.writer)
    for step in range(8):
        step_now[0] = step
        with trace_step(step):
            model(torch.randn(3, 4))
    handle.close()
    """
)


def test_sigkill_with_steps_in_the_queue_leaves_a_committed_prefix(tmp_path) -> None:
    out = tmp_path / "killed.h5"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with open_trace(out) as trace:
        assert not trace.complete
        steps = trace.steps
        assert steps == list(range(len(steps))) and len(steps) <= 5  # a prefix; queued steps may be lost
        assert len(trace.records) == len(steps) * 16
        assert np.array_equal(trace.records.columns["seq"], np.arange(len(trace.records)))
        assert all(trace.full(i) is not None for i in range(len(trace.records)))
