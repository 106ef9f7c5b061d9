"""The clean pair: diffusers' Wan DiT and FastVideo's, same weights, float32.

The first test of every family: the clean port must pass with automatic
alignment (no map, no param map), with the port's conversion table, through
bisection, and with the port traced by FastVideo's own tracer, and the aligner
must leave no alignment suspect.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wan_models
from torch import nn

from tracediff.parity import Settings, diagnose, make_pair
from tracediff.pipeline.analyse import analyse

PARITY_SCOPE = "whole DiT (patch embedding to unpatchify), one step, same weights, float32"
PRESET = "fp32"


def _diagnose(upstream: nn.Module, port: nn.Module, inputs, out: Path, *, param_map=None):
    pair = make_pair(upstream, port, inputs, preset=PRESET, upstream_call=wan_models.upstream_call,
                     port_call=wan_models.port_call, param_map=param_map)
    diagnosis = diagnose(pair, out, Settings())
    assert diagnosis.analysis is not None, diagnosis.error
    return diagnosis


def test_clean_pair_is_bit_identical(upstream, clean_port, inputs) -> None:
    with torch.no_grad():
        expected = wan_models.upstream_call(upstream, inputs)
        actual = wan_models.port_call(clean_port, inputs)
    assert torch.equal(expected, actual), (expected - actual).abs().max()


def test_clean_pair_passes_parity(parity, upstream, clean_port, inputs) -> None:
    parity.compare(upstream, clean_port, inputs, preset=PRESET, upstream_call=wan_models.upstream_call,
                   port_call=wan_models.port_call)


@pytest.mark.parametrize("how", ["auto", "param_map"])
def test_clean_pair_has_no_drift_and_no_suspect(upstream, clean_port, inputs, tmp_path, how) -> None:
    param_map = wan_models.param_names_mapping() if how == "param_map" else None
    analysis = _diagnose(upstream, clean_port, inputs, tmp_path, param_map=param_map).analysis
    assert analysis, analysis.text()
    assert analysis.result.first_drift is None
    assert analysis.alignment.suspects == [], analysis.alignment.suspects
    assert analysis.result.compared > 100  # not clean by comparing nothing


def test_modules_of_different_extent_pair_by_values(upstream, clean_port, inputs, tmp_path) -> None:
    """The four pairs that order and names got wrong on this pair, now decided by what the modules computed."""
    alignment = _diagnose(upstream, clean_port, inputs, tmp_path).analysis.alignment
    port_of = {p.upstream: p.port for p in alignment.pairs}
    # FastVideo's norm_out applies shift and scale; diffusers' norm_out does not: its child norm is the pair.
    assert port_of["norm_out"] == "norm_out.norm"
    # The SiLU before the modulation projection lives inside FastVideo's time_modulation.
    assert port_of["condition_embedder.act_fn"] == "condition_embedder.time_modulation.act"
    # diffusers' FeedForward is FastVideo's MLP, not the gated residual add after it.
    assert port_of["blocks.0.ffn"] == "blocks.0.ffn"
    assert "blocks.0.mlp_residual" in alignment.unmatched_port
    # FastVideo's TimestepEmbedder = diffusers' timesteps_proj + time_embedder: left out, not forced.
    assert "condition_embedder.time_embedder" in alignment.unmatched_port
    assert port_of["condition_embedder.time_embedder"] == "condition_embedder.time_embedder.mlp"


def test_align_command_reports_no_suspect(upstream, clean_port, inputs, tmp_path) -> None:
    _diagnose(upstream, clean_port, inputs, tmp_path)
    done = subprocess.run([sys.executable, "-m", "tracediff", "align", str(tmp_path / "upstream.h5"),
                           str(tmp_path / "port.h5"), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["suspects"] == []


def test_first_drift_command_exits_0_on_the_clean_pair(upstream, clean_port, inputs, tmp_path) -> None:
    _diagnose(upstream, clean_port, inputs, tmp_path)
    done = subprocess.run([sys.executable, "-m", "tracediff", "first-drift", str(tmp_path / "upstream.h5"),
                           str(tmp_path / "port.h5")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no drift" in done.stdout


def test_bisect_finds_no_culprit_on_the_clean_pair(upstream, clean_port, inputs) -> None:
    from tracediff.bisect import bisect_models

    result = bisect_models(upstream, clean_port, inputs, tolerance=PRESET, upstream_call=wan_models.upstream_call,
                           port_call=wan_models.port_call, port_context=wan_models.port_context)
    assert result.culprit is None, result


def test_fastvideo_jsonl_trace_of_the_clean_port_has_no_drift(upstream, clean_port, inputs, tmp_path) -> None:
    """The port traced by FastVideo's own tracer (stats only, no weights) against a tracediff trace of diffusers."""
    wan_models.trace_upstream(upstream, inputs, tmp_path / "upstream.h5")
    wan_models.trace_port_with_fastvideo(clean_port, inputs, tmp_path / "port.jsonl")
    analysis = analyse(tmp_path / "upstream.h5", tmp_path / "port.jsonl", tolerance=PRESET)
    assert analysis, analysis.text()
    assert analysis.alignment.suspects == []
    assert analysis.result.aligned_modules >= 50, analysis.text()  # most modules compared, not a handful
