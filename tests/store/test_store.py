"""The trace file: crash safety, refusals, and the v1 format kept readable forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import TinyNet
from tracediff import TraceConfig, TraceFormatError, attach, open_trace

DATA = Path(__file__).parent.parent / "data"
REPO = Path(__file__).resolve().parents[2]

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {repo!r})
    from tests.conftest import TinyNet
    from tracediff import TraceConfig, attach, trace_step

    torch.manual_seed(0)
    model = TinyNet()

    def die_in_step_3(module, args, output):
        if step_now[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    step_now = [0]
    model.blocks[1].register_forward_hook(die_in_step_3)
    handle = attach(model, side="ref", config=TraceConfig(stats="abs_mean,sum,sample,full"), output={out!r})
    for step in range(5):
        step_now[0] = step
        with trace_step(step):
            model(torch.randn(3, 4))
    handle.close()
    """
)


def test_sigkill_in_step_3_of_5_keeps_steps_0_to_2(tmp_path) -> None:
    out = tmp_path / "killed.h5"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with open_trace(out) as trace:
        assert not trace.complete
        assert trace.steps == [0, 1, 2]
        per_step = len(trace.records) // 3
        called = [name for name, m in TinyNet().named_modules() if name and name != "blocks"]  # ModuleList never runs
        assert per_step == 1 + len(called) + 1  # the model's input, every called submodule, the model's output
        assert np.array_equal(trace.records.columns["seq"], np.arange(len(trace.records)))
        assert all(trace.full(i) is not None for i in range(len(trace.records)))


def test_trace_roundtrip_full_values(tmp_path) -> None:
    torch.manual_seed(3)
    model = TinyNet()
    x = torch.randn(2, 4)
    with attach(model, config=TraceConfig(layers="^head$", stats="full"), output=tmp_path / "t.h5"):
        y = model(x)
    with open_trace(tmp_path / "t.h5") as trace:
        (row,) = np.flatnonzero(trace.record_modules() == "head")
        np.testing.assert_array_equal(trace.full(row), y.detach().numpy())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(os.urandom(4096)), "not a readable HDF5 file"),
        (lambda p: h5py.File(p, "w").close(), "not a tracediff trace"),
    ],
    ids=["missing", "directory", "empty", "random-bytes", "plain-hdf5"],
)
def test_reader_refuses_non_traces(tmp_path, make, message) -> None:
    path = tmp_path / "thing.h5"
    make(path)
    with pytest.raises(TraceFormatError, match=message) as err:
        open_trace(path)
    assert str(path) in str(err.value)


def _write_small(path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    with attach(model, config=TraceConfig(stats="abs_mean,sample"), output=path):
        model(torch.randn(2, 4))


def test_reader_refuses_newer_format_by_name(tmp_path) -> None:
    path = tmp_path / "future.h5"
    _write_small(path)
    with h5py.File(path, "a") as handle:
        handle.attrs["encoding-version"] = "7"
    with pytest.raises(TraceFormatError, match=r"format version 7; this tracediff reads versions up to 1; upgrade"):
        open_trace(path)


def test_reader_refuses_truncated_file(tmp_path) -> None:
    path = tmp_path / "cut.h5"
    _write_small(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(TraceFormatError, match="cut.h5"):
        open_trace(path)


def test_reader_refuses_damaged_structure(tmp_path) -> None:
    path = tmp_path / "damaged.h5"
    _write_small(path)
    with h5py.File(path, "a") as handle:
        del handle["records/label"]
    with pytest.raises(TraceFormatError, match="damaged tracediff trace"):
        open_trace(path)


def test_v1_fixture_stays_readable() -> None:
    """A trace written by format v1 is kept in tests/data and must read forever."""
    with open_trace(DATA / "trace_v1.h5") as trace:
        assert trace.meta["encoding-version"] == "1"
        assert trace.side == "ref"
        assert trace.complete
        assert trace.steps == [0, 1]
        assert len(trace.records) == 14
        assert trace.record_modules()[:3].tolist() == ["", "embed", "blocks.0"]
        assert trace.record_labels()[0] == "input[0]"
        assert trace.records.shape_of(1) == (2, 8)
        np.testing.assert_allclose(trace.stat("abs_mean")[1], 0.586479245685041, rtol=1e-12)
        assert trace.sample(1).shape == (16,)
        assert trace.modules.names[:2] == ["", "embed"]
        assert trace.modules.params[0].shape == (8, 4)
