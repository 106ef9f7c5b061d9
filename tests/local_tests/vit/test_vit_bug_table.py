"""Six planted bugs in each port: the parity test fails, and tracediff names the culprit.

For every (port, bug): the ``parity`` fixture must fail the buggy pair at the
``fp32`` preset; tracediff's first-drift report, and bisection where it is
available, must name the bug's module (``vit_bugs.Bug.expected``). The results
are collected into the table printed at the end of the run (conftest.py).

Where tracediff cannot name the expected module yet, the exact expectation is
kept and marked ``xfail(strict=True, raises=CulpritMissed)``: it turns into a
failure the day tracediff gets it right (so the mark gets removed), and any
other failure (a worse answer than today's) still fails. Today's weaker answer
is asserted first, with a plain ``assert``.
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


#: first-drift names the first module whose *output* differs. A bug in a module's own
#: forward, between two children, first shows in the child that runs next, which is correct
#: code: the exact answer needs the reference's inputs, which is bisection's job.
FIRST_DRIFT_LIMITS = {
    ("transformers", "softmax_scale"): "names vit.layers.3.attention.o_proj, the child that runs after the scale",
    ("transformers", "pos_embed_shift"): "names vit.embeddings.dropout, the child that runs after the addition",
    ("torchvision", "pos_embed_shift"): "names encoder.dropout, the child that runs after the addition",
}
#: Bisection isolates aligned modules. The module adding the position table has no
#: counterpart upstream (timm adds it in the model's own forward), so bisection can only
#: say it is the model's own code.
BISECT_LIMITS = {
    ("transformers", "pos_embed_shift"): "names the model's own forward: vit.embeddings has no upstream counterpart",
    ("torchvision", "pos_embed_shift"): "names the model's own forward: encoder has no upstream counterpart",
}


def _cases(limits: dict[tuple[str, str], str]) -> list[object]:
    cases = []
    for port in PORTS.values():
        for bug in port.bugs:
            reason = limits.get((port.name, bug.name))
            marks = [pytest.mark.xfail(raises=CulpritMissed, strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(port.name, bug.name, marks=marks, id=f"{port.name}-{bug.name}"))
    return cases


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


@pytest.mark.parametrize(("port_name", "bug_name"), _cases(FIRST_DRIFT_LIMITS))
def test_first_drift_names_culprit(buggy, upstream, images, diagnoses, bug_rows, tmp_path) -> None:
    port, bug, model = buggy
    diagnosis = _diagnosis(diagnoses, port, bug, upstream, model, images, tmp_path)
    first = diagnosis.analysis.result.first_drift
    assert first is not None and first.kind == "drift", diagnosis.section()
    _record(bug_rows, port, bug, FIRST_DRIFT, first.port)
    if (port.name, bug.name) in FIRST_DRIFT_LIMITS:
        # today's answer: the first child of the culprit to run after its faulty code
        assert first.port.startswith(bug.expected + "."), first.port
    if not bug.named_correctly(first.port):
        raise CulpritMissed(f"first drift names {first.port!r}, expected {bug.expected!r}\n{diagnosis.section()}")


@pytest.mark.parametrize(("port_name", "bug_name"), _cases(BISECT_LIMITS))
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
    if (port.name, bug.name) in BISECT_LIMITS:
        assert result.culprit == "", result.culprit  # today's answer: the model's own forward
    if not bug.named_correctly(result.culprit):
        raise CulpritMissed(f"bisection names {result.culprit!r}, expected {bug.expected!r}")

