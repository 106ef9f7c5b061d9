"""Six planted bugs in FastVideo's UMT5 encoder: the parity test fails, and tracediff names the culprit.

For every bug: the ``parity`` fixture must fail the buggy pair at the ``fp32``
preset; tracediff's first-drift report (automatic alignment: no map, no
parameter map) and bisection must name the bug's module
(``umt5_bugs.Bug.expected``). The results are collected into the table printed
at the end of the run (conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import umt5_models
from planted import Bug
from torch import nn
from umt5_bugs import BUGS, bug
from umt5_table import BISECT, ERROR, FIRST_DRIFT

from tracediff.parity import Diagnosis, Settings, diagnose, make_pair

PARITY_SCOPE = "whole text encoder (token ids + attention mask to last_hidden_state), same weights, float32"
PRESET = "fp32"
CALLS = dict(upstream_call=umt5_models.upstream_call, port_call=umt5_models.port_call)


class CulpritMissed(AssertionError):
    """tracediff named another module than the bug's."""


ALL_BUGS = [pytest.param(b.name, id=b.name) for b in BUGS]


@pytest.fixture
def buggy(
    bug_name: str, upstream_state: dict[str, torch.Tensor], clean_port: nn.Module, monkeypatch: pytest.MonkeyPatch,
) -> tuple[Bug, nn.Module]:
    """The port with the bug planted (monkeypatched on the shared clean port, or a fresh bad conversion)."""
    planted = bug(bug_name)
    return planted, planted.apply(clean_port, monkeypatch,
                                  lambda edit: umt5_models.make_port(upstream_state, edit=edit))


@pytest.fixture(scope="session")
def diagnoses() -> dict[str, Diagnosis]:
    return {}


def _diagnosis(cache: dict[str, Diagnosis], planted: Bug, upstream: nn.Module, model: nn.Module,
               inputs: dict[str, torch.Tensor], out_dir: Path) -> Diagnosis:
    """What the parity fixture attaches to a failure, kept per bug for the two tests below."""
    if planted.name not in cache:
        pair = make_pair(upstream, model, inputs, preset=PRESET, **CALLS)
        cache[planted.name] = diagnose(pair, out_dir, Settings())
    diagnosis = cache[planted.name]
    assert diagnosis.analysis is not None, diagnosis.error
    return diagnosis


def _record(results: dict, planted: Bug, tool: str, named: str | None) -> None:
    results.setdefault(planted.name, {})[tool] = named


@pytest.mark.parametrize("bug_name", ALL_BUGS)
def test_buggy_pair_fails_parity(parity, buggy, upstream, inputs) -> None:
    _, model = buggy
    with pytest.raises(AssertionError) as failure:
        parity.compare(upstream, model, inputs, preset=PRESET, **CALLS)
    message = str(failure.value)
    assert message.startswith("port output 'out' differs from upstream"), message
    assert "first drift: " in message, message  # the diagnosis is attached to the failure


@pytest.mark.parametrize("bug_name", ALL_BUGS)
def test_first_drift_names_culprit(buggy, upstream, inputs, diagnoses, bug_rows, tmp_path) -> None:
    planted, model = buggy
    diagnosis = _diagnosis(diagnoses, planted, upstream, model, inputs, tmp_path)
    first = diagnosis.analysis.result.first_drift
    assert first is not None and first.kind == "drift", diagnosis.section()
    _record(bug_rows, planted, FIRST_DRIFT, first.culprit)
    if not planted.named_correctly(first.culprit):
        raise CulpritMissed(
            f"first drift names {first.culprit!r}, expected {planted.expected!r}\n{diagnosis.section()}")


@pytest.mark.parametrize("bug_name", ALL_BUGS)
def test_bisect_names_culprit(buggy, upstream, inputs, diagnoses, bug_rows, tmp_path) -> None:
    planted, model = buggy
    from tracediff.bisect import bisect_models

    diagnosis = _diagnosis(diagnoses, planted, upstream, model, inputs, tmp_path)
    try:
        # The alignment the diagnosis found from both traces (execution order, output shapes).
        result = bisect_models(upstream, model, inputs, tolerance=PRESET, alignment=diagnosis.analysis.alignment,
                               **CALLS)
    except Exception as exc:
        _record(bug_rows, planted, BISECT, f"{ERROR}{type(exc).__name__}")
        raise
    assert result.culprit is not None, "bisection found no culprit"
    _record(bug_rows, planted, BISECT, result.culprit)
    if not planted.named_correctly(result.culprit):
        raise CulpritMissed(f"bisection names {result.culprit!r}, expected {planted.expected!r}")
