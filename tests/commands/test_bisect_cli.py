"""``tracediff bisect``, ``tracediff run --bisect`` and ``--tracediff=bisect``, run as a user runs them."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.pairs.llama import BUGS as LLAMA_BUGS
from tracediff.demo import port_dit
from tracediff.demo.models import BUGS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def line_of(snippet: str) -> int:
    lines = Path(inspect.getsourcefile(port_dit) or "").read_text().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if snippet in line)


def test_demo_free_function_bug_prints_path_levels_and_operator() -> None:
    proc = run_cli("bisect", "--demo", "rope_sign")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    bug = BUGS["rope_sign"]
    assert out.startswith(f"culprit: {bug.port_module} (upstream {bug.upstream_module}), step 0: local rel L2 err")
    assert f"first differing operator: Tensor.flatten at demo/port_dit.py:{line_of('rotated.flatten(-2)')} " \
           "in apply_rotary" in out
    assert "9 forward passes" in out
    assert "path from the model root to the culprit" in out and "depth 2: inside transformer_blocks.2.attn1" in out
    assert f"demo/port_dit.py:{line_of('sin = sin * self.rope_sin_sign')} in forward: sin = sin * self.rope_sin_sign" \
        in out


def test_spec_of_the_second_pair_as_json(tmp_path: Path) -> None:
    spec = tmp_path / "llama.toml"
    spec.write_text(textwrap.dedent(
        """
        [upstream]
        factory = "tests.pairs.llama:make_reference"
        call = "tests.pairs.llama:call_reference"

        [port]
        factory = "tests.pairs.llama:make_port"
        kwargs = { bug = "tp_bias" }

        [inputs]
        factory = "tests.pairs.llama:make_inputs"

        [run]
        steps = 2

        [align]
        param_map = "tests.pairs.llama:PARAM_NAMES_MAPPING"

        [tolerance]
        preset = "dit-aligned"
        """
    ))
    proc = run_cli("bisect", str(spec), "--json", "--preset", "single-block", "--noise-floor")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is False and data["culprit"] == LLAMA_BUGS["tp_bias"].port_module
    assert [level["port"] for level in data["path"]] == ["layers.2", "layers.2.feed_forward",
                                                         "layers.2.feed_forward.w2"]
    assert data["tolerance"]["name"] == "single-block" and data["noise_floor"] is True
    assert data["forward_passes"] == 15 and data["step"] == 0 and data["steps_checked"] == 1
    assert data["levels"][0]["modules"][0]["noise"] is not None
    assert data["operator"]["port_op"]["source"]["function"] == "forward"


def test_clean_demo_exits_0_and_bad_step_is_one_line_error() -> None:
    proc = run_cli("bisect", "--demo", "clean", "--step", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no local drift: 10 top-level modules isolated in step 1")
    assert_one_line_error(run_cli("bisect", "--demo", "gelu_tanh", "--step", "7"),
                          "--step 7 is out of range: the spec runs 3 step(s)")


def test_run_with_bisect_appends_the_drill_down(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("run", "--demo", "gelu_tanh", "--steps", "1", "--bisect", "--out", str(out), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    bug = BUGS["gelu_tanh"]
    first = proc.stdout.index("first drift:")
    culprit = proc.stdout.index(f"culprit: {bug.port_module} (upstream {bug.upstream_module})")
    assert first < culprit
    assert "settings differ: approximate='none' vs upstream approximate='tanh'" in proc.stdout
    assert json.loads((out / "bisect.json").read_text())["culprit"] == bug.port_module


def test_pytest_plugin_bisect_mode_appends_the_path_to_the_diagnosis(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_parity=textwrap.dedent(
        """
        from tracediff.demo.models import make_inputs, make_port, make_upstream

        def test_rope(parity):
            parity.compare(make_upstream(0), make_port(0, bug="rope_sign"), make_inputs(0), preset="single-block",
                           param_map="tracediff.demo.convert:PARAM_NAMES_MAPPING")
        """
    ))
    result = pytester.runpytest_subprocess("--tracediff=bisect")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    bug = BUGS["rope_sign"]
    report = text.index("first drift:")
    bisection = text.index("tracediff bisect (local error, teacher forcing):")
    assert report < bisection
    assert f"culprit: {bug.port_module} (upstream {bug.upstream_module})" in text[bisection:]
    assert "in apply_rotary" in text[bisection:]
    folder = next((pytester.path / ".tracediff").iterdir())
    assert (folder / "bisect.json").is_file()
