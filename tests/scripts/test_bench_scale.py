"""Scale work of issue 20: the scale benchmarks run, bisection's low-memory mode, the differ's fast paths.

The benchmark scripts run for real at their ``--smoke`` size (no timing is asserted);
the performance changes must leave every verdict exactly as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tracediff.align.aligner import align
from tracediff.bisect import bisect_models
from tracediff.cli import main as cli_main
from tracediff.config import TraceConfig
from tracediff.demo.models import BUGS, DemoConfig, make_inputs, make_port, make_upstream
from tracediff.diff import diff_traces
from tracediff.pipeline.runner import trace_model
from tracediff.pipeline.spec import DEFAULT_STATS
from tracediff.store.reader import CommittedValues, open_trace

REPO = Path(__file__).resolve().parents[2]
PARAM_MAP = "tracediff.demo.convert:PARAM_NAMES_MAPPING"


def _script(name: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), "--smoke", *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_scale_smoke_times_first_drift_and_align(tmp_path: Path) -> None:
    out = _script("bench_scale.py", "--workdir", str(tmp_path), "--json", str(tmp_path / "scale.json"), cwd=tmp_path)
    for row in ("| first-drift CLI, fresh interpreter, median of 1 (s) |", "| first-drift in-process (cli.main)",
                "| align CLI, fresh interpreter, median of 1 (s) |", "| align() API alone, median (s) |"):
        assert row in out, out
    assert "| target: first-drift <= 5 s |" in out and "| target: align <= 2 s |" in out
    figures = json.loads((tmp_path / "scale.json").read_text())
    first = figures["first_drift"]
    assert first["records"][0] >= 20_000 and first["records"][1] >= 20_000
    assert first["exit_code"] == 1 and first["first_drift"].startswith("transformer_blocks.2.ffn.act step 0")
    assert figures["align"]["modules"][0] >= 300 and figures["align"]["modules"][1] >= 300
    assert figures["align"]["pairs"] > 0 and figures["align"]["suspects"] == 0


def test_bench_bisect_smoke_names_the_planted_module_in_both_modes(tmp_path: Path) -> None:
    out = _script("bench_bisect.py", "--json", str(tmp_path / "bisect.json"), cwd=tmp_path)
    assert "| default: culprit | transformer_blocks.2.ffn.act (ok) |" in out, out
    assert "| low_memory: culprit | transformer_blocks.2.ffn.act (ok) |" in out, out
    assert "target forward passes <= 2 x levels" in out and "target peak memory added <= 25 %" in out
    figures = json.loads((tmp_path / "bisect.json").read_text())
    default, low = figures["modes"]["default"], figures["modes"]["low_memory"]
    assert default["forward_passes"] == low["forward_passes"] == 3 * default["levels"]


@pytest.mark.parametrize("bug", ["rope_sign", "gelu_tanh"])
def test_low_memory_bisection_names_the_same_culprit_and_operator(bug: str) -> None:
    upstream, port = make_upstream(0), make_port(0, bug=bug)
    results = [bisect_models(upstream, port, make_inputs(0), param_map=PARAM_MAP, tolerance="single-block",
                             low_memory=low) for low in (False, True)]
    default, low = results
    assert default.culprit == low.culprit == BUGS[bug].port_module
    assert default.forward_passes == low.forward_passes
    assert [m.port for m in default.chain] == [m.port for m in low.chain]
    assert [m.local.ratio for m in default.chain] == pytest.approx([m.local.ratio for m in low.chain], rel=1e-9)
    if default.operator is not None and default.operator.port_op is not None:
        assert low.operator is not None and low.operator.port_op is not None
        assert low.operator.port_op.source.line == default.operator.port_op.source.line


def test_bisect_cli_takes_low_memory(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["bisect", "--demo", "rope_sign", "--low-memory", "--json"])
    assert code == 1
    assert json.loads(capsys.readouterr().out)["culprit"] == BUGS["rope_sign"].port_module


@pytest.fixture(scope="module")
def run_traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo pair traced as ``tracediff run`` does (default stats with ``sample``, module inputs on)."""
    work = tmp_path_factory.mktemp("traces")
    cfg = DemoConfig(depth=4)
    config = TraceConfig(stats=DEFAULT_STATS, inputs=True)
    paths = []
    for side, model in (("upstream", make_upstream(0, cfg)), ("port", make_port(0, cfg, bug="gelu_tanh"))):
        path = work / f"{side}.h5"
        with torch.no_grad():
            trace_model(model, side=side, output=path, config=config, count=3,
                        steps=(make_inputs(0, cfg, step=s) for s in range(3)))
        paths.append(path)
    return paths[0], paths[1]


