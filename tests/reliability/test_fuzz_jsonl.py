"""Property-based fuzzing of the FastVideo JSONL importer: exact records, or the first bad line by number.

Files are built from lines whose validity is known by construction (valid
records, every kind of broken line, blank lines), so each example has an
independent expectation: the records in order with their call indices and
values, or an error naming the file and the first bad line's number. With
``skip_bad_lines`` the same records come back and the skipped lines are counted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracediff.errors import TraceFormatError
from tracediff.store.jsonl import VALUE_STATS, read_jsonl

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

modules = st.sampled_from(["blocks.0", "blocks.1", "blocks.0.attn", "head", "<odd name> \u00e9", ""])
labels = st.sampled_from(["out", "out[0]", "out.sample", "x"])
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-10**6, 10**6))


@st.composite
def valid_line(draw) -> tuple[str, dict]:
    record: dict = {"module": draw(modules)}
    if draw(st.booleans()):
        record["tensor"] = draw(labels)
    record["step"] = draw(st.one_of(st.none(), st.integers(0, 3)))
    for name in draw(st.lists(st.sampled_from(VALUE_STATS), unique=True, max_size=4)):
        record[name] = draw(st.one_of(numbers, st.just("<error: boom>")))
    if draw(st.booleans()):
        record["shape"] = draw(st.lists(st.integers(0, 6), max_size=8))
    if draw(st.booleans()):
        record["dtype"] = draw(st.sampled_from(["torch.float32", "bfloat16", None]))
    return json.dumps(record), record


invalid_line = st.one_of(
    st.sampled_from([
        "{not json", "[1, 2]", "42", '"a string"', "null", '{"tensor": "out"}', '{"module": 3}',
        '{"module": "a", "step": -1}', '{"module": "a", "step": 1.5}', '{"module": "a", "step": true}',
        '{"module": "a", "step": "0"}', '{"module": "a", "shape": [1, -2]}', '{"module": "a", "shape": "2x2"}',
        '{"module": "a", "shape": [1,1,1,1,1,1,1,1,1]}', '{"module": "a", "tensor": 5}', '{"module": "a"',
    ]),
    st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and not t.lstrip().startswith(("{", "["))
                                            and "\n" not in t and "\r" not in t),
)
line = st.one_of(
    valid_line().map(lambda v: ("valid", v[0], v[1])),
    invalid_line.map(lambda text: ("invalid", text, None)),
    st.sampled_from(["", "   "]).map(lambda text: ("blank", text, None)),
)


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jsonl")


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _check_records(trace, lines: list[tuple[str, str, dict | None]]) -> None:  # noqa: ANN001
    records = [record for kind, _, record in lines if kind == "valid"]
    assert len(trace.records) == len(records)
    calls: dict[tuple, int] = {}
    modules_in_trace = trace.record_modules().tolist()
    labels_in_trace = trace.record_labels().tolist()
    for i, record in enumerate(records):
        step = -1 if record["step"] is None else record["step"]
        key = (record["module"], record.get("tensor", "out"), step)
        assert modules_in_trace[i] == record["module"]
        assert labels_in_trace[i] == record.get("tensor", "out")
        assert trace.records.columns["step"][i] == step
        assert trace.records.columns["call"][i] == calls.get(key, 0)
        calls[key] = calls.get(key, 0) + 1
        if "shape" in record:
            assert trace.records.shape_of(i) == tuple(record["shape"])
        for name in VALUE_STATS:
            if name in trace.records.direct:
                got = trace.records.direct[name][i]
                want = _number(record.get(name))
                assert (math.isnan(got) and math.isnan(want)) or got == want, (name, got, want)


@FUZZ
@given(lines=st.lists(line, max_size=12), skip=st.booleans())
def test_jsonl_importer_gives_the_records_or_the_first_bad_line(jsonl_dir, lines, skip, tally) -> None:
    tally["fuzz_jsonl"] += 1
    path = jsonl_dir / "trace.jsonl"
    path.write_text("".join(text + "\n" for _, text, _ in lines), encoding="utf-8")
    bad = [number for number, (kind, _, _) in enumerate(lines, start=1) if kind == "invalid"]
    valid = sum(kind == "valid" for kind, _, _ in lines)
    try:
        trace = read_jsonl(path, skip_bad_lines=skip)
    except TraceFormatError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message
        if bad and not skip:
            assert message.startswith(f"{path}:{bad[0]}: "), (message, bad)
        else:
            assert valid == 0 and "no records" in message, message
        return
    assert not bad or skip, "a bad line was accepted"
    assert valid > 0, "a file without one valid record was accepted"
    assert trace.meta["skipped_lines"] == (len(bad) if skip else 0)
    _check_records(trace, lines)


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.binary(max_size=100).map(lambda b: b'{"module": "a"}\n' + b)))
def test_jsonl_importer_on_arbitrary_bytes(jsonl_dir, content, tally) -> None:
    tally["fuzz_jsonl"] += 1
    path = jsonl_dir / "bytes.jsonl"
    path.write_bytes(content)
    for skip in (False, True):
        try:
            trace = read_jsonl(path, skip_bad_lines=skip)
        except TraceFormatError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
            continue
        assert len(trace.records) >= 1
        assert np.all(trace.records.columns["call"] >= 0)
