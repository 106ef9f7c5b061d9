"""The differ on real HDF5 traces of small models whose outputs are known exactly.

Each test model is a chain of :class:`Emit` modules that return fixed tensors, so
every recorded value is known in the test and every metric can be recomputed
here independently (numpy, ``torch.testing.assert_close``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from torch import nn

import tracediff
from tracediff import TraceConfig
from tracediff.align.alignment import Alignment, Pair
from tracediff.diff import DEFAULT_FAIL_ON, KINDS, diff_traces
from tracediff.errors import DiffError
from tracediff.render.html import to_html
from tracediff.render.report import headline, to_json
from tracediff.store.trace import Trace
from tracediff.tolerance import PRESETS, Override, Tolerance, parse_override, preset

ALL_STATS = "abs_mean,sum,min,max,mean,std,l2"


class Emit(nn.Module):
    """Returns a fixed tensor (scaled by how often it was called, to tell calls apart)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.clone()


class Chain(nn.Module):
    """Runs its emitters in order; ``repeat`` names an emitter that runs twice."""

    def __init__(self, values: dict[str, torch.Tensor], repeat: str | None = None) -> None:
        super().__init__()
        self.order = list(values)
        self.repeat = repeat
        for name, value in values.items():
            self.add_module(name, Emit(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.order:
            out = self.get_submodule(name)(x)
            if name == self.repeat:
                out = self.get_submodule(name)(x)
        return out


def record(tmp_path: Path, side: str, values: dict[str, torch.Tensor], *, stats: str = ALL_STATS,
           steps: int = 1, step_values: dict[int, dict[str, torch.Tensor]] | None = None,
           repeat: str | None = None) -> Trace:
    """Trace a :class:`Chain` for ``steps`` steps into ``tmp_path/side.h5`` and open it."""
    model = Chain(values, repeat=repeat)
    path = tmp_path / f"{side}.h5"
    with tracediff.attach(model, side=side, config=TraceConfig(stats=stats), output=path):
        for step in range(steps):
            for name, value in (step_values or {}).get(step, {}).items():
                model.get_submodule(name).value = value
            model(torch.zeros(1))
    return tracediff.open_trace(path)


def identity(*traces: Trace) -> Alignment:
    names = set(traces[0].modules.names)
    for trace in traces[1:]:
        names &= set(trace.modules.names)
    return Alignment(pairs=[Pair(name, name, "map", 1.0) for name in sorted(names)])


def diff(tmp_path: Path, ref: dict[str, torch.Tensor], port: dict[str, torch.Tensor], **kwargs):
    stats = kwargs.pop("stats", ALL_STATS)
    repeat = kwargs.pop("repeat", None)
    upstream = record(tmp_path, "ref", ref, stats=stats)
    ported = record(tmp_path, "port", port, stats=stats, repeat=repeat)
    return diff_traces(upstream, ported, identity(upstream, ported), **kwargs)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- metrics ---------------------------------------------------------------------------


def test_element_metrics_match_independent_computation(tmp_path: Path) -> None:
    ref = _randn(4, 50, seed=1)
    port = ref + 1e-3 * _randn(4, 50, seed=2)
    result = diff(tmp_path, {"a": ref}, {"a": port}, stats=ALL_STATS + ",full", tolerance=Tolerance(atol=1e-2, rtol=0))
    row = next(r for r in result.rows if r.port == "a")
    a, b = port.double().numpy().ravel(), ref.double().numpy().ravel()
    err = a - b
    assert row.elements == "full"
    assert row.max_abs_err == pytest.approx(np.abs(err).max(), rel=1e-12)
    assert row.rel_l2 == pytest.approx(np.linalg.norm(err) / np.linalg.norm(b), rel=1e-12)
    assert row.cosine == pytest.approx(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), rel=1e-12)
    assert row.sqnr_db == pytest.approx(10 * np.log10((b @ b) / (err @ err)), rel=1e-12)
    assert row.drift == row.rel_l2  # the curve shows relative L2 error when elements exist
    assert row.check == "elements" and not row.failed
    assert row.ratio == pytest.approx(np.abs(err).max() / 1e-2, rel=1e-12)


@pytest.mark.parametrize("scale", [1e-6, 3e-5, 1e-4, 3e-4, 1e-3])
def test_element_verdict_agrees_with_assert_close(tmp_path: Path, scale: float) -> None:
    ref = _randn(3, 40, seed=3)
    port = ref + scale * _randn(3, 40, seed=4)
    tol = Tolerance(atol=1e-5, rtol=2e-4)
    result = diff(tmp_path, {"a": ref}, {"a": port}, stats="sample", tolerance=tol)
    try:
        torch.testing.assert_close(port, ref, atol=tol.atol, rtol=tol.rtol)
        expected_pass = True
    except AssertionError:
        expected_pass = False
    assert bool(result) is expected_pass
    if not expected_pass:
        first = result.first_drift
        assert first is not None and first.kind == "drift" and first.port == "a"
        allowed = tol.atol + tol.rtol * ref.abs()
        worst = ((port - ref).abs() / allowed).argmax()
        assert first.value == pytest.approx(float((port - ref).abs().flatten()[worst]), rel=1e-6)
        assert first.limit == pytest.approx(float(allowed.flatten()[worst]), rel=1e-6)


def test_stat_drift_is_relative_with_atol_floor(tmp_path: Path) -> None:
    ref = {"a": torch.full((10,), 2.0), "b": torch.full((10,), 1e-9)}
    port = {"a": torch.full((10,), 2.02), "b": torch.full((10,), 2e-9)}
    result = diff(tmp_path, ref, port, tolerance=Tolerance(atol=1e-6, rtol=1e-3, stat_rtol=5e-3))
    rows = {r.port: r for r in result.rows}
    assert rows["a"].stat_drift["abs_mean"] == pytest.approx(0.01, rel=1e-6)
    assert rows["a"].stat_drift["l2"] == pytest.approx(0.01, rel=1e-6)
    assert rows["a"].stat_drift["max"] == pytest.approx(0.01, rel=1e-6)
    assert rows["a"].failed and rows["a"].ratio == pytest.approx(0.01 / 5e-3, rel=1e-5)
    # b is zero at this tolerance: its drift is measured against atol, not its tiny magnitude
    assert rows["b"].stat_drift["abs_mean"] == pytest.approx(1e-9 / 1e-6, rel=1e-5)
    assert not rows["b"].failed
    assert result.first_drift is not None and result.first_drift.port == "a"
    assert result.first_drift.metric.endswith("drift")


def test_mean_and_sum_are_measured_against_the_mass(tmp_path: Path) -> None:
    ref = torch.tensor([1.0, -1.0, 2.0, -2.0])  # mean and sum are 0
    port = ref + torch.tensor([1e-3, 0.0, 0.0, 0.0])
    result = diff(tmp_path, {"a": ref}, {"a": port}, tolerance=Tolerance(atol=1e-6, rtol=1e-2))
    row = result.rows[-1]
    abs_mean = 1.5
    assert row.stat_drift["mean"] == pytest.approx(1e-3 / 4 / abs_mean, rel=1e-4)
    assert row.stat_drift["sum"] == pytest.approx(1e-3 / (abs_mean * 4), rel=1e-4)
    assert result  # a 0.02% shift of the mass is within 1%


# -- tolerance -------------------------------------------------------------------------


def test_presets_are_data_and_validated() -> None:
    assert {"fp32", "single-block", "dit-aligned", "dit-bf16", "vae-fp32", "encoder"} <= set(PRESETS)
    assert preset("single-block").atol == 1e-4
    assert preset("dit-aligned").rtol == 1e-2
    bf16 = preset("dit-bf16")
    assert (bf16.atol, bf16.rtol, bf16.abs_mean_limit) == (0.1, 0.1, 0.05)
    assert preset("vae-fp32").atol == 5e-2 and preset("encoder").atol == 1e-3
    with pytest.raises(DiffError, match="unknown tolerance preset 'nope'.*dit-bf16"):
        preset("nope")
    with pytest.raises(DiffError, match="atol=-1"):
        Tolerance(atol=-1)
    with pytest.raises(DiffError, match="not a valid regex"):
        Override("(")


def test_override_by_regex_first_match_wins() -> None:
    tol = Tolerance(atol=1e-5, rtol=1e-5).with_overrides(
        [Override(r"^blocks\.3\.", atol=1e-2), Override(r"blocks", atol=1e-3, rtol=0.5)]
    )
    assert tol.for_module("blocks.3.ffn").atol == 1e-2
    assert tol.for_module("blocks.3.ffn").rtol == 1e-5  # the first match only sets atol
    assert tol.for_module("blocks.1", "x").rtol == 0.5
    assert tol.for_module("head", "upstream_blocks.0").atol == 1e-3  # either side's name may match
    assert tol.for_module("head", "head").atol == 1e-5
    parsed = parse_override(r"a(?=b)=atol:1e-3,stat_rtol:0.2")
    assert (parsed.pattern, parsed.atol, parsed.stat_rtol) == ("a(?=b)", 1e-3, 0.2)
    with pytest.raises(DiffError, match="key:value"):
        parse_override("blocks=foo:1")


def test_override_moves_the_first_drift(tmp_path: Path) -> None:
    ref = {"a": torch.ones(8), "b": torch.ones(8), "c": torch.ones(8)}
    port = {"a": torch.ones(8), "b": torch.full((8,), 1.01), "c": torch.full((8,), 1.01)}
    strict = diff(tmp_path, ref, port, tolerance=Tolerance(atol=1e-4, rtol=1e-4))
    assert strict.first_drift is not None and strict.first_drift.port == "b"
    loose_b = Tolerance(atol=1e-4, rtol=1e-4, overrides=(Override("^b$", stat_rtol=0.05),))
    moved = diff(tmp_path / "again", ref, port, tolerance=loose_b)
    assert moved.first_drift is not None and moved.first_drift.port == "c"
    assert moved.last_good is not None and moved.last_good.port == "b"


# -- findings ------------------------------------------------------------------------------


def test_findings_in_execution_order_with_dtype_note(tmp_path: Path) -> None:
    ref = {"a": torch.ones(4), "b": torch.ones(4), "c": torch.ones(4), "d": torch.ones(4)}
    port = {"a": torch.ones(4), "b": torch.ones(4, dtype=torch.float64), "c": torch.ones(4), "d": torch.full((4,), 2.0)}
    result = diff(tmp_path, ref, port)
    assert not result
    assert [f.kind for f in result.findings] == ["dtype_mismatch", "drift"]
    assert [f.port for f in result.findings] == ["b", "d"]
    assert result.first_drift is not None and result.first_drift.kind == "drift" and result.first_drift.port == "d"
    assert result.last_good is not None and result.last_good.port == "c"
    assert "float64" in result.findings[0].message and not result.findings[0].fatal
    assert result.counts["dtype_mismatch"] == 1
    # dtype mismatches become fatal on request, and then they come first
    strict = diff(tmp_path / "strict", ref, port, fail_on=DEFAULT_FAIL_ON | {"dtype_mismatch"})
    assert strict.first_drift is not None and strict.first_drift.kind == "dtype_mismatch"
    assert strict.first_drift.port == "b"


def test_nonfinite_is_reported_once_before_drift(tmp_path: Path) -> None:
    bad = torch.ones(6)
    bad[2] = float("nan")
    ref = {"a": torch.ones(6), "b": torch.ones(6), "c": torch.ones(6)}
    port = {"a": torch.ones(6), "b": bad, "c": bad.clone()}
    result = diff(tmp_path, ref, port, stats=ALL_STATS + ",nan_count,inf_count,sample")
    first = result.first_drift
    assert first is not None and first.kind == "nonfinite" and first.port == "b"
    assert "1 NaN" in first.message
    assert result.counts["nonfinite"] == 3  # b, c and the model output; only the first is listed
    assert [f.kind for f in result.findings] == ["nonfinite", "drift"]
    assert result.findings[1].port == "b"  # the same record also breaks the element check
    assert math.isinf(first.row.ratio)


def test_both_sides_nonfinite_is_no_finding(tmp_path: Path) -> None:
    bad = torch.tensor([1.0, float("inf"), 2.0])
    result = diff(tmp_path, {"a": bad}, {"a": bad.clone()}, stats=ALL_STATS + ",sample")
    assert result, headline(result)
    assert result.counts["nonfinite"] == 0


def test_shape_mismatch_comes_first(tmp_path: Path) -> None:
    ref = {"a": torch.ones(4, 4), "b": torch.ones(4, 4)}
    port = {"a": torch.ones(2, 8), "b": torch.full((4, 4), 3.0)}
    result = diff(tmp_path, ref, port, stats=ALL_STATS + ",sample")
    first = result.first_drift
    assert first is not None and first.kind == "shape_mismatch" and first.port == "a"
    assert "(2, 8)" in first.message and "(4, 4)" in first.message
    assert first.row is not None and first.row.elements == ""  # no element metrics across shapes


def test_missing_records_are_reported_where_they_happen(tmp_path: Path) -> None:
    ref = {"a": torch.ones(3), "b": torch.ones(3), "c": torch.ones(3)}
    result = diff(tmp_path, ref, dict(ref), repeat="b")
    assert result  # a second call on one side is reported, not fatal by default
    assert [(f.kind, f.port, f.call) for f in result.findings] == [("missing_in_upstream", "b", 1)]
    # reversed roles: the upstream-only call sits right after b's first call in port order
    upstream = record(tmp_path / "rev", "ref", ref, repeat="b")
    port = record(tmp_path / "rev", "port", ref)
    rev = diff_traces(upstream, port, identity(upstream, port), fail_on={"drift", "missing_in_port"})
    assert rev.first_drift is not None and rev.first_drift.kind == "missing_in_port"
    assert (rev.first_drift.upstream, rev.first_drift.call) == ("b", 1)
    assert rev.last_good is not None and rev.last_good.port == "b" and rev.last_good.call == 0


def test_steps_first_drift_and_later_steps(tmp_path: Path) -> None:
    ref_values = {"a": torch.ones(3), "b": torch.ones(3)}
    upstream = record(tmp_path, "ref", ref_values, steps=3)
    port = record(tmp_path, "port", ref_values, steps=3,
                  step_values={1: {"b": torch.full((3,), 2.0)}, 2: {"a": torch.full((3,), 5.0)}})
    alignment = identity(upstream, port)
    result = diff_traces(upstream, port, alignment)
    assert result.steps == [0, 1, 2]
    assert result.first_drift is not None and (result.first_drift.step, result.first_drift.port) == (1, "b")
    assert result.drifting_steps == [1, 2]
    assert result.curve_step == 1 and all(r.step == 1 for r in result.rows)
    assert diff_traces(upstream, port, alignment, step=0)
    only2 = diff_traces(upstream, port, alignment, step=2)
    assert only2.first_drift is not None and only2.first_drift.port == "a"
    with pytest.raises(DiffError, match="step 7 is not in both traces"):
        diff_traces(upstream, port, alignment, step=7)


def test_rows_follow_port_execution_order(tmp_path: Path) -> None:
    ref = {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2)}
    result = diff(tmp_path, ref, dict(ref))
    assert [r.port for r in result.rows] == ["", "a", "b", "c", ""]
    assert [r.label for r in result.rows] == ["input[0]", "out", "out", "out", "out"]
    assert [r.index for r in result.rows] == list(range(5))
    assert result.compared == 5 and result.aligned_modules == 4