def test_samples_read_on_demand_hold_what_the_file_holds(run_traces: tuple[Path, Path]) -> None:
    import h5py

    with open_trace(run_traces[1]) as trace:
        samples = trace.samples
        assert isinstance(samples, CommittedValues)
        with h5py.File(run_traces[1], "r") as raw:
            whole = raw["samples"][: len(samples)]
        assert len(whole) > 0 and np.array_equal(np.asarray(samples), whole)
        assert np.array_equal(samples[3:40], whole[3:40]) and samples[5] == whole[5]
        assert np.array_equal(samples[-4:], whole[-4:]) and len(samples[10:10]) == 0
        row = int(np.flatnonzero(trace.records.columns["sample_len"] > 0)[0])
        offset, length = (int(trace.records.columns[k][row]) for k in ("sample_offset", "sample_len"))
        assert np.array_equal(trace.sample(row), whole[offset : offset + length])


def test_lazy_samples_and_the_fast_element_path_give_the_same_verdicts(run_traces: tuple[Path, Path]) -> None:
    """Diffing with samples read chunk by chunk equals diffing with them in memory, record by record."""
    with open_trace(run_traces[0]) as up, open_trace(run_traces[1]) as port:
        alignment = align(up, port)
        lazy = diff_traces(up, port, alignment)
        in_memory = diff_traces(dataclasses.replace(up, samples=np.asarray(up.samples)),
                                dataclasses.replace(port, samples=np.asarray(port.samples)), alignment)
        assert lazy.first_drift is not None and lazy.first_drift.port == "transformer_blocks.2.ffn.act"
        assert lazy.counts == in_memory.counts and lazy.drifting_steps == in_memory.drifting_steps
        assert lazy.first_drift.port_record == in_memory.first_drift.port_record
        for step in lazy.steps:
            (r1, d1), (r2, d2) = lazy.curve(step), in_memory.curve(step)
            assert np.array_equal(r1, r2, equal_nan=True) and np.array_equal(d1, d2, equal_nan=True)


@pytest.mark.parametrize("non_finite", [False, True])
def test_fast_element_path_matches_the_general_one(non_finite: bool) -> None:
    """Equal-length records as a matrix give the per-segment results (NaN/Inf take the general path)."""
    from tracediff.diff import elements as d

    rng = np.random.default_rng(0)
    n, length = 50, 16
    b = rng.normal(size=n * length)
    a = b + rng.normal(scale=1e-4, size=n * length)
    if non_finite:
        a[7 * length + 3] = np.nan
        b[9 * length + 1] = np.inf
        a[9 * length + 1] = np.inf
    a[11 * length:12 * length] = 0.0
    b[11 * length:12 * length] = 0.0
    offsets = np.arange(n) * length
    lens = np.full(n, length)
    atol, rtol = np.full(n, 1e-5), np.full(n, 1e-4)
    general = d._segment_metrics(a, offsets, b, offsets, lens, atol, rtol)
    for order in (np.arange(n), rng.permutation(n)):  # back to back (a view) and scattered (copied rows)
        fast = d._chunk_metrics(a, offsets[order], b, offsets[order], lens, atol[order], rtol[order])
        for name, values in general.items():
            np.testing.assert_allclose(fast[name], values[order], rtol=1e-12, atol=0, equal_nan=True, err_msg=name)
