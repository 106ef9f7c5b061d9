"""FastVideo JSONL traces: reading them, and diffing them against JSONL or HDF5.

:func:`write_fastvideo_trace` reproduces FastVideo's activation tracer
(``fastvideo/hooks/activation_trace.py``): forward hooks on every named module
but the root, stats computed in float32, one JSON object per output tensor with
``module``, ``tensor`` and ``step`` (null outside ``trace_step``), appended.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import tracediff
from tests.conftest import TinyNet
from tests.diff.test_diff_demo import demo_alignment
from tracediff import TraceConfig
from tracediff.align.alignment import Alignment, Pair
from tracediff.demo import BUGS, make_inputs, make_port, make_upstream
from tracediff.diff import diff_traces
from tracediff.errors import TraceFormatError
from tracediff.store.jsonl import read_jsonl
from tracediff.store.load import load_trace

#: FastVideo's stat functions, verbatim in behaviour (float32, unbiased std).
FASTVIDEO_STATS: dict[str, Any] = {
    "abs_mean": lambda t: float(t.detach().float().abs().mean().item()),
    "sum": lambda t: float(t.detach().float().sum().item()),
    "min": lambda t: float(t.detach().float().min().item()),
    "max": lambda t: float(t.detach().float().max().item()),
    "mean": lambda t: float(t.detach().float().mean().item()),
    "std": lambda t: float(t.detach().float().std().item()),
    "shape": lambda t: list(t.shape),
    "dtype": lambda t: str(t.dtype),
}


def _flatten(obj: Any, prefix: str = "out") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, (tuple, list)):
        return [item for i, value in enumerate(obj) for item in _flatten(value, f"{prefix}[{i}]")]
    if isinstance(obj, dict):
        return [item for key, value in obj.items() for item in _flatten(value, f"{prefix}.{key}")]
    return []


def write_fastvideo_trace(
    model: nn.Module,
    path: Path,
    calls: Iterable[tuple[int | None, dict[str, Any]]],
    *,
    stats: tuple[str, ...] = ("abs_mean", "sum"),
) -> Path:
    """Run ``model(**kwargs)`` for each ``(step, kwargs)`` and write what FastVideo's tracer would."""
    state: dict[str, int | None] = {"step": None}
    handles = []
    with path.open("a", buffering=1) as sink:

        def make_hook(name: str) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                for label, tensor in _flatten(output):
                    line = {"module": name, "tensor": label, "step": state["step"]}
                    line.update({stat: FASTVIDEO_STATS[stat](tensor) for stat in stats})
                    sink.write(json.dumps(line, default=str) + "\n")

            return hook

        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        try:
            with torch.no_grad():
                for step, kwargs in calls:
                    state["step"] = step
                    model(**kwargs)
        finally:
            for handle in handles:
                handle.remove()
    return path


def demo_calls(steps: int = 2) -> list[tuple[int | None, dict[str, Any]]]:
    return [(step, make_inputs(0, step=step * 20)) for step in range(steps)]


def same_names(upstream: tracediff.Trace, port: tracediff.Trace) -> Alignment:
    shared = set(upstream.modules.names) & set(port.modules.names)
    return Alignment(pairs=[Pair(n, n, "map", 1.0) for n in sorted(shared)])


# -- reading -------------------------------------------------------------------------------


