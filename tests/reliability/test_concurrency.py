"""Threads and processes: concurrent traces stay consistent; two writers of one path are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TinyNet
from tracediff import TraceConfig, TraceConfigError, attach, open_trace, trace_step
from tracediff.store.lock import holder, lock_path

REPO = Path(__file__).resolve().parents[2]
STATS = "abs_mean,sum,min,max,sample"


def _model() -> TinyNet:
    torch.manual_seed(0)  # the global generator: build models in one thread, before any worker starts
    return TinyNet(dim=16)


def _traced(
    model: TinyNet, out: Path, *, steps: int, explicit: bool, calls: int, start: threading.Barrier | None = None
) -> None:
    xs = [torch.randn(4, 4, generator=torch.Generator().manual_seed(s)) for s in range(steps)]
    with attach(model, config=TraceConfig(stats=STATS, sample_size=8), output=out), torch.no_grad():
        if start is not None:
            start.wait()
        for step, x in enumerate(xs):
            if explicit:
                with trace_step(step):
                    for _ in range(calls):  # a step that calls the model several times (CFG): call indices matter
                        model(x)
            else:
                model(x)


def _same_records(path: Path, reference: Path) -> None:
    with open_trace(path) as got, open_trace(reference) as ref:
        assert got.complete and got.steps == ref.steps
        for name, column in ref.records.columns.items():
            assert np.array_equal(got.records.columns[name], column, equal_nan=True), name
        assert [got.records.label_of(i) for i in range(len(got.records))] == [
            ref.records.label_of(i) for i in range(len(ref.records))
        ]
        for i in range(len(ref.records)):
            assert np.array_equal(got.sample(i), ref.sample(i))


@pytest.mark.parametrize(
    ("left", "right"),
    [((True, 2), (True, 2)), ((True, 3), (False, 1))],
    ids=["both-trace_step", "trace_step-and-auto-steps"],
)
def test_two_models_traced_in_two_threads_write_consistent_files(tmp_path, left, right) -> None:
    """Each thread's file equals the file the same run writes alone: same steps, calls, order and values."""
    kinds = {"a": left, "b": right}
    for name, (explicit, calls) in kinds.items():
        _traced(_model(), tmp_path / f"alone-{name}.h5", steps=12, explicit=explicit, calls=calls)
    models = {name: _model() for name in kinds}
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        explicit, calls = kinds[name]
        try:
            _traced(models[name], tmp_path / f"thread-{name}.h5", steps=12, explicit=explicit, calls=calls,
                    start=start)
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in kinds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for name in kinds:
        _same_records(tmp_path / f"thread-{name}.h5", tmp_path / f"alone-{name}.h5")


def test_a_second_attach_to_an_open_trace_is_refused(tmp_path, tiny_net) -> None:
    out = tmp_path / "t.h5"
    with attach(tiny_net, config=TraceConfig(), output=out):
        assert holder(out) == os.getpid()
        with pytest.raises(TraceConfigError, match=rf"being written by this process \(pid {os.getpid()}\)"):
            attach(TinyNet(), config=TraceConfig(), output=out, overwrite=True)
        tiny_net(torch.randn(2, 4))
    assert holder(out) is None and not lock_path(out).exists()
    with open_trace(out) as trace:
        assert trace.complete and trace.steps == [0]


SECOND_WRITER = """
import sys
sys.path.insert(0, {repo!r})
from tests.conftest import TinyNet
from tracediff import TraceConfig, TraceConfigError, TraceFormatError, attach, open_trace
try:
    attach(TinyNet(), config=TraceConfig(), output={out!r}, overwrite=True)
except TraceConfigError as exc:
    print(exc)
else:
    print("attached")
try:
    open_trace({out!r})
except TraceFormatError as exc:
    print(exc)
"""


def test_a_second_process_writing_the_same_path_is_refused(tmp_path, tiny_net) -> None:
    """The other process gets one clear error naming the path and our pid; our trace is untouched."""
    out = tmp_path / "shared.h5"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTVIDEO_TRACE_", "TRACEDIFF_"))}
    with attach(tiny_net, config=TraceConfig(), output=out):
        tiny_net(torch.randn(2, 4))
        proc = subprocess.run([sys.executable, "-c", SECOND_WRITER.format(repo=str(REPO), out=str(out))],
                              capture_output=True, text=True, timeout=300, env={**env, "PYTHONPATH": str(REPO)})
        tiny_net(torch.randn(2, 4))
    assert proc.returncode == 0, proc.stderr
    refused, unreadable = proc.stdout.splitlines()
    assert str(out) in refused and f"is being written by process {os.getpid()}" in refused, proc.stdout
    assert str(out) in unreadable and f"still being written by process {os.getpid()}" in unreadable, proc.stdout
    with open_trace(out) as trace:
        assert trace.complete and trace.steps == [0, 1]


def test_a_stale_lock_from_a_killed_writer_is_taken_over(tmp_path, tiny_net) -> None:
    out = tmp_path / "t.h5"
    lock_path(out).write_text("999999\n")  # left behind by a SIGKILLed writer: the file exists, nobody holds it
    assert holder(out) is None
    with attach(tiny_net, config=TraceConfig(), output=out):
        assert holder(out) == os.getpid()
        tiny_net(torch.randn(1, 4))
    with open_trace(out) as trace:
        assert trace.steps == [0]
