"""Script mode (``tracediff run --side NAME --out DIR -- python SCRIPT``) records what the user asked for.

Issue 19, problem 2: script mode accepted ``--stats/--layers/--steps/--preset`` and ignored them,
recording FastVideo's ``abs_mean,sum`` only. Now every trace setting reaches the traced script,
and a flag that means nothing there is refused, naming it. Problem 3: a script that raises or
exits non-zero is one line and exit 2 (never 1, "drift found", nor the script's own code).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.cli_helpers import assert_one_line_error, run_cli
from tracediff import open_trace
from tracediff.pipeline.spec import DEFAULT_STATS

SCRIPT = textwrap.dedent(
    """
    import torch
    from tracediff.demo.models import DemoConfig, make_inputs, make_port

    SMALL = DemoConfig(depth=2)
    model = make_port(0, SMALL)
    with torch.no_grad():
        for step in range(3):
            model(**make_inputs(0, SMALL, step))
    print("script finished")
    """
)
TRACE = "ref.VideoDiTTransformer.h5"


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "generate.py"
    path.write_text(SCRIPT)
    return path


def test_trace_settings_reach_the_traced_script(tmp_path, script) -> None:
    out = tmp_path / "ref"
    proc = run_cli("run", "--side", "ref", "--out", str(out), "--stats", "abs_mean,l2,sample", "--sample-size", "8",
                   "--layers", r"^transformer_blocks\.\d+$", "--trace-steps", "1-2", "--trace-inputs", "false",
                   "--", "python", str(script))
    assert proc.returncode == 0, proc.stderr
    assert "script finished" in proc.stdout
    with open_trace(out / TRACE) as trace:
        assert trace.config["stats"] == ["abs_mean", "l2", "sample"]
        assert trace.config["sample_size"] == 8
        assert trace.config["steps"] == [1, 2] and trace.steps == [1, 2]
        assert trace.config["inputs"] is False
        assert set(trace.record_modules()) == {"", "transformer_blocks.0", "transformer_blocks.1"}
        assert not any(str(label).startswith("input") for label in trace.record_labels()[trace.record_modules() != ""])
        assert trace.has_stat("l2") and np.isfinite(trace.stat("l2")).all()
        lengths = [len(trace.sample(i)) for i in range(len(trace.records)) if trace.sample(i) is not None]
        assert lengths and max(lengths) == 8


def test_default_records_what_every_run_mode_records(tmp_path, script) -> None:
    out = tmp_path / "ref"
    proc = run_cli("run", "--side", "ref", "--out", str(out), "--", "python", str(script))
    assert proc.returncode == 0, proc.stderr
    with open_trace(out / TRACE) as trace:
        assert trace.config["stats"] == DEFAULT_STATS.split(",")
        assert trace.config["inputs"] is True
        assert trace.steps == [0, 1, 2]


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--preset", "fp32"], ["--preset does not apply in script mode", "tracediff first-drift"]),
        (["--atol", "1e-3", "--rtol", "1e-3"], ["--atol does not apply in script mode"]),
        (["--steps", "2"], ["--steps does not apply in script mode", "--trace-steps"]),
        (["--port-factory", "m.py:build"], ["--port-factory does not apply in script mode"]),
        (["--inputs-kwarg", "batch=4"], ["--inputs-kwarg does not apply in script mode"]),
        (["--bisect"], ["--bisect does not apply in script mode"]),
        (["--isolate-sides"], ["--isolate-sides does not apply in script mode"]),
        (["--json"], ["--json does not apply in script mode"]),
        (["--demo", "clean"], ["--demo does not apply in script mode"]),
        (["--stats", "abs_mean,bogus"], ["--stats='abs_mean,bogus' has unknown stat 'bogus'"]),
        (["--layers", "blocks.("], ["--layers='blocks.(' is not a valid Python regex"]),
        (["--trace-steps", "1,x"], ["--trace-steps='1,x' has invalid item 'x'"]),
        (["--layers", "no_such_block"], ["--layers='no_such_block' matches none of the model's"]),
    ],
    ids=["preset", "atol", "steps", "factory", "inputs-kwarg", "bisect", "isolate", "json", "demo", "bad-stats",
         "bad-layers", "bad-steps", "layers-match-nothing"],
)
def test_flags_that_do_not_apply_are_refused(tmp_path, script, flags, fragments) -> None:
    out = tmp_path / "ref"
    proc = run_cli("run", "--side", "ref", "--out", str(out), *flags, "--", "python", str(script))
    assert_one_line_error(proc, *fragments)
    assert "script finished" not in proc.stdout  # refused before the script ran
    assert not (out / TRACE).exists()


def test_script_only_flags_are_refused_in_the_other_modes(tmp_path) -> None:
    proc = run_cli("run", "--demo", "clean", "--model-class", "VideoDiT", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--model-class only applies to script mode")


def test_bad_side_name_is_one_line(tmp_path, script) -> None:
    proc = run_cli("run", "--side", "my side", "--out", str(tmp_path / "o"), "--", "python", str(script))
    assert_one_line_error(proc, "--side 'my side' is not a valid side name", "letters, digits")


def test_a_script_that_raises_is_one_line_with_its_own_frame(tmp_path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("def load():\n    raise KeyError('missing checkpoint key')\n\nload()\n")
    proc = run_cli("run", "--side", "ref", "--out", str(tmp_path / "o"), "--", "python", str(script))
    assert_one_line_error(proc, "the traced script raised KeyError: 'missing checkpoint key'",
                          "broken.py:2 in load", "--debug")
    assert "runpy" not in proc.stderr and "script_tracer" not in proc.stderr


def test_a_script_exit_code_is_named_and_mapped_to_2(tmp_path) -> None:
    script = tmp_path / "exits.py"
    script.write_text("import sys\nprint('giving up')\nsys.exit(3)\n")
    proc = run_cli("run", "--side", "ref", "--out", str(tmp_path / "o"), "--", "python", str(script))
    assert_one_line_error(proc, "the traced command exited with code 3")
    assert "giving up" in proc.stdout
    script.write_text("import sys\nsys.exit(1)\n")  # 1 would read as "drift found"
    assert_one_line_error(run_cli("run", "--side", "ref", "--out", str(tmp_path / "o"), "--", "python", str(script)),
                          "exited with code 1")


def test_a_script_that_exits_0_early_is_fine(tmp_path, script) -> None:
    script.write_text(SCRIPT + "\nimport sys\nsys.exit(0)\n")
    proc = run_cli("run", "--side", "ref", "--out", str(tmp_path / "o"), "--", "python", str(script))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / TRACE).is_file()


def test_out_naming_a_file_is_one_line(tmp_path, script) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    proc = run_cli("run", "--side", "ref", "--out", str(target), "--", "python", str(script))
    assert_one_line_error(proc, f"--out {str(target)!r} is a file")
    assert target.read_text() == "not a folder"