def test_read_jsonl_columns(tmp_path: Path) -> None:
    path = tmp_path / "fv.jsonl"
    lines = [
        {"module": "blocks.0", "tensor": "out", "step": None, "abs_mean": 1.5, "sum": -2.0, "shape": [2, 3],
         "dtype": "torch.bfloat16"},
        {"module": "blocks.0", "tensor": "out", "step": None, "abs_mean": 1.25, "sum": 4.0, "shape": [2, 3],
         "dtype": "torch.bfloat16"},
        {"module": "head", "tensor": "out[1]", "step": 3, "abs_mean": "<error: RuntimeError()>", "max": 7.0},
    ]
    path.write_text("\ufeff" + "\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    trace = read_jsonl(path)
    cols = trace.records.columns
    assert len(trace.records) == 3
    assert trace.modules.names == ["", "blocks.0", "head"]
    assert trace.modules.params == []
    assert cols["step"].tolist() == [-1, -1, 3]  # null step -> -1
    assert cols["call"].tolist() == [0, 1, 0]  # n-th line of the same (module, tensor, step) is call n
    assert trace.record_labels().tolist() == ["out", "out", "out[1]"]
    assert trace.records.shape_of(0) == (2, 3) and cols["numel"].tolist() == [6, 6, -1]
    assert trace.records.dtype_of(0) == "bfloat16" and trace.records.dtype_of(2) == ""
    assert trace.has_stat("abs_mean") and trace.has_stat("max") and not trace.has_stat("l2")
    np.testing.assert_array_equal(trace.stat("sum"), [-2.0, 4.0, np.nan])
    assert np.isnan(trace.stat("abs_mean")[2])  # FastVideo's "<error: ...>" value
    assert trace.meta["format"] == "fastvideo-jsonl" and trace.meta["skipped_lines"] == 0


def test_broken_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    good = json.dumps({"module": "a", "tensor": "out", "step": 0, "abs_mean": 1.0})
    path.write_text(f"{good}\n{good}\n{{\"module\": \"a\", \"tensor\"\n{good}\n[1, 2]\n")
    with pytest.raises(TraceFormatError, match=r"broken\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    trace = read_jsonl(path, skip_bad_lines=True)
    assert len(trace.records) == 3 and trace.meta["skipped_lines"] == 2
    path.write_text(f"{good}\n" + json.dumps({"tensor": "out", "step": 0}) + "\n")
    with pytest.raises(TraceFormatError, match=r":2: missing or non-string 'module'"):
        read_jsonl(path)
    path.write_text(json.dumps({"module": "a", "step": "zero"}) + "\n")
    with pytest.raises(TraceFormatError, match=r":1: 'step' must be null or an integer"):
        read_jsonl(path)


def test_load_trace_decides_by_content(tmp_path: Path, tiny_net: TinyNet) -> None:
    h5 = tmp_path / "trace.out"
    with tracediff.attach(tiny_net, side="ref", config=TraceConfig(stats="abs_mean"), output=h5):
        tiny_net(torch.randn(2, 4))
    jsonl = write_fastvideo_trace(tiny_net, tmp_path / "trace.txt", [(0, {"x": torch.randn(2, 4)})])
    with load_trace(h5) as trace:
        assert trace.meta["side"] == "ref"
    assert load_trace(jsonl).meta["format"] == "fastvideo-jsonl"
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(TraceFormatError, match="neither a tracediff HDF5 trace nor a FastVideo JSONL"):
        load_trace(tmp_path / "notes.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TraceFormatError, match="empty file"):
        load_trace(tmp_path / "empty.jsonl")
    with pytest.raises(TraceFormatError, match="no such file"):
        load_trace(tmp_path / "missing.jsonl")


# -- diffing -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo pair as FastVideo JSONL and as tracediff HDF5, clean and with ``ln_eps``."""
    root = tmp_path_factory.mktemp("fv")
    stats = ("abs_mean", "sum", "max", "shape", "dtype")
    files = {
        "up.jsonl": write_fastvideo_trace(make_upstream(0), root / "up.jsonl", demo_calls(), stats=stats),
        "clean.jsonl": write_fastvideo_trace(make_port(0), root / "clean.jsonl", demo_calls(), stats=stats),
        "bug.jsonl": write_fastvideo_trace(make_port(0, bug="ln_eps"), root / "bug.jsonl", demo_calls(), stats=stats),
    }
    for name, model in (("up.h5", make_upstream(0)), ("bug.h5", make_port(0, bug="ln_eps"))):
        with tracediff.attach(model, side=name, config=TraceConfig(stats="abs_mean,sum,max"), output=root / name):
            for step, kwargs in demo_calls():
                with tracediff.trace_step(step), torch.no_grad():
                    model(**kwargs)
        files[name] = root / name
    return files


@pytest.mark.parametrize(
    ("upstream", "port"),
    [("up.jsonl", "bug.jsonl"), ("up.jsonl", "bug.h5"), ("up.h5", "bug.jsonl")],
    ids=["jsonl-jsonl", "jsonl-hdf5", "hdf5-jsonl"],
)
def test_jsonl_either_side_finds_the_planted_module(demo_files: dict[str, Path], upstream: str, port: str) -> None:
    with load_trace(demo_files[upstream]) as up, load_trace(demo_files[port]) as po:
        result = diff_traces(up, po, demo_alignment(up, po))
    first = result.first_drift
    assert first is not None and first.kind == "drift"
    assert (first.port, first.upstream) == (BUGS["ln_eps"].port_module, BUGS["ln_eps"].upstream_module)
    assert first.step == 0 and result.drifting_steps == [0, 1]
    assert first.row is not None and first.row.elements == "" and first.row.check in ("abs_mean", "max", "sum")


def test_jsonl_clean_pair_and_mixed_formats_pass(demo_files: dict[str, Path]) -> None:
    with load_trace(demo_files["up.jsonl"]) as up, load_trace(demo_files["clean.jsonl"]) as po:
        result = diff_traces(up, po, demo_alignment(up, po))
    assert result, result.first_drift
    assert result.steps == [0, 1] and result.counts["dtype_mismatch"] == 0
    # FastVideo's float32 stats against tracediff's float64 ones: still the same numbers
    with load_trace(demo_files["up.jsonl"]) as up, load_trace(demo_files["up.h5"]) as same:
        mixed = diff_traces(up, same, same_names(up, same))
    assert mixed, mixed.first_drift
    # the model's own inputs and output are only in the HDF5 trace: counted, not findings
    assert mixed.one_sided_modules == 1
    assert mixed.findings == []


def test_step_null_meets_a_single_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference, port = TinyNet(), TinyNet()
    port.load_state_dict(reference.state_dict())
    port.blocks[1].norm.eps = 0.5
    x = torch.randn(3, 4)
    jsonl = write_fastvideo_trace(reference, tmp_path / "ref.jsonl", [(None, {"x": x})], stats=("abs_mean", "shape"))
    with tracediff.attach(port, side="port", config=TraceConfig(stats="abs_mean"), output=tmp_path / "port.h5"):
        port(x)
    with load_trace(jsonl) as up, load_trace(tmp_path / "port.h5") as po:
        result = diff_traces(up, po, same_names(up, po))
    assert result.steps == [0]
    assert result.first_drift is not None and result.first_drift.port == "blocks.1.norm"
    assert result.last_good is not None and result.last_good.port == "blocks.0"
