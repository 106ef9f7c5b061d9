"""Six planted bugs in each port: the parity test fails, and tracediff names the culprit.

For every (port, bug): the ``parity`` fixture must fail the buggy pair at the
``fp32`` preset; tracediff's first-drift report, and bisection where it is
available, must name the bug's module (``vit_bugs.Bug.expected``). The results
are collected into the table printed at the end of the run (conftest.py).

Every row must name the expected module: the two cases that once needed more than
"the first module whose output differs" (a bug in a module's own forward between two
children; a bug in a module with no upstream counterpart) are answered by traced
module inputs (first-drift blames the caller when a module's input already differs) and
by the operator trace looking through modules with no counterpart (bisection).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from vit_bugs import Bug
from vit_ports import PORTS, Port
from vit_table import BISECT, FIRST_DRIFT

from tracediff.parity import Diagnosis, Settings, diagnose, make_pair

PARITY_SCOPE = "whole classifier (patch embedding to logits), same weights, float32"
PRESET = "fp32"


class CulpritMissed(AssertionError):
    """tracediff named another module than the bug's."""


ALL_CASES = [pytest.param(p.name, b.name, id=f"{p.name}-{b.name}") for p in PORTS.values() for b in p.bugs]


@pytest.fixture
def buggy(
    port_name: str, bug_name: str, upstream: nn.Module, clean_ports: dict[str, nn.Module],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Port, Bug, nn.Module]:
    """The port with the bug planted (monkeypatched on the shared clean port, or a fresh bad conversion)."""
    port = PORTS[port_name]
    bug = port.bug(bug_name)
    if bug.transpose is not None:
        return port, bug, port.build(upstream, transpose=(bug.transpose,))
    model = clean_ports[port_name]
    assert bug.plant is not None
    bug.plant(model, monkeypatch)
    return port, bug, model


@pytest.fixture(scope="session")
def diagnoses() -> dict[tuple[str, str], Diagnosis]:
    return {}


def _diagnosis(
    cache: dict[tuple[str, str], Diagnosis], port: Port, bug: Bug, upstream: nn.Module, model: nn.Module,
    images: torch.Tensor, out_dir: Path,
) -> Diagnosis:
    """What the parity fixture attaches to a failure, kept per (port, bug) for the two tests below."""
    key = (port.name, bug.name)
    if key not in cache:
        pair = make_pair(upstream, model, images, preset=PRESET, port_call=port.call)
        cache[key] = diagnose(pair, out_dir, Settings())
    diagnosis = cache[key]
    assert diagnosis.analysis is not None, diagnosis.error
    return diagnosis


def _record(results: dict, port: Port, bug: Bug, tool: str, named: str | None) -> None:
    results.setdefault((port.name, bug.name), {})[tool] = named


@pytest.mark.parametrize(("port_name", "bug_name"), ALL_CASES)
def test_buggy_pair_fails_parity(parity, buggy, upstream, images) -> None:
    port, bug, model = buggy
    with pytest.raises(AssertionError) as failure:
        parity.compare(upstream, model, images, preset=PRESET, port_call=port.call)
    message = str(failure.value)
    assert message.startswith("port output 'out' differs from upstream"), message
    assert "first drift: " in message, message  # the diagnosis is attached to the failure


@pytest.mark.parametrize(("port_name", "bug_name"), ALL_CASES)
def test_first_drift_names_culprit(buggy, upstream, images, diagnoses, bug_rows, tmp_path) -> None:
    port, bug, model = buggy
    diagnosis = _diagnosis(diagnoses, port, bug, upstream, model, images, tmp_path)
    first = diagnosis.analysis.result.first_drift
    assert first is not None and first.kind == "drift", diagnosis.section()
    _record(bug_rows, port, bug, FIRST_DRIFT, first.culprit)
    if not bug.named_correctly(first.culprit):
        raise CulpritMissed(f"first drift names {first.culprit!r}, expected {bug.expected!r}\n{diagnosis.section()}")


@pytest.mark.parametrize(("port_name", "bug_name"), ALL_CASES)
def test_bisect_names_culprit(buggy, upstream, images, diagnoses, bug_rows, tmp_path) -> None:
    port, bug, model = buggy
    try:
        from tracediff.bisect import bisect_models
    except ImportError:
        _record(bug_rows, port, bug, BISECT, None)
        pytest.skip("tracediff.bisect.bisect_models is not available in this checkout")
    diagnosis = _diagnosis(diagnoses, port, bug, upstream, model, images, tmp_path)
    # The alignment the diagnosis found from both traces (execution order, output shapes).
    result = bisect_models(upstream, model, images, tolerance=PRESET, port_call=port.call,
                           alignment=diagnosis.analysis.alignment)
    assert result.culprit is not None, "bisection found no culprit"
    _record(bug_rows, port, bug, BISECT, result.culprit)
    if not bug.named_correctly(result.culprit):
        raise CulpritMissed(f"bisection names {result.culprit!r}, expected {bug.expected!r}")

