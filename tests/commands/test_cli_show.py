"""``tracediff show`` in a real subprocess."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli_helpers import assert_one_line_error, run_cli

FIXTURE = Path(__file__).parent.parent / "data" / "trace_v1.h5"


def test_show_summary_and_module_table() -> None:
    proc = run_cli("show", str(FIXTURE))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "side" in out and "ref" in out
    assert "tests.conftest.TinyNet" in out
    assert "0, 1" in out  # steps
    assert "14" in out  # records
    assert "abs_mean, sum, min, max, std, sample" in out
    for module in ("<model>", "embed", "blocks.0", "blocks.2", "head"):
        assert module in out


def test_show_module_filter_and_json() -> None:
    proc = run_cli("show", str(FIXTURE), "--module", r"^blocks\.1$", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["summary"]["records"] == 14
    assert data["summary"]["steps"] == [0, 1]
    assert [row["module"] for row in data["modules"]] == ["blocks.1"]
    assert data["modules"][0]["records"] == 2
    assert data["modules"][0]["shape"] == [2, 8]


def test_show_bad_inputs_exit_2_one_line(tmp_path) -> None:
    assert_one_line_error(run_cli("show", str(tmp_path / "nope.h5")), "nope.h5", "no such file")
    (tmp_path / "junk.h5").write_text("hello")
    assert_one_line_error(run_cli("show", str(tmp_path / "junk.h5")), "junk.h5", "not a readable HDF5 file")
    assert_one_line_error(run_cli("show", str(FIXTURE), "--module", "("), "--module='('")
    proc = run_cli("show")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "trace" in proc.stderr