def test_nothing_aligned_is_an_error(tmp_path: Path) -> None:
    upstream = record(tmp_path, "ref", {"a": torch.ones(2)})
    port = record(tmp_path, "port", {"z": torch.ones(2)})
    with pytest.raises(DiffError, match="nothing aligned: none of the 0 aligned module pair"):
        diff_traces(upstream, port, Alignment(pairs=[Pair("a", "nope", "map", 1.0)]))
    with pytest.raises(DiffError, match="unknown kind 'typo'"):
        diff_traces(upstream, port, identity(upstream, port), fail_on={"typo"})
    assert set(KINDS) >= DEFAULT_FAIL_ON


# -- rendering ------------------------------------------------------------------------------


def test_json_and_html_render_names_safely(tmp_path: Path) -> None:
    weird = "<b>&x"
    result = diff(tmp_path, {weird: torch.ones(3)}, {weird: torch.full((3,), 2.0)})
    assert headline(result).startswith(f"first drift: {weird} (upstream {weird}), step 0, call 0, tensor out: ")
    data = json.loads(json.dumps(to_json(result)))
    assert data["ok"] is False and data["first_drift"]["port"] == weird
    assert data["rows"][1]["stat_drift"]["abs_mean"] == pytest.approx(1.0)
    page = to_html(result)
    assert "<svg" in page and "&lt;b&gt;&amp;x" in page and weird not in page
    svg = ElementTree.fromstring(page[page.index("<svg") : page.index("</svg>") + len("</svg>")])
    assert svg.tag.endswith("svg") and any(el.tag.endswith("polyline") for el in svg.iter())
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
