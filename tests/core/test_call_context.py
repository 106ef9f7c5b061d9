"""``context=``: the context manager a model must run in, entered around every forward tracediff makes.

Uses a plain-torch stand-in for FastVideo's ``set_forward_context`` (tests/pairs/context_pair.py);
the real FastVideo Wan DiT runs its bisection this way in tests/local_tests/wan.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.cli_helpers import report_lines, run_cli
from tests.pairs import context_pair
from tracediff.bisect import bisect_models
from tracediff.call_context import enter
from tracediff.parity import Settings, diagnose, make_pair


def test_the_stand_in_fails_outside_its_context() -> None:
    upstream, _, inputs = context_pair.make_pair()
    with pytest.raises(AssertionError, match="Forward context is not set"):
        upstream(**inputs)


def test_parity_diagnosis_runs_both_sides_in_the_context(tmp_path: Path) -> None:
    upstream, port, inputs = context_pair.make_pair(bug=True)
    pair = make_pair(upstream, port, inputs, preset="fp32", context=context_pair.context_of)
    diagnosis = diagnose(pair, tmp_path, Settings())
    assert diagnosis.analysis is not None, diagnosis.error
    assert diagnosis.analysis.result.first_drift.culprit == "blocks.1"


def test_without_the_context_the_diagnosis_says_why_it_failed(tmp_path: Path) -> None:
    upstream, port, inputs = context_pair.make_pair(bug=True)
    diagnosis = diagnose(make_pair(upstream, port, inputs, preset="fp32"), tmp_path, Settings())
    assert diagnosis.analysis is None and "Forward context is not set" in (diagnosis.error or "")


def test_bisection_enters_the_context_for_single_module_reruns() -> None:
    """The operator level re-runs the culprit alone: without the context it could only skip with a note."""
    upstream, port, inputs = context_pair.make_pair(bug=True)
    result = bisect_models(upstream, port, inputs, tolerance="fp32", context=context_pair.context_of)
    assert result.culprit == "blocks.1"
    assert result.operator is not None and result.operator.port_op is not None, result.notes
    assert "sigmoid" in result.operator.port_op.source.code  # the planted line, found by the operator trace
    assert not any("could not be re-run" in note for note in result.notes)


def test_per_side_context_wins_over_the_shared_one() -> None:
    upstream, port, inputs = context_pair.make_pair()
    entered: list[str] = []

    def shared(inputs):  # noqa: ANN001, ANN202
        entered.append("shared")
        return context_pair.context_of(inputs)

    def port_only(inputs):  # noqa: ANN001, ANN202
        entered.append("port")
        return context_pair.context_of(inputs)

    result = bisect_models(upstream, port, inputs, tolerance="fp32", context=shared, port_context=port_only)
    assert result.culprit is None
    assert "port" in entered and "shared" in entered  # upstream used the shared one, the port its own


def test_a_context_function_must_return_a_context_manager() -> None:
    with pytest.raises(TypeError, match="not a context manager"):
        enter(lambda inputs: 42, {})


def test_make_pair_refuses_a_context_that_is_not_callable() -> None:
    upstream, port, inputs = context_pair.make_pair()
    with pytest.raises(TypeError, match="port_context must be a function"):
        make_pair(upstream, port, inputs, port_context="fastvideo")


def test_run_spec_context_field(tmp_path: Path) -> None:
    spec = tmp_path / "parity.toml"
    spec.write_text(textwrap.dedent('''
        [upstream]
        factory = "tests.pairs.context_pair:build_upstream"
        context = "tests.pairs.context_pair:context_of"

        [port]
        factory = "tests.pairs.context_pair:build_port"
        kwargs = { bug = true }
        context = "tests.pairs.context_pair:context_of"

        [inputs]
        factory = "tests.pairs.context_pair:make_inputs"

        [tolerance]
        preset = "fp32"
    '''))
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "out"), "--no-progress", cwd=Path.cwd())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert report_lines(proc.stdout)[0].startswith("first drift: blocks.1 "), proc.stdout
    bisected = run_cli("bisect", str(spec), cwd=Path.cwd())
    assert bisected.returncode == 1, bisected.stdout + bisected.stderr
    assert "blocks.1" in bisected.stdout and "could not be re-run" not in bisected.stdout
