"""The benchmark scripts keep running: each one's ``--smoke`` size prints its table (no timing is asserted).

Their full-size figures, on the machines they are meant for, are in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def _run(script: str, *args: str, tmp_path: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--smoke", *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_overhead_smoke_prints_modes_targets_and_ratios(tmp_path) -> None:
    out = _run("bench_overhead.py", "--workdir", str(tmp_path), tmp_path=tmp_path)
    for row in ("| untraced |", "| tracing off (attach, disabled) |", "| tracediff stats, blocks |",
                "| tracediff stats, all modules |", "| naive hook, all modules |", "| tracediff full, 2 blocks |"):
        assert row in out, out
    assert "| block-level stats <= 3 % |" in out
    assert "| naive / tracediff overhead, all modules >= 5x |" in out
    assert "full trace write rate vs disk sequential write" in out


def test_bench_diff_smoke_times_first_drift(tmp_path) -> None:
    out = _run("bench_diff.py", "--workdir", str(tmp_path), tmp_path=tmp_path)
    assert "| first-drift end to end, median of 1 (s) |" in out
    assert "| in-process phase: read (s) |" in out and "| in-process phase: diff (s) |" in out
    assert "| exit code / first drift | 1 / transformer_blocks.2.ffn.act step 0 (drift) |" in out
    assert "| target: <= 5 s |" in out


def test_profile_overhead_smoke_runs(tmp_path) -> None:
    out = _run("profile_overhead.py", "--workdir", str(tmp_path), "--out", str(tmp_path / "prof"), tmp_path=tmp_path)
    assert "no-op stats" in out and "writer thread, blocks" in out
    assert (tmp_path / "prof" / "profile-blocks.txt").exists()
