"""Eight planted bugs in FastVideo's Wan DiT: the parity test fails, and every way of asking names the culprit.

For each bug: the ``parity`` fixture fails the buggy pair at the ``fp32`` preset;
first-drift with automatic alignment (no map, no param map), first-drift with
the port's ``param_names_mapping`` and bisection name ``Bug.expected``; and with
the port traced by FastVideo's own tracer (JSONL: output statistics only, no
weights, no module inputs) first-drift names it first or lists it among its
suspects, since without inputs it cannot tell a module's own code from the code
that ran just before it. The results are printed as a table at the end of the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import wan_models
from planted import Bug
from torch import nn
from wan_bugs import BUGS, bug
from wan_table import AUTO, BISECT, JSONL, PARAM_MAP, RANK

from tracediff.parity import Settings, diagnose, make_pair
from tracediff.pipeline.analyse import Analysis, analyse

PARITY_SCOPE = "whole DiT (patch embedding to unpatchify), one step, same weights, float32"
PRESET = "fp32"
#: How many of the JSONL headline's suspects may stand before the expected module.
JSONL_SUSPECTS = 3

CASES = [pytest.param(b.name, id=b.name) for b in BUGS]


class CulpritMissed(AssertionError):
    """tracediff named another module than the bug's."""


@pytest.fixture
def buggy(bug_name: str, upstream: nn.Module, clean_port: nn.Module, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[Bug, nn.Module]:
    """The port with the bug planted: a fresh wrong conversion, or the shared clean port monkeypatched."""
    planted = bug(bug_name)
    return planted, planted.apply(clean_port, monkeypatch, lambda edit: wan_models.make_port(upstream, edit=edit))


def _analysis(upstream: nn.Module, port: nn.Module, inputs, out: Path, *, param_map=None) -> Analysis:
    pair = make_pair(upstream, port, inputs, preset=PRESET, upstream_call=wan_models.upstream_call,
                     port_call=wan_models.port_call, param_map=param_map)
    diagnosis = diagnose(pair, out, Settings())
    assert diagnosis.analysis is not None, diagnosis.error
    return diagnosis.analysis


def _check(rows: dict, planted: Bug, tool: str, named: str | None, report: str) -> None:
    rows.setdefault(planted.name, {})[tool] = named
    if not planted.named_correctly(named):
        raise CulpritMissed(f"{tool} names {named!r}, expected {planted.expected!r}\n{report}")


@pytest.mark.parametrize("bug_name", CASES)
def test_buggy_pair_fails_parity(parity, buggy, upstream, inputs) -> None:
    _, model = buggy
    with pytest.raises(AssertionError) as failure:
        parity.compare(upstream, model, inputs, preset=PRESET, upstream_call=wan_models.upstream_call,
                       port_call=wan_models.port_call)
    message = str(failure.value)
    assert message.startswith("port output 'out' differs from upstream"), message
    assert "first drift: " in message, message  # the diagnosis is attached to the failure


@pytest.mark.parametrize("bug_name", CASES)
def test_first_drift_names_culprit_with_automatic_alignment(buggy, upstream, inputs, bug_rows, tmp_path) -> None:
    planted, model = buggy
    analysis = _analysis(upstream, model, inputs, tmp_path)
    first = analysis.result.first_drift
    assert first is not None and first.kind == "drift", analysis.text()
    _check(bug_rows, planted, AUTO, first.culprit, analysis.text())


@pytest.mark.parametrize("bug_name", CASES)
def test_first_drift_names_culprit_with_param_map(buggy, upstream, inputs, bug_rows, tmp_path) -> None:
    planted, model = buggy
    analysis = _analysis(upstream, model, inputs, tmp_path, param_map=wan_models.param_names_mapping())
    first = analysis.result.first_drift
    assert first is not None and first.kind == "drift", analysis.text()
    _check(bug_rows, planted, PARAM_MAP, first.culprit, analysis.text())


@pytest.mark.parametrize("bug_name", CASES)
def test_bisect_names_culprit(buggy, upstream, inputs, bug_rows, tmp_path) -> None:
    from tracediff.bisect import bisect_models

    planted, model = buggy
    # The alignment first-drift found from both traces (execution order, values), as the ViT family does.
    alignment = _analysis(upstream, model, inputs, tmp_path).alignment
    # Bisection calls single port modules itself: port_context enters FastVideo's forward context around each.
    result = bisect_models(upstream, model, inputs, tolerance=PRESET, upstream_call=wan_models.upstream_call,
                           port_call=wan_models.port_call, alignment=alignment, port_context=wan_models.port_context)
    assert result.culprit is not None, "bisection found no culprit"
    _check(bug_rows, planted, BISECT, result.culprit, str(result))


@pytest.mark.parametrize("bug_name", CASES)
def test_fastvideo_jsonl_trace_names_culprit(buggy, upstream, inputs, bug_rows, tmp_path) -> None:
    planted, model = buggy
    wan_models.trace_upstream(upstream, inputs, tmp_path / "upstream.h5")
    wan_models.trace_port_with_fastvideo(model, inputs, tmp_path / "port.jsonl")
    analysis = analyse(tmp_path / "upstream.h5", tmp_path / "port.jsonl", tolerance=PRESET)
    first = analysis.result.first_drift
    assert first is not None and first.kind == "drift", analysis.text()
    named = list(dict.fromkeys([first.culprit, *first.suspects]))
    rank = next((k for k, name in enumerate(named[:JSONL_SUSPECTS]) if planted.named_correctly(name)), 0)
    bug_rows.setdefault(planted.name, {})[JSONL + RANK] = rank
    _check(bug_rows, planted, JSONL, named[rank], analysis.text())


def test_plugin_bisect_mode_uses_the_traced_alignment(upstream, clean_port, inputs, tmp_path, monkeypatch) -> None:
    """``--tracediff=bisect``: the drill-down pairs modules as first-drift did, so it reaches the activation.

    Aligned from the live models alone (definition order), FastVideo's ``ffn.act`` has no counterpart
    (diffusers' GELU module holds its projection) and the drill-down stops at ``blocks.1.ffn``.
    """
    planted = bug("gelu_exact")
    planted.plant(clean_port, monkeypatch)
    pair = make_pair(upstream, clean_port, inputs, preset=PRESET, upstream_call=wan_models.upstream_call,
                     port_call=wan_models.port_call, port_context=wan_models.port_context)
    diagnosis = diagnose(pair, tmp_path, Settings(mode="bisect"))
    assert diagnosis.analysis is not None and diagnosis.bisection, diagnosis.error
    culprit = next(line for line in diagnosis.bisection.splitlines() if line.startswith("culprit: "))
    assert culprit.startswith(f"culprit: {planted.expected} "), diagnosis.bisection
