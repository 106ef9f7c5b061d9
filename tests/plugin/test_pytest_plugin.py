"""The pytest plugin, in real pytest sessions run by ``pytester``."""

from __future__ import annotations

import textwrap

import pytest

from tracediff.demo.models import BUGS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PARITY_TEST = textwrap.dedent(
    """
    import pytest
    import torch
    from tracediff.demo.models import make_inputs, make_port, make_upstream

    PARITY_SCOPE = "demo DiT, same kernels, fp32"

    @pytest.fixture
    def upstream():
        return make_upstream(0)

    @pytest.fixture
    def inputs():
        return make_inputs(0)

    def test_clean(parity, upstream, inputs):
        parity.compare(upstream, make_port(0), inputs, preset="single-block")

    def test_buggy(parity, upstream, inputs):
        parity.compare(upstream, make_port(0, bug="gelu_tanh"), inputs, preset="single-block")

    def test_diagnosis_breaks(parity, upstream, inputs):
        parity.compare(upstream, make_port(0, bug="gelu_tanh"), inputs, preset="single-block", map="missing.toml")

    def test_own_assert_close_registered(parity, upstream, inputs):
        port = make_port(0, bug="ln_eps")
        parity.register(upstream, port, inputs, preset="single-block")
        with torch.no_grad():
            torch.testing.assert_close(port(**inputs), upstream(**inputs), atol=1e-4, rtol=1e-4)

    @pytest.fixture
    def buggy_port():
        return make_port(0, bug="residual_scale")

    @pytest.mark.tracediff_pair("upstream", "buggy_port", "inputs", preset="single-block")
    def test_marker(upstream, buggy_port, inputs):
        with torch.no_grad():
            assert torch.allclose(upstream(**inputs), buggy_port(**inputs)), "outputs differ"
    """
)


def _artifacts(pytester: pytest.Pytester, name: str) -> set[str]:
    folder = pytester.path / ".tracediff" / f"test_parity.py_{name}"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.fixture
def parity_file(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_parity=PARITY_TEST)
    return pytester


def test_matching_pair_passes_without_artifacts(parity_file) -> None:
    result = parity_file.runpytest_subprocess("-k", "clean")
    result.assert_outcomes(passed=1)
    assert not (parity_file.path / ".tracediff").exists()


def test_planted_bug_fails_with_original_message_then_first_drift(parity_file) -> None:
    result = parity_file.runpytest_subprocess("-k", "buggy")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    original = text.index("port output 'out' differs from upstream (atol=0.0001, rtol=0.0001)")
    culprit = BUGS["gelu_tanh"]
    drift = text.index(f"first drift: {culprit.port_module} (upstream {culprit.upstream_module})")
    assert original < drift
    assert "Mismatched elements" in text  # torch's own assert_close detail is kept
    assert _artifacts(parity_file, "test_buggy") == {"upstream.h5", "port.h5", "report.json", "report.html"}
    assert "tracediff artifacts: .tracediff/test_parity.py_test_buggy/" in text


def test_failing_diagnosis_does_not_mask_the_failure(parity_file) -> None:
    result = parity_file.runpytest_subprocess("-k", "diagnosis_breaks")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    original = text.index("port output 'out' differs from upstream")
    broken = text.index("tracediff: the diagnosis itself failed")
    assert original < broken
    assert "missing.toml" in text[broken:]


def test_registered_pair_gets_a_tracediff_section(parity_file) -> None:
    result = parity_file.runpytest_subprocess("-k", "registered")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "Mismatched elements" in text
    section = text.index("- tracediff -")
    assert f"first drift: {BUGS['ln_eps'].port_module}" in text[section:]
    assert _artifacts(parity_file, "test_own_assert_close_registered") >= {"report.json", "report.html"}


def test_marker_pair_gets_a_tracediff_section(parity_file) -> None:
    result = parity_file.runpytest_subprocess("-k", "marker")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "outputs differ" in text
    assert f"first drift: {BUGS['residual_scale'].port_module} (upstream" in text[text.index("- tracediff -"):]


def test_off_runs_nothing(parity_file) -> None:
    result = parity_file.runpytest_subprocess("--tracediff=off", "-k", "buggy or registered or marker")
    result.assert_outcomes(failed=3)
    text = result.stdout.str()
    assert "port output 'out' differs" in text
    assert "first drift" not in text and "- tracediff -" not in text
    assert not (parity_file.path / ".tracediff").exists()


def test_custom_dir_and_layers(parity_file) -> None:
    result = parity_file.runpytest_subprocess("-k", "buggy", "--tracediff-dir", "diag",
                                              "--tracediff-layers", r"^transformer_blocks\.\d+$|^blocks\.\d+$")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "first drift: transformer_blocks.2 (upstream blocks.2)" in text
    assert (parity_file.path / "diag" / "test_parity.py_test_buggy" / "report.json").is_file()


def test_module_inputs_are_traced_unless_turned_off(parity_file, monkeypatch) -> None:
    import tracediff

    folder = parity_file.path / ".tracediff" / "test_parity.py_test_buggy"
    parity_file.runpytest_subprocess("-k", "buggy").assert_outcomes(failed=1)
    assert tracediff.open_trace(folder / "port.h5").config["inputs"] is True

    result = parity_file.runpytest_subprocess("-k", "buggy", "--tracediff-inputs=off")
    result.assert_outcomes(failed=1)
    assert tracediff.open_trace(folder / "port.h5").config["inputs"] is False
    assert "module inputs were not recorded" in result.stdout.str()

    monkeypatch.setenv("TRACEDIFF_TRACE_INPUTS", "0")
    parity_file.runpytest_subprocess("-k", "buggy").assert_outcomes(failed=1)
    assert tracediff.open_trace(folder / "port.h5").config["inputs"] is False


def test_a_bad_inputs_switch_stops_the_session_with_one_line(parity_file, monkeypatch) -> None:
    monkeypatch.setenv("TRACEDIFF_TRACE_INPUTS", "maybe")
    result = parity_file.runpytest_subprocess("-k", "clean")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "TRACEDIFF_TRACE_INPUTS='maybe' is not a switch value; use 1/true/on or 0/false/off" in result.stderr.str()
    assert "Traceback" not in result.stderr.str()
