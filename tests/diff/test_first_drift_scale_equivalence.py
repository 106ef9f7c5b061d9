"""first-drift at scale: the faster paths give exactly what the plain ones give.

* element metrics of equal-length records, taken a block of rows at a time, equal the
  whole-matrix results bit for bit;
* record columns and samples read straight from the file equal what h5py reads.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import TinyNet
from tracediff import TraceConfig, attach, open_trace, trace_step
from tracediff.diff import elements as d
from tracediff.store import reader
from tracediff.store.format import RECORD_COLUMNS


def _pair(n: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = rng.normal(size=n * length) * rng.uniform(0.1, 10, size=n).repeat(length)
    a = b + rng.normal(scale=1e-4, size=n * length)
    a[5 * length : 6 * length] = 0.0  # a record of zeros on both sides
    b[5 * length : 6 * length] = 0.0
    return a, b


@pytest.mark.parametrize("scattered", [False, True])
def test_blocks_give_the_whole_matrix_results_bit_for_bit(monkeypatch, scattered: bool) -> None:
    n, length = 301, 64
    a, b = _pair(n, length)
    rng = np.random.default_rng(1)
    offsets = np.arange(n) * length
    a_off = rng.permutation(offsets) if scattered else offsets
    b_off = rng.permutation(offsets) if scattered else offsets
    atol, rtol = np.full(n, 1e-5), np.full(n, 1e-4)
    atol[::7] = 1e-3  # per-record tolerances (overrides)
    whole = d._uniform_metrics(d._rows_of(a, a_off, length), d._rows_of(b, b_off, length), atol, rtol)
    assert whole is not None
    monkeypatch.setattr(d, "_BLOCK_ELEMENTS", length * 13)  # many blocks, the last one short
    blocks = d._uniform_blocks(a, a_off, b, b_off, length, atol, rtol)
    assert blocks is not None
    for name in d._SEGMENT_KEYS:
        assert np.array_equal(blocks[name], whole[name], equal_nan=True), name


def test_a_non_finite_element_sends_the_whole_group_to_the_general_path(monkeypatch) -> None:
    n, length = 120, 32
    a, b = _pair(n, length, seed=2)
    a[97 * length + 3] = np.nan  # in a late block: the earlier blocks' results must not be kept
    offsets = np.arange(n) * length
    lens = np.full(n, length)
    atol, rtol = np.full(n, 1e-5), np.full(n, 1e-4)
    monkeypatch.setattr(d, "_BLOCK_ELEMENTS", length * 10)
    assert d._uniform_blocks(a, offsets, b, offsets, length, atol, rtol) is None
    got = d._chunk_metrics(a, offsets, b, offsets, lens, atol, rtol)
    general = d._segment_metrics(a, offsets, b, offsets, lens, atol, rtol)
    for name in d._SEGMENT_KEYS:
        assert np.array_equal(got[name], general[name], equal_nan=True), name


@pytest.fixture(scope="module")
def sampled_trace(tmp_path_factory) -> str:
    """A trace with samples over several steps (several commits, so chunks are not all back to back)."""
    out = tmp_path_factory.mktemp("scale") / "ref.h5"
    torch.manual_seed(0)
    model = TinyNet()
    handle = attach(model, side="ref", config=TraceConfig(stats="abs_mean,sum,sample", inputs=True), output=str(out))
    with torch.no_grad():
        for step in range(40):
            with trace_step(step):
                model(torch.randn(3, 4))
    handle.close()
    return str(out)


def _everything(path: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, bool]:
    with open_trace(path) as trace:
        columns = {k: v.copy() for k, v in trace.records.columns.items()}
        direct = getattr(trace.samples, "_chunks", None) is not None
        samples = np.asarray(trace.samples)
        middle = np.empty(len(samples) // 3)
        trace.samples.read_into(middle, len(samples) // 3)
        assert np.array_equal(middle, samples[len(samples) // 3 : len(samples) // 3 + len(middle)])
        return columns, trace.records.shape.copy(), samples, direct


def test_direct_reads_equal_h5py_reads(sampled_trace: str, monkeypatch) -> None:
    columns, shape, samples, direct = _everything(sampled_trace)
    assert direct, "the trace's samples should be read straight from the file"
    with h5py.File(sampled_trace, "r") as f:
        count = len(columns["seq"])
        for name, dtype in RECORD_COLUMNS.items():
            expected = np.asarray(f["records"][name][:count], dtype=dtype)
            assert columns[name].dtype == expected.dtype and np.array_equal(columns[name], expected), name
        assert np.array_equal(shape, np.asarray(f["records/shape"][:count], dtype=np.int64).reshape(shape.shape))
        assert np.array_equal(samples, f["samples"][: len(samples)], equal_nan=True)
    monkeypatch.setattr(reader._FileMap, "open", classmethod(lambda cls, path, handle: None))
    plain_columns, plain_shape, plain_samples, plain_direct = _everything(sampled_trace)
    assert not plain_direct
    assert all(np.array_equal(columns[k], plain_columns[k]) for k in columns)
    assert np.array_equal(shape, plain_shape) and np.array_equal(samples, plain_samples, equal_nan=True)


def test_closing_the_trace_closes_the_file(sampled_trace: str) -> None:
    trace = open_trace(sampled_trace)
    fd = trace.samples._chunks.file.fd
    os.fstat(fd)
    trace.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError):
        trace.samples.read_into(np.empty(4), 0)


@pytest.mark.parametrize("budget", [0, 3, 5, 10_000])
def test_html_leaves_out_the_same_steps_without_building_their_rows(tmp_path, monkeypatch, budget: int) -> None:
    from tests.diff.test_diff import identity, record
    from tracediff import diff as d
    from tracediff.render import html as report_html

    values = {"a": torch.ones(3), "b": torch.ones(3)}
    upstream = record(tmp_path, "ref", values, steps=4)
    port = record(tmp_path, "port", values, steps=4, step_values={2: {"b": torch.full((3,), 2.0)}})
    result = d.diff_traces(upstream, port, identity(upstream, port))
    monkeypatch.setattr(report_html, "MAX_EMBEDDED_ROWS", budget)
    for step in result.steps:
        assert report_html._step_count(result, step) == len(report_html._step_rows(result, step))
    data = report_html.report_data(result)
    # what the loop did before counting first: build every step's rows, leave out those over the budget
    left, kept = [], []
    for step in result.steps:
        rows = report_html._step_rows(result, step)
        if step != result.curve_step and len(rows) > budget:
            left.append(step)
            continue
        budget -= len(rows)
        kept.append(step)
    assert data["steps_left_out"] == left
    assert [s["step"] for s in data["steps"]] == kept
