"""The benchmark scripts keep running: each one's ``--smoke`` size prints its table (no timing is asserted).

Their full-size figures, on the machines they are meant for, are in docs/benchmarks.md.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import tracediff

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def _run(script: str, *args: str, tmp_path: Path, status: int = 0) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--smoke", *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _load(script: str) -> Any:
    """A script as a module (its functions tested in-process)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), SCRIPTS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


BENCH_MODES = ("untraced", "tracing off (attach, disabled)", "blocks, stats only", "blocks, default config",
               "all modules, stats only", "all modules, default config", "FastVideo-style hook, all modules")


def test_bench_overhead_smoke_prints_every_mode_and_each_target_with_a_verdict(tmp_path) -> None:
    out = _run("bench_overhead.py", "--workdir", str(tmp_path), tmp_path=tmp_path)
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for mode in BENCH_MODES:
        assert mode in rows and "REFUSED" not in rows[mode], out
    for target in ("blocks, stats only <= 1 %", "blocks, default config <= 1 %",
                   "all modules, default config <= 8 %",
                   "FastVideo-style overhead / tracediff default overhead, all modules >= 25x"):
        assert target in rows, out
        assert rows[target].rstrip().endswith(("| PASS |", "| MISS |")), rows[target]
    assert "REFUSED" not in out
    assert list(tmp_path.glob("tracediff-bench-*")) == []  # trace files removed


def test_bench_overhead_refuses_the_figures_of_a_failed_trace(tmp_path) -> None:
    out = _run("bench_overhead.py", "--workdir", str(tmp_path), "--plant-failure", "--json", str(tmp_path / "r.json"),
               tmp_path=tmp_path, status=3)
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for mode in ("all modules, stats only", "all modules, default config"):
        assert "REFUSED: the trace reports failures: {'probe':" in rows[mode], out
        assert "%" not in rows[mode]
    assert "REFUSED" not in rows["untraced"]
    for mode in ("blocks, stats only", "blocks, default config"):  # the probe is not a block: still reported
        assert "REFUSED" not in rows[mode] and "%" in rows[mode], out
    assert rows["all modules, default config <= 8 %"].rstrip().endswith("| REFUSED |")
    assert "REFUSED: 2 mode(s) measured a broken trace" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results["refused"]) == {"all modules, stats only", "all modules, default config"}
    assert "overhead" not in results["results"]["all modules, default config"]


def test_bench_overhead_refuses_a_trace_with_missing_records() -> None:
    bench = _load("bench_overhead.py")
    mode = bench.MODES[-2]
    bench.check(SimpleNamespace(failures={}, records_written=10), mode, 10)
    with pytest.raises(bench.Refused, match="holds 9 records where the module calls give 10"):
        bench.check(SimpleNamespace(failures={}, records_written=9), mode, 10)


def test_bench_overhead_counts_the_records_tracediff_writes(tmp_path) -> None:
    bench = _load("bench_overhead.py")
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.Tanh(), nn.Linear(5, 2)))
    x = torch.randn(3, 4)
    counts = bench.count_calls(model, {"input": x})
    for mode in bench.MODES:
        if mode.kind != "tracediff":
            continue
        layers = r"^1\.\d+$" if mode.layers else None
        config = tracediff.TraceConfig(layers=layers, stats=mode.stats, inputs=mode.inputs)
        with tracediff.attach(model, side="port", config=config, output=tmp_path / f"{mode.name}.h5") as handle:
            model(input=x)
            model(input=x)
        assert handle.records_written == 2 * counts.records(dataclasses.replace(mode, layers=layers)), mode


def test_benchmarks_trace_what_run_traces_and_use_only_the_public_api() -> None:
    from tracediff.pipeline.spec import DEFAULT_STATS

    for script in ("bench_overhead.py", "bench_hook_cost.py"):
        module = _load(script)
        assert module.DEFAULT_STATS == DEFAULT_STATS
        assert module.STATS_ONLY.split(",") == [s for s in DEFAULT_STATS.split(",") if s != "sample"]
        tree = ast.parse((SCRIPTS / script).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        ours = {name for name in imported if name and name.startswith("tracediff")}
        assert ours <= {"tracediff", "tracediff.demo.models", "tracediff.demo.upstream_dit"}, (script, ours)
        names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not {"recorder", "_recorder", "_Staged", "_state", "writer"} & names, script


def test_bench_hook_cost_smoke_prints_microseconds_per_call(tmp_path) -> None:
    out = _run("bench_hook_cost.py", "--workdir", str(tmp_path), "--json", str(tmp_path / "c.json"),
               tmp_path=tmp_path)
    for mode in ("default", "stats-only", "blocks"):
        assert f"| {mode} |" in out, out
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["modes"]["default"]["records"] > result["modes"]["default"]["traced_calls"] > 100
    assert result["modes"]["blocks"]["traced_calls"] == 4


def test_profile_overhead_smoke_runs(tmp_path) -> None:
    out = _run("profile_overhead.py", "--workdir", str(tmp_path), "--out", str(tmp_path / "prof"), tmp_path=tmp_path)
    assert "no-op stats" in out and "writer thread, blocks" in out
    assert (tmp_path / "prof" / "profile-blocks.txt").exists()
