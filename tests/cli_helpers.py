"""Run the real ``python -m tracediff`` in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m tracediff ARGS`` with a wide terminal so rich does not wrap names."""
    full_env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), **(env or {})}
    for name in list(full_env):
        if name.startswith("FASTVIDEO_TRACE_"):
            full_env.pop(name)
    return subprocess.run(
        [sys.executable, "-m", "tracediff", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Expected failures: exit 2, one line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def report_lines(stdout: str) -> list[str]:
    """The first-drift report's lines, from its headline on (the pre-flight block comes before it)."""
    lines = stdout.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(("first drift:", "no drift:")):
            return lines[index:]
    return lines
