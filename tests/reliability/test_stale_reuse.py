"""Reduction reuse must never record stale values (values changed without a version-counter bump).

``torch.distributed.all_reduce`` in place, writes through ``.data`` and through
``.numpy()`` change a tensor's values but not its ``_version``: a module's input
that is the previous module's output must be reduced again when the model's own
code ran in between.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tracediff
from tracediff import TraceConfig, open_trace

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("allreduce_run.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _record(path: Path | str, module: str, label: str) -> tuple[float, np.ndarray]:
    with open_trace(path) as trace:
        modules = trace.record_modules()
        for i in range(len(trace.records)):
            if str(modules[i]) == module and trace.records.label_of(i) == label:
                return float(trace.records.columns["sum"][i]), np.asarray(trace.sample(i))
    raise AssertionError(f"no record {module} {label} in {path}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_in_place_all_reduce_under_gloo_is_recorded_as_reduced(tmp_path: Path) -> None:
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FASTVIDEO_TRACE_", "TRACEDIFF_"))}
    base.update(PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "t.h5")], env={**base, "RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["b_input_sum"] == pytest.approx(results[1]["b_input_sum"])  # all-reduced: equal on both
    for result in results:
        recorded, _ = _record(result["path"], "b", "input[0]")
        assert recorded == pytest.approx(result["b_input_sum"], rel=1e-6), result


class _Writer(nn.Module):
    """The parent changes its first child's output without bumping its version counter."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        version = h._version
        if self.how == "data":
            h.data.mul_(3.0)
        else:
            h.detach().numpy()[...] *= 3.0
        assert h._version == version  # the premise: nothing tells the recorder the values changed
        self.true = h.detach().clone()
        return self.b(h)


@pytest.mark.parametrize("how", ["data", "numpy"])
def test_writes_the_version_counter_does_not_see_are_recorded(tmp_path: Path, how: str) -> None:
    torch.manual_seed(0)
    model = _Writer(how)
    path = tmp_path / "t.h5"
    with tracediff.attach(model, side="port", config=TraceConfig(stats="sum,sample,full", inputs=True), output=path):
        model(torch.randn(3, 4))
    total, sample = _record(path, "b", "input[0]")
    assert total == pytest.approx(float(model.true.double().sum()), rel=1e-9)
    with open_trace(path) as trace:
        index = [i for i in range(len(trace.records))
                 if str(trace.record_modules()[i]) == "b" and trace.records.label_of(i) == "input[0]"][0]
        assert np.array_equal(trace.full(index).reshape(-1), model.true.numpy().reshape(-1))
    assert np.allclose(sample, model.true.numpy().reshape(-1)[: sample.size])


def test_a_foreign_hook_between_sequential_children_prevents_reuse(tmp_path: Path) -> None:
    """Inside nn.Sequential reuse is kept, unless another hook (foreign code) runs in between."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))

    def triple(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.data.mul_(3.0)  # returns None: the same tensor object goes on, changed, at the same version

    path = tmp_path / "t.h5"
    x = torch.randn(3, 4)
    with tracediff.attach(model, side="port", config=TraceConfig(stats="sum", inputs=True), output=path):
        handle = model[0].register_forward_hook(triple)  # after ours: runs between 0's record and 1's
        model(x)
    handle.remove()
    with torch.no_grad():
        true = model[0](x) * 3.0
    total, _ = _record(path, "1", "input[0]")
    assert total == pytest.approx(float(true.double().sum()), rel=1e-9)
