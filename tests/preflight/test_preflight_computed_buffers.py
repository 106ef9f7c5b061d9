"""Pre-flight on non-persistent buffers: a table computed at construction is not a conversion error.

Upstream builds its rotary tables at construction, as diffusers' ``WanRotaryPosEmbed``
does: two buffers registered with ``persistent=False``, so not in the state dict, so
no checkpoint conversion carries them. The port computes the same tables on the fly
and holds no buffer. That is a quiet ``computed`` note, on either side; a persistent
buffer the other side lacks stays *missing*, and a non-persistent buffer present on
both sides is still compared. Persistence is known from the live models only
(``check_models``, ``check_traces(..., models=...)``): from trace files alone the
one-sided buffers stay *missing*, as the module table does not record persistence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tracediff.render.preflight as words
from tracediff import TraceConfig
from tracediff.pipeline.runner import trace_model
from tracediff.preflight import PreflightResult, check_models, check_traces
from tracediff.store.load import load_trace

DIM, SEQ = 16, 6
STATS = "abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample"


def rotary_tables(theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``SEQ×DIM``: one frequency per pair of channels."""
    inv = 1.0 / theta ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM)
    freqs = torch.outer(torch.arange(SEQ, dtype=torch.float32), inv).repeat_interleave(2, dim=-1)
    return freqs.cos(), freqs.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + swapped * sin


class Rotary(nn.Module):
    """Rotary tables built at construction and held as buffers (``persistent=False`` like diffusers')."""

    def __init__(self, *, persistent: bool = False, theta: float = 10000.0) -> None:
        super().__init__()
        cos, sin = rotary_tables(theta)
        self.register_buffer("freqs_cos", cos, persistent=persistent)
        self.register_buffer("freqs_sin", sin, persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.freqs_cos, self.freqs_sin)


class BufferModel(nn.Module):
    """A projection, then rotary tables held as buffers."""

    def __init__(self, *, persistent: bool = False, theta: float = 10000.0) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.rope = Rotary(persistent=persistent, theta=theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rope(self.proj(x))


class OnTheFly(nn.Module):
    """The same computation with the tables computed at each call: no buffer at all."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(self.fc(x), *rotary_tables())


def seeded(model: nn.Module) -> nn.Module:
    """Every parameter drawn from one seed, so the two sides can be loaded from each other."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn(param.shape) * 0.3)
    return model.eval()


CASES = {
    # upstream holds non-persistent tables, the port computes them on the fly (the Wan pair)
    "upstream_computed": lambda: (seeded(BufferModel()), seeded(OnTheFly())),
    # the other way round
    "port_computed": lambda: (seeded(OnTheFly()), seeded(BufferModel())),
    # persistent tables: in the state dict, so a conversion should carry them
    "persistent": lambda: (seeded(BufferModel(persistent=True)), seeded(OnTheFly())),
    # non-persistent tables on both sides, computed with another theta in the port
    "different": lambda: (seeded(BufferModel()), seeded(BufferModel(theta=500.0))),
}


def inputs() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(2, SEQ, DIM, generator=torch.Generator().manual_seed(1))}


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """``case -> (upstream trace, port trace)``, real HDF5 files recorded from one forward pass each."""
    root = tmp_path_factory.mktemp("computed_buffers")
    out = {}
    for case, build in CASES.items():
        paths = []
        for model, side in zip(build(), ("upstream", "port"), strict=True):
            path = root / f"{case}-{side}.h5"
            trace_model(model, side=side, steps=[inputs()], output=path, config=TraceConfig(stats=STATS))
            paths.append(path)
        out[case] = (paths[0], paths[1])
    return out


def live_results(case: str, traces: dict[str, tuple[Path, Path]]) -> list[PreflightResult]:
    """With the live models: ``check_models``, and the traces checked with ``models=``."""
    upstream, port = CASES[case]()
    live = check_models(upstream, port)
    with load_trace(traces[case][0]) as up, load_trace(traces[case][1]) as tr:
        traced = check_traces(up, tr, models=(upstream, port))
    return [live, traced]


def traces_only(case: str, traces: dict[str, tuple[Path, Path]]) -> PreflightResult:
    with load_trace(traces[case][0]) as up, load_trace(traces[case][1]) as tr:
        return check_traces(up, tr)


def buffers(result: PreflightResult) -> list:
    return [p for p in result.params if p.kind == "buffer"]


def explain(result: PreflightResult) -> str:
    return words.summary(result) + "\n" + "\n".join(words.line(p) for p in result.params)


# -- not in the state dict: a note -------------------------------------------------------


def test_upstream_tables_computed_at_construction_are_a_note(traces) -> None:
    for result in live_results("upstream_computed", traces):
        assert result, explain(result)
        assert result.source == "models"
        assert words.counts_line(result) == ("4 parameters and buffers compared: 2 identical, "
                                        "2 computed (not in the state dict)")
        assert words.summary(result).startswith("pre-flight: clean; ")
        cos, sin = buffers(result)
        assert [(c.upstream, c.port, c.status, c.finding, c.failing) for c in (cos, sin)] == [
            ("rope.freqs_cos", None, "computed", False, False), ("rope.freqs_sin", None, "computed", False, False)]
        assert words.line(cos) == ("upstream rope.freqs_cos (buffer) not in the state dict (computed at construction), "
                              "not converted; no port module holds its values")
        assert words.line(cos) in words.notes(result) and words.line(sin) in words.notes(result)
        data = words.preflight_json(result)
        assert data["ok"] and data["counts"] == {"identical": 2, "computed": 2} and data["findings"] == []
        assert [p["status"] for p in data["params"] if p["kind"] == "buffer"] == ["computed", "computed"]


def test_port_tables_computed_at_construction_are_a_note(traces) -> None:
    for result in live_results("port_computed", traces):
        assert result, explain(result)
        assert result.counts == {"identical": 2, "computed": 2}
        assert [(c.upstream, c.port, c.status) for c in buffers(result)] == [
            (None, "rope.freqs_cos", "computed"), (None, "rope.freqs_sin", "computed")]
        assert words.line(buffers(result)[0]).startswith(
            "rope.freqs_cos (buffer) not in the state dict (computed at construction), not converted")


# -- real errors stay findings -----------------------------------------------------------


def test_a_persistent_buffer_the_port_lacks_is_still_missing(traces) -> None:
    for result in live_results("persistent", traces):
        assert not result
        assert result.counts == {"identical": 2, "missing_in_port": 2}
        assert [(c.upstream, c.status, c.failing) for c in result.weight_findings] == [
            ("rope.freqs_cos", "missing_in_port", True), ("rope.freqs_sin", "missing_in_port", True)]


def test_a_computed_buffer_on_both_sides_is_still_compared(traces) -> None:
    for result in live_results("different", traces) + [traces_only("different", traces)]:
        assert not result, explain(result)
        assert [(c.upstream, c.port, c.status) for c in result.weight_findings] == [
            ("rope.freqs_cos", "rope.freqs_cos", "different"), ("rope.freqs_sin", "rope.freqs_sin", "different")]


def test_from_traces_alone_persistence_is_unknown(traces) -> None:
    """The module table does not record persistence: one-sided buffers stay missing there (see the docs)."""
    result = traces_only("upstream_computed", traces)
    assert result.source == "traces"
    assert not result
    assert [(c.upstream, c.status) for c in result.weight_findings] == [
        ("rope.freqs_cos", "missing_in_port"), ("rope.freqs_sin", "missing_in_port")]
