"""Attaching to a wrapper whose code calls ``wrapper.model(x)``: the model's modules are still recorded.

Issue 17, item 2: a traced submodule that runs while no call of the attached module
is open opens the call itself; a trace closed with no record warns; ``first-drift``
on an empty side names that side.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import TinyNet
from tracediff import TraceConfig, attach, open_trace, trace_step


class Wrapper(nn.Module):
    """What FastVideo does with several DiTs: the pipeline calls ``wrapper.model(...)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _records(path: Path, prefix: str = "") -> list[tuple]:
    """(step, call, module without ``prefix``, label, shape, sum, sample) per record, in seq order."""
    with open_trace(path) as trace:
        cols = trace.records.columns
        modules = trace.record_modules()
        rows = []
        for i in np.argsort(cols["seq"], kind="stable"):
            name = str(modules[i])
            if prefix:
                if name != prefix and not name.startswith(prefix + "."):
                    continue  # the wrapper's own records
                name = name[len(prefix) + 1:] if name != prefix else ""
            sample = trace.sample(int(i))
            rows.append((int(cols["step"][i]), int(cols["call"][i]), name, trace.records.label_of(int(i)),
                         tuple(trace.records.shape_of(int(i))),
                         float(cols["sum"][i]), None if sample is None else tuple(np.asarray(sample).tolist())))
        return rows


def _direct(tmp_path: Path, xs: list[torch.Tensor], config: TraceConfig, explicit: bool) -> list[tuple]:
    torch.manual_seed(0)
    model = TinyNet()
    with attach(model, config=config, output=tmp_path / "direct.h5"):
        for step, x in enumerate(xs):
            if explicit:
                with trace_step(step):
                    model(x)
            else:
                model(x)
    rows = _records(tmp_path / "direct.h5")
    if not config.inputs:  # the attached root's inputs are always recorded, a submodule's only with inputs on
        rows = [row for row in rows if not (row[2] == "" and row[3].startswith("input"))]
    return rows


@pytest.mark.parametrize("inputs", [False, True], ids=["outputs", "inputs"])
@pytest.mark.parametrize("explicit", [False, True], ids=["implicit-steps", "trace_step"])
def test_wrapper_calling_its_model_records_like_the_model_attached_directly(tmp_path, inputs, explicit) -> None:
    config = TraceConfig(stats="sum,sample", inputs=inputs)
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = _direct(tmp_path, xs, config, explicit)
    torch.manual_seed(0)
    wrapper = Wrapper(TinyNet())
    with attach(wrapper, config=config, output=tmp_path / "wrapped.h5"):
        for step, x in enumerate(xs):
            if explicit:
                with trace_step(step):
                    wrapper(x)
            else:
                wrapper(x)
    got = _records(tmp_path / "wrapped.h5", prefix="model")
    assert got == expected
    with open_trace(tmp_path / "wrapped.h5") as trace:
        assert set(trace.record_modules().tolist()) >= {"", "model", "model.embed", "model.blocks.0.norm"}


@pytest.mark.parametrize("inputs", [False, True], ids=["outputs", "inputs"])
@pytest.mark.parametrize("explicit", [False, True], ids=["implicit-steps", "trace_step"])
def test_wrapper_never_called_but_its_model_is_still_records(tmp_path, inputs, explicit) -> None:
    config = TraceConfig(stats="sum,sample", inputs=inputs)
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = _direct(tmp_path, xs, config, explicit)
    torch.manual_seed(0)
    wrapper = Wrapper(TinyNet())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not empty: no warning at close
        with attach(wrapper, config=config, output=tmp_path / "wrapped.h5"):
            for step, x in enumerate(xs):
                if explicit:
                    with trace_step(step):
                        wrapper.model(x)
                else:
                    wrapper.model(x)
    got = _records(tmp_path / "wrapped.h5", prefix="model")
    assert got and got == expected
    with open_trace(tmp_path / "wrapped.h5") as trace:
        assert trace.steps == [0, 1, 2]
        assert "" not in set(trace.record_modules().tolist())  # the wrapper's forward never ran


def test_only_blocks_traced_one_step_per_model_call(tmp_path) -> None:
    """With ``model`` itself untraced, its return still ends the call its blocks opened: one step per call."""
    torch.manual_seed(0)
    wrapper = Wrapper(TinyNet())
    with attach(wrapper, config=TraceConfig(layers=r"^model\.blocks\.\d+$"), output=tmp_path / "t.h5"):
        for _ in range(2):
            wrapper.model(torch.randn(2, 4))
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0, 1]
        cols = trace.records.columns
        assert [(int(s), str(m)) for s, m in zip(cols["step"], trace.record_modules(), strict=True)] == [
            (step, f"model.blocks.{i}") for step in (0, 1) for i in range(3)
        ]


class _Raises(Exception):
    pass


class _Flaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 2)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        if self.fail:
            raise _Raises("planted")
        return self.second(x)


def test_a_failed_model_call_under_a_wrapper_is_dropped(tmp_path) -> None:
    wrapper = Wrapper(_Flaky())
    xs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with attach(wrapper, config=TraceConfig(stats="sum"), output=tmp_path / "t.h5"):
        for i, x in enumerate(xs):
            wrapper.model.fail = i == 1
            with pytest.raises(_Raises) if i == 1 else _nothing():
                wrapper.model(x)
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0, 2]  # the failed call's partial records dropped, its step left unused
        cols = trace.records.columns
        got = [(int(s), str(m)) for s, m in zip(cols["step"], trace.record_modules(), strict=True)]
        assert got == [(0, "model.first"), (0, "model.second"), (0, "model"),
                       (2, "model.first"), (2, "model.second"), (2, "model")]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_an_empty_trace_warns_at_close_naming_the_attached_model(tmp_path) -> None:
    torch.manual_seed(0)
    wrapper = Wrapper(TinyNet())
    other = TinyNet()
    with pytest.warns(RuntimeWarning, match=r"t\.h5 has no records .* attached Wrapper .*not the attached Wrapper"):
        with attach(wrapper, config=TraceConfig(), output=tmp_path / "t.h5"):
            other(torch.randn(2, 4))  # a different model than the attached one


def test_an_empty_trace_because_no_step_matched_says_so(tmp_path) -> None:
    model = TinyNet()
    with pytest.warns(RuntimeWarning, match=r"has no records .*ran in step\(s\) 0, 1, but the steps to record \(5"):
        with attach(model, config=TraceConfig(steps="5"), output=tmp_path / "t.h5"):
            model(torch.randn(2, 4))
            model(torch.randn(2, 4))


def test_first_drift_on_an_empty_side_names_it(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    with attach(model, config=TraceConfig(), output=tmp_path / "upstream.h5"):
        model(torch.randn(2, 4))
    with pytest.warns(RuntimeWarning, match="has no records"):
        with attach(Wrapper(model), config=TraceConfig(), output=tmp_path / "port.h5"):
            pass
    proc = run_cli("first-drift", str(tmp_path / "upstream.h5"), str(tmp_path / "port.h5"))
    assert_one_line_error(proc, f"the port trace {tmp_path / 'port.h5'} recorded nothing", "attached")
    assert "upstream.h5" not in proc.stderr
