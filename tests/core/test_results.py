"""One result protocol (tracediff.results): every result type is truthy when clean and gives JSON-ready data."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tracediff.bisect import bisect_models
from tracediff.config import TraceConfig
from tracediff.demo.convert import PARAM_NAMES_MAPPING
from tracediff.demo.models import make_inputs, make_port, make_upstream
from tracediff.parity import Diagnosis
from tracediff.pipeline.analyse import analyse
from tracediff.pipeline.runner import SideResult, trace_model
from tracediff.results import Result, finite_or_none, json_ready


def _strict_json(value: object) -> str:
    """JSON as a strict reader takes it: no NaN, no Infinity."""
    return json.dumps(value, allow_nan=False)


@pytest.fixture(scope="module")
def analyses(tmp_path_factory) -> dict[str, object]:
    """A clean and a buggy demo pair, traced and analysed for real."""
    out = {}
    for name, bug in (("clean", None), ("bug", "gelu_tanh")):
        folder = tmp_path_factory.mktemp(name)
        config = TraceConfig(stats=("abs_mean", "l2", "sample"))
        for side, model in (("upstream", make_upstream(0)), ("port", make_port(0, bug=bug))):
            trace_model(model, side=side, steps=[make_inputs(0)], output=folder / f"{side}.h5", config=config)
        out[name] = analyse(folder / "upstream.h5", folder / "port.h5", param_map=PARAM_NAMES_MAPPING,
                            tolerance="fp32", out_dir=folder)
    return out


def test_analysis_diff_and_preflight_follow_the_protocol(analyses) -> None:
    clean, buggy = analyses["clean"], analyses["bug"]
    for result in (clean, clean.result, clean.preflight, buggy, buggy.result):
        assert isinstance(result, Result)
        _strict_json(result.to_json())
    assert clean and clean.result and clean.preflight
    assert not buggy and not buggy.result


def test_bisection_follows_the_protocol() -> None:
    upstream, inputs = make_upstream(0), make_inputs(0)
    clean = bisect_models(upstream, make_port(0), inputs, param_map=PARAM_NAMES_MAPPING, tolerance="single-block")
    buggy = bisect_models(upstream, make_port(0, bug="gelu_tanh"), inputs, param_map=PARAM_NAMES_MAPPING,
                          tolerance="single-block")
    assert isinstance(clean, Result) and isinstance(buggy, Result)
    assert clean and not buggy
    assert _strict_json(buggy.to_json())


def test_a_side_and_a_diagnosis_follow_the_protocol(analyses, tmp_path) -> None:
    side = SideResult(side="port", trace=tmp_path / "port.h5", seconds=0.5, records=3, failures={})
    failed = dataclasses.replace(side, failures={"blocks.0": "RuntimeError: boom"})
    assert isinstance(side, Result) and side and not failed
    assert json.loads(_strict_json(failed.to_json()))["trace"] == str(tmp_path / "port.h5")

    ran = Diagnosis(out_dir=tmp_path, analysis=analyses["bug"])
    broke = Diagnosis(out_dir=tmp_path, error="the port raised")
    assert isinstance(ran, Result)
    assert not ran and not broke  # a drift, and a diagnosis that could not run, are never "clean"
    assert Diagnosis(out_dir=tmp_path, analysis=analyses["clean"])
    assert json.loads(_strict_json(broke.to_json()))["error"] == "the port raised"
    assert json.loads(_strict_json(ran.to_json()))["analysis"] == json.loads(_strict_json(analyses["bug"].to_json()))


def test_json_ready_makes_every_value_strict_json() -> None:
    @dataclasses.dataclass
    class Point:
        x: float
        where: Path

    class HasJson:
        def to_json(self) -> dict[str, object]:
            return {"inner": float("nan")}

    value = {
        "nan": math.nan, "inf": -math.inf, "one": 1.0, "count": np.int64(3), "scale": np.float32(0.5),
        "shape": (2, 3), "path": Path("a/b.h5"), "point": Point(np.inf, Path("p")), "nested": [HasJson()],
        "array": np.array([1.0, np.nan]), "flag": np.bool_(True), 7: "int key",
    }
    assert json_ready(value) == {
        "nan": None, "inf": None, "one": 1.0, "count": 3, "scale": 0.5, "shape": [2, 3], "path": "a/b.h5",
        "point": {"x": None, "where": "p"}, "nested": [{"inner": None}], "array": [1.0, None], "flag": True,
        "7": "int key",
    }
    _strict_json(json_ready(value))


def test_finite_or_none_and_a_value_json_cannot_hold() -> None:
    assert finite_or_none(None) is None and finite_or_none(math.nan) is None and finite_or_none(2) == 2.0
    with pytest.raises(TypeError, match="object is not JSON-ready"):
        json_ready(object())
