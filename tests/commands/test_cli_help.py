"""The CLI a newcomer reads first (issue 19, problem 9): help with examples, grouped by mode, suggestions.

Every check runs the real ``python -m tracediff`` in a subprocess; the pytest plugin's failure is
checked in a real pytest session (``pytester``).
"""

from __future__ import annotations

import re

import pytest

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.plugin.test_pytest_plugin import PARITY_TEST
from tracediff.cli import command_names

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("command", command_names())
def test_every_subcommand_help_has_examples_and_no_rst_quoting(command) -> None:
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "``" not in text
    examples = text[text.index("\nexamples:\n"):]
    assert re.search(rf"^  tracediff {command}\b", examples, re.MULTILINE), examples
    assert "--debug" in text


def test_run_help_is_grouped_by_mode() -> None:
    text = run_cli("run", "--help").stdout
    groups = {name: text.index(f"\n{name}") for name in ("every mode:", "demo mode:", "demo and spec mode:",
                                                         "script mode:")}
    sections = sorted(groups.values())

    def section_of(flag: str) -> str:
        at = text.index(f"\n  {flag}")
        start = max(s for s in sections if s < at)
        return next(name for name, pos in groups.items() if pos == start)

    assert section_of("--demo") == "demo mode:"
    assert section_of("--side") == "script mode:"
    assert section_of("--model-class") == "script mode:"
    assert section_of("--bisect") == "demo and spec mode:"
    assert section_of("--out") == "every mode:"
    assert "demo mode     tracediff run [--demo BUG]" in text and "script mode   tracediff run --side NAME" in text
    side = text[text.index("\n  --side"):text.index("\n  --model-class")]
    assert "any short name" in side and "ref, upstream, port" in side


def test_misspelled_command_gets_a_suggestion() -> None:
    proc = run_cli("first-drif", "a.h5", "b.h5")
    assert_one_line_error(proc, "unknown command 'first-drif'", "did you mean first-drift?")
    proc = run_cli("--debug", "bisekt")
    assert_one_line_error(proc, "did you mean bisect?")


def test_no_arguments_prints_the_help() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert proc.stdout.startswith("usage: tracediff")
    assert "first-drift" in proc.stdout and "examples:" in proc.stdout


def test_parity_failure_does_not_show_the_plugins_own_frame(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_parity=PARITY_TEST)
    result = pytester.runpytest_subprocess("-k", "buggy", "--tb=long")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert 'parity.compare(upstream, make_port(0, bug="gelu_tanh"), inputs, preset="single-block")' in text
    assert "def compare(self" not in text and "pytest_plugin.py" not in text
    assert "first drift:" in text  # the diagnosis is still there


def test_a_bad_parity_argument_points_at_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad="""
        from tracediff.demo.models import make_inputs, make_port, make_upstream

        def test_bad_args(parity):
            parity.compare(make_upstream(0), make_port(0), make_inputs(0), atol=1e-3)
        """)
    result = pytester.runpytest_subprocess("--tb=long")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "TypeError: parity: give atol and rtol together" in text
    assert "def make_pair(" not in text and "def compare(self" not in text
