"""Module inputs in traces: recorded before the module runs, and used to blame the caller.

A bug in a module's own forward *between* two of its children first shows in
the output of the child that runs next, which is correct code. With module
inputs traced, that child's input already differs, and first-drift names the
module whose code called it. These tests plant such bugs in small real models,
trace both sides into real HDF5 files and check the whole chain: recorder,
differ, headline, JSON, and that clean pairs with different calling conventions
stay clean.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import tracediff
from tracediff import TraceConfig
from tracediff.align.aligner import align as align_traces
from tracediff.align.alignment import Alignment, Pair
from tracediff.config import ENV_INPUTS
from tracediff.diff import caller_of, diff_traces
from tracediff.errors import TraceConfigError
from tracediff.render.report import headline, render_terminal, to_json
from tracediff.store.trace import Trace

STATS = "abs_mean,sum,min,max,l2,sample"


class Block(nn.Module):
    """Two projections with a scale applied by the block's own code between them."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, 8)
        self.proj_out = nn.Linear(8, 8)
        self.scale = scale

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.proj_out(self.proj_in(x) * self.scale)


class Net(nn.Module):
    """Three blocks in a ModuleList and a head; ``between`` scales the stream after block 0."""

    def __init__(self, *, scales: tuple[float, ...] = (1.0, 1.0, 1.0), between: float = 1.0,
                 gate_scale: float | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(s) for s in scales)
        self.head = nn.Linear(8, 3)
        self.between = between
        self.gate_scale = gate_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            # ``gate``: a second argument the blocks ignore, with other values on each side
            gate = None if self.gate_scale is None else torch.ones_like(x) * self.gate_scale
            x = block(x, gate)
            if index == 0:
                x = x * self.between
        return self.head(x)


def build(**kwargs: object) -> Net:
    torch.manual_seed(0)
    model = Net(**kwargs)  # type: ignore[arg-type]
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model


def trace(model: nn.Module, path: Path, *, inputs: bool = True) -> Trace:
    torch.manual_seed(2)
    x = torch.randn(2, 5, 8)
    with tracediff.attach(model, side=path.stem, config=TraceConfig(stats=STATS, inputs=inputs), output=path):
        model(x)
    return tracediff.open_trace(path)


def diff(tmp_path: Path, port: Net, *, inputs: bool = True, upstream: Net | None = None):
    up = trace(upstream or build(), tmp_path / "upstream.h5", inputs=inputs)
    pt = trace(port, tmp_path / "port.h5", inputs=inputs)
    return diff_traces(up, pt, align_traces(up, pt), tolerance="fp32")


# -- recorder ----------------------------------------------------------------------------------


def test_inputs_are_recorded_before_the_module_runs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(6, 4)
    with tracediff.attach(model, side="port", config=TraceConfig(stats="sum,sample", inputs=True),
                          output=tmp_path / "t.h5") as handle:
        assert handle.hook_count == 2 + 2 * 3  # the root's pre/post hooks, then a pre and a post hook per module
        model(x)
        model(x)
    t = tracediff.open_trace(tmp_path / "t.h5")
    cols = t.records.columns
    first_step = np.flatnonzero(cols["step"] == 0)
    order = [(t.modules.names[cols["module"][i]], t.records.label_of(i)) for i in first_step]
    assert order == [("", "input[0]"), ("0", "input[0]"), ("0", "out"), ("1", "input[0]"), ("1", "out"),
                     ("2", "input[0]"), ("2", "out"), ("", "out")]
    # Recorded by a pre-hook: the in-place ReLU has not yet overwritten its input.
    relu_in = [i for i in first_step if t.modules.names[cols["module"][i]] == "1"][0]
    with torch.no_grad():
        expected = float(model[0](x).sum())
    assert cols["sum"][relu_in] == pytest.approx(expected, rel=1e-5)
    assert float(cols["sum"][relu_in]) != pytest.approx(float(cols["sum"][relu_in + 1]))
    assert t.config["inputs"] is True
    # Each call's inputs carry that call's number, like its outputs.
    calls = {(int(cols["step"][i]), int(cols["call"][i])) for i in range(len(t.records))}
    assert calls == {(0, 0), (1, 0)}


