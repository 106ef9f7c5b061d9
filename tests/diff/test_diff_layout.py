"""Records of different shape that hold the same values: broadcast and merged dimensions are not drift.

A port may compute per token what the upstream computes per sample and
broadcasts later (Wan 2.2's per-token timesteps), or return a tensor with its
dimensions merged (``(1, 384)`` against ``(1, 6, 64)``). Neither is a shape
mismatch: such records are compared on the statistics the layout does not
change, and a real error in them is still found. A transpose is a real
mismatch and stays one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tracediff.align.values import broadcast_equivalent
from tracediff.config import TraceConfig
from tracediff.diff.checks import same_layout as _same_layout
from tracediff.pipeline.analyse import analyse
from tracediff.pipeline.runner import trace_model

B, T, D = 2, 4, 16


class PerSample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, D)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.lin(t)  # (B, D), broadcast over tokens by the caller


class PerToken(PerSample):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.lin(t)[:, None, :].expand(B, T, D)  # (B, T, D): the same rows repeated


class Model(nn.Module):
    def __init__(self, time: nn.Module) -> None:
        super().__init__()
        self.time = time
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.time(t)
        return self.proj(x + (e if e.dim() == 3 else e[:, None, :]))


def _traces(tmp_path: Path, *, bug: bool = False) -> tuple[Path, Path]:
    torch.manual_seed(0)
    upstream = Model(PerSample()).eval()
    port = Model(PerToken()).eval()
    port.load_state_dict(upstream.state_dict())
    if bug:
        with torch.no_grad():
            port.time.lin.bias += 0.1
    inputs = {"x": torch.randn(B, T, D), "t": torch.randn(B, 8)}
    config = TraceConfig(stats="abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample", inputs=True)
    paths = tmp_path / "upstream.h5", tmp_path / "port.h5"
    for model, side, path in ((upstream, "upstream", paths[0]), (port, "port", paths[1])):
        trace_model(model, side=side, steps=[inputs], output=path, config=config)
    return paths


@pytest.mark.parametrize(("a", "b", "same"), [((B, T, D), (B, D), True), ((T, D), (1, D), True),
                                               ((B, T, D), (T, B, D), False), ((D,), (D,), False)])
def test_broadcast_equivalence(a, b, same) -> None:
    assert broadcast_equivalent(a, b) is same


@pytest.mark.parametrize(("a", "b", "same"), [((1, 6, 64), (1, 384), True), ((2, 3, 4), (24,), True),
                                               ((64, 32), (32, 64), False), ((2, 3, 4), (3, 8), False)])
def test_merged_dimensions(a, b, same) -> None:
    assert _same_layout(a, b) is same


def test_per_token_against_per_sample_is_not_drift(tmp_path: Path) -> None:
    upstream, port = _traces(tmp_path)
    analysis = analyse(upstream, port, tolerance="fp32")
    assert analysis, analysis.text()
    assert analysis.result.counts["shape_mismatch"] == 0
    time_rows = [row for row in analysis.result.rows if row.port == "time" and row.label == "out"]
    assert time_rows and time_rows[0].port_shape == (B, T, D) and time_rows[0].upstream_shape == (B, D)
    assert time_rows[0].checked and set(time_rows[0].stat_drift) >= {"abs_mean", "mean", "min", "max"}
    assert "l2" not in time_rows[0].stat_drift and "sum" not in time_rows[0].stat_drift


def test_an_error_in_the_broadcast_tensor_is_still_found(tmp_path: Path) -> None:
    upstream, port = _traces(tmp_path, bug=True)
    analysis = analyse(upstream, port, tolerance="fp32")
    first = analysis.result.first_drift
    assert first is not None and first.kind == "drift", analysis.text()
    assert first.culprit == "time.lin", analysis.text()