def test_inputs_are_off_by_default_and_add_no_hook(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with tracediff.attach(model, side="port", config=TraceConfig(stats="sum"), output=tmp_path / "t.h5") as handle:
        assert handle.hook_count == 2 + 2
        model(torch.randn(2, 4))
    t = tracediff.open_trace(tmp_path / "t.h5")
    labels = {t.records.label_of(i) for i in range(len(t.records)) if t.records.columns["module"][i] != 0}
    assert labels == {"out"}
    assert t.config["inputs"] is False


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("on", True), ("0", False), ("", False)])
def test_env_switch(value: str, expected: bool) -> None:
    assert TraceConfig.from_env({ENV_INPUTS: value}).inputs is expected


def test_env_switch_rejects_other_values() -> None:
    with pytest.raises(TraceConfigError, match=r"TRACEDIFF_TRACE_INPUTS='maybe' is not a switch value; use 1/true/on"):
        TraceConfig.from_env({ENV_INPUTS: "maybe"})


# -- first drift -------------------------------------------------------------------------------


def test_bug_between_two_children_is_blamed_on_their_parent(tmp_path: Path) -> None:
    result = diff(tmp_path, build(scales=(1.0, 1.5, 1.0)))
    first = result.first_drift
    assert first is not None and first.kind == "drift"
    assert (first.port, first.label) == ("blocks.1.proj_out", "input[0]")
    assert (first.culprit, first.culprit_upstream) == ("blocks.1", "blocks.1")
    assert first.before_call
    assert headline(result).startswith(
        "first drift: blocks.1 (upstream blocks.1), step 0: its own code, before it calls blocks.1.proj_out "
        "(upstream blocks.1.proj_out), whose input[0] (call 0) already differs: abs error "
    )
    assert result.last_good is not None and (result.last_good.port, result.last_good.label) == (
        "blocks.1.proj_in", "out")
    data = to_json(result)["first_drift"]
    assert (data["culprit"], data["port"], data["before_call"]) == ("blocks.1", "blocks.1.proj_out", True)


def test_a_bug_in_the_models_own_code_looks_through_the_module_list(tmp_path: Path) -> None:
    result = diff(tmp_path, build(between=1.25))
    first = result.first_drift
    assert first is not None and (first.port, first.label) == ("blocks.1", "input[0]")
    assert first.culprit == ""  # "blocks" is a ModuleList: it never runs, the model's forward called blocks.1
    assert headline(result).startswith("first drift: <model> (upstream <model>), step 0: its own code, before it "
                                       "calls blocks.1")


def test_a_module_that_is_itself_wrong_is_still_named(tmp_path: Path) -> None:
    port = build()
    with torch.no_grad():
        port.blocks[2].proj_in.bias.add_(0.5)
    first = diff(tmp_path, port).first_drift
    assert first is not None and (first.culprit, first.port, first.label) == ("blocks.2.proj_in",) * 2 + ("out",)
    assert not first.before_call


def test_without_inputs_the_report_says_where_else_to_look(tmp_path: Path) -> None:
    result = diff(tmp_path, build(scales=(1.0, 1.5, 1.0)), inputs=False)
    first = result.first_drift
    assert first is not None and (first.culprit, first.port, first.label) == ("blocks.1.proj_out",) * 2 + ("out",)
    assert not result.module_inputs
    buffer = io.StringIO()
    render_terminal(result, Console(file=buffer, width=200, color_system=None))
    assert ("module inputs were not recorded: if blocks.1.proj_out's own code is right, the error was made before "
            "it ran, in blocks.1; trace with TRACEDIFF_TRACE_INPUTS=1 to tell") in buffer.getvalue()


def test_a_differing_argument_the_output_does_not_show_is_no_drift(tmp_path: Path) -> None:
    # Both sides pass blocks a second tensor with other values; the blocks ignore it.
    result = diff(tmp_path, build(gate_scale=3.0), upstream=build(gate_scale=1.0))
    assert result.first_drift is None, headline(result)
    gates = [row for row in result.rows if row.label == "input[1]"]
    assert len(gates) == 3 and all(row.ratio > 1 and not row.failed for row in gates)


def test_unpaired_and_reshaped_inputs_are_neither_findings_nor_checks(tmp_path: Path) -> None:
    class Total(nn.Module):
        def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
            return x.sum()

    class Outer(nn.Module):
        """Hands ``total`` the tensor transposed and with an extra argument on the port side."""

        def __init__(self, port: bool) -> None:
            super().__init__()
            self.total = Total()
            self.port = port

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.port:
                return self.total(x.t().contiguous(), torch.zeros(1))
            return self.total(x)

    x = torch.randn(3, 4)
    traces = []
    for side in ("upstream", "port"):
        path = tmp_path / f"{side}.h5"
        model = Outer(port=side == "port")
        with tracediff.attach(model, side=side, config=TraceConfig(stats=STATS, inputs=True), output=path):
            model(x)
        traces.append(tracediff.open_trace(path))
    alignment = Alignment(pairs=[Pair("", "", "map", 1.0), Pair("total", "total", "map", 1.0)])
    result = diff_traces(*traces, alignment, tolerance="fp32")
    assert result.first_drift is None, headline(result)
    assert result.counts["shape_mismatch"] == 0 and result.counts["missing_in_upstream"] == 0
    total = [(row.label, row.checked) for row in result.rows if row.port == "total"]
    assert total == [("input[0]", False), ("out", True)]  # (4, 3) against (3, 4): left unchecked
    assert (result.unchecked, result.unchecked_inputs) == (1, 1)


def test_caller_of_skips_containers_that_never_run(tmp_path: Path) -> None:
    t = trace(build(), tmp_path / "t.h5")
    assert caller_of("blocks.1.proj_out", t) == "blocks.1"
    assert caller_of("blocks.1", t) == ""
    assert caller_of("head", t) == ""


def test_alignment_is_the_same_with_and_without_inputs(tmp_path: Path) -> None:
    from tracediff.demo.models import make_inputs, make_port, make_upstream

    found = []
    for inputs in (False, True):
        traces = []
        for side, model in (("upstream", make_upstream(0)), ("port", make_port(0))):
            path = tmp_path / f"{side}-{inputs}.h5"
            with tracediff.attach(model, side=side, config=TraceConfig(stats=STATS, inputs=inputs), output=path):
                with torch.no_grad():
                    model(**make_inputs(0))
            traces.append(tracediff.open_trace(path))
        alignment = align_traces(*traces)
        found.append(sorted((p.upstream, p.port) for p in alignment.pairs))
    assert found[0] == found[1] and len(found[0]) > 50


def test_an_input_that_is_the_previous_output_is_reduced_once(tmp_path: Path, monkeypatch) -> None:
    from tracediff.hooks import recorder

    reduced: list[tuple[int, ...]] = []
    real = recorder.moments

    def counting(tensor: torch.Tensor) -> torch.Tensor:
        reduced.append(tuple(tensor.shape))
        return real(tensor)

    monkeypatch.setattr(recorder, "moments", counting)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    with tracediff.attach(model, side="port", config=TraceConfig(stats="sum", inputs=True), output=tmp_path / "t.h5"):
        model(torch.randn(3, 4))
    # x is the model's input and Linear 0's; each output is the next module's input (and the
    # last one the model's output): 4 distinct tensors behind 8 records.
    assert reduced == [(3, 4), (3, 5), (3, 5), (3, 2)]
    assert len(tracediff.open_trace(tmp_path / "t.h5").records) == 8


def test_inference_mode_tensors_are_recorded_without_reuse(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    with tracediff.attach(model, side="port", config=TraceConfig(stats="sum", inputs=True), output=tmp_path / "t.h5"):
        with torch.inference_mode():
            model(torch.randn(3, 4) - 1.0)
    t = tracediff.open_trace(tmp_path / "t.h5")
    sums = [float(v) for v in t.records.columns["sum"]]
    labels = [t.records.label_of(i) for i in range(len(t.records))]
    assert labels == ["input[0]", "input[0]", "out", "input[0]", "out", "out"]
    assert sums[3] != pytest.approx(sums[4])  # ReLU's input before its in-place change, its output after


def test_full_values_of_a_shared_tensor_are_stored_once(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    with tracediff.attach(model, side="port", config=TraceConfig(stats="full", inputs=True), output=tmp_path / "t.h5"):
        model(x)
    t = tracediff.open_trace(tmp_path / "t.h5")
    cols = t.records.columns
    # 8 records, 4 distinct tensors: 12 + 15 + 15 + 6 values stored
    assert len(t.records) == 8
    ranges = {(int(cols["full_offset"][i]), int(cols["full_len"][i])) for i in range(8)}
    assert sorted(ranges) == [(0, 12), (12, 15), (27, 15), (42, 6)]
    with torch.no_grad():
        hidden = model[0](x)
    assert np.allclose(t.full(2), hidden.numpy()) and np.allclose(t.full(3), hidden.numpy())  # 0's out, 1's in
