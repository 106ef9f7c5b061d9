"""Pre-flight checks on the bundled demo pair: each planted weight or input problem is named exactly.

The port loads upstream's weights through the real conversion map (fused q/k/v
included); each broken port below changes one thing after loading, the way a
wrong converter would. Everything runs on real models and real HDF5 traces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tracediff.render.preflight as words
from tests.printed_numbers import mask_floats, number_after
from tracediff import TraceConfig
from tracediff.demo import make_inputs, make_port, make_upstream
from tracediff.demo.convert import PARAM_NAMES_MAPPING, convert_state_dict
from tracediff.parity import Settings, diagnose, make_pair
from tracediff.pipeline.analyse import analyse
from tracediff.pipeline.runner import trace_model
from tracediff.preflight import check_models, check_traces
from tracediff.store.load import load_trace

STATS = "abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample"
STEPS = 2
CLEAN_COUNTS = "123 parameters compared: 123 identical"
TRANSPOSED = ("transformer_blocks.1.attn2.to_out.weight transposed: holds upstream blocks.1.cross_attn.o.weight "
              "transposed (64×64 -> 64×64)")
#: the scaled weight's line with its numbers masked (tests/printed_numbers.py): each number is compared apart
SCALED = "transformer_blocks.2.ffn.fc_in.weight scaled by # vs upstream blocks.2.ffn.0.weight (max-abs #, rel #"
MISSING = ("upstream blocks.0.cross_attn.k.bias missing in port "
           "(its counterpart transformer_blocks.0.attn2.to_k has no 'bias')")


def assert_scaled_by_half(line: str) -> None:
    """The scaled weight's line names the factor 0.5 and a relative error of 0.5, whatever their last digits."""
    assert number_after(line, "scaled by ") == pytest.approx(0.5, rel=1e-3)
    assert number_after(line, ", rel ") == pytest.approx(0.5, rel=1e-3)


def broken_port() -> torch.nn.Module:
    """Three conversion mistakes at once: a transposed weight, a scaled weight, a bias left out."""
    port = make_port(0)
    with torch.no_grad():
        weight = port.transformer_blocks[1].attn2.to_out.weight
        weight.copy_(weight.t().clone())
        port.transformer_blocks[2].ffn.fc_in.weight.mul_(0.5)
    port.transformer_blocks[0].attn2.to_k.register_parameter("bias", None)
    return port


def scaled_port() -> torch.nn.Module:
    port = make_port(0)
    with torch.no_grad():
        port.transformer_blocks[2].ffn.fc_in.weight.mul_(0.5)
    return port


def swapped_qk_port() -> torch.nn.Module:
    """Block 1's fused to_qkv holds k where q belongs and q where k belongs."""
    port = make_port(0)
    with torch.no_grad():
        for name in ("weight", "bias"):
            fused = getattr(port.transformer_blocks[1].attn1.to_qkv, name)
            q, k = fused[:64].clone(), fused[64:128].clone()
            fused[:64], fused[64:128] = k, q
    return port


def perturbed_inputs(step: int) -> dict[str, torch.Tensor]:
    inputs = make_inputs(0, step=step)
    inputs["context"] = inputs["context"] + 0.03
    return inputs


def trace(model: torch.nn.Module, side: str, path: Path, inputs=make_inputs) -> Path:
    config = TraceConfig(stats=STATS)
    trace_model(model, side=side, steps=[inputs(0, step=s) if inputs is make_inputs else inputs(s)
                                         for s in range(STEPS)], output=path, config=config)
    return path


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preflight_demo")
    return {
        "upstream": trace(make_upstream(0), "upstream", root / "upstream.h5"),
        "clean": trace(make_port(0), "port", root / "clean.h5"),
        "broken": trace(broken_port(), "port", root / "broken.h5"),
        "scaled": trace(scaled_port(), "port", root / "scaled.h5"),
        "swapped": trace(swapped_qk_port(), "port", root / "swapped.h5"),
        "inputs": trace(make_port(0), "port", root / "inputs.h5", inputs=perturbed_inputs),
    }


def lines(result) -> list[str]:
    return [words.line(p) for p in result.weight_findings] + [words.line(i) for i in result.input_findings]


# -- live models ------------------------------------------------------------------------


@pytest.mark.parametrize("param_map", [None, PARAM_NAMES_MAPPING], ids=["aligned", "param_map"])
def test_clean_models_report_every_parameter_identical(param_map) -> None:
    result = check_models(make_upstream(0), make_port(0), param_map=param_map)
    assert result and words.counts_line(result) == CLEAN_COUNTS
    assert words.summary(result) == f"pre-flight: clean; {CLEAN_COUNTS}; inputs not checked (no forward pass)"
    fused = [p for p in result.params if p.upstream == "blocks.0.self_attn.k.weight"]
    assert [(p.port_label, p.status, p.exact) for p in fused] == [
        ("transformer_blocks.0.attn1.to_qkv.weight[64:128]", "identical", True)]


def test_models_name_a_transposed_a_scaled_and_a_missing_parameter() -> None:
    result = check_models(make_upstream(0), broken_port())
    assert not result
    assert words.counts_line(result) == ("123 parameters compared: 120 identical, 1 transposed, 1 scaled, "
                                         "1 missing in port")
    found = lines(result)
    assert found[0] == MISSING
    assert found[1] == TRANSPOSED
    assert mask_floats(found[2]) == SCALED + ")"
    assert_scaled_by_half(found[2])
    scaled = result.weight_findings[2]
    assert scaled.scale == pytest.approx(0.5) and scaled.exact
    expected = (make_upstream(0).blocks[2].ffn[0].weight * 0.5).abs().max().item()
    assert scaled.max_abs == pytest.approx(expected)


def test_models_name_a_parameter_the_loader_left_out() -> None:
    """``load_state_dict(strict=False)`` without one key leaves that parameter at its own initial values."""
    upstream = make_upstream(0)
    state = convert_state_dict(upstream.state_dict())
    del state["transformer_blocks.3.ffn.fc_out.bias"]
    port = make_port(seed=1)
    port.load_state_dict(state, strict=False)
    result = check_models(upstream, port, param_map=PARAM_NAMES_MAPPING)
    assert words.counts_line(result) == "123 parameters compared: 122 identical, 1 different"
    (finding,) = result.weight_findings
    assert words.line(finding).startswith(
        "transformer_blocks.3.ffn.fc_out.bias different from upstream blocks.3.ffn.2.bias: max-abs ")


def test_models_name_swapped_pieces_of_a_fused_projection() -> None:
    upstream, port = make_upstream(0), swapped_qk_port()
    result = check_models(upstream, port, param_map=PARAM_NAMES_MAPPING)
    assert words.counts_line(result) == "123 parameters compared: 119 identical, 4 swapped pieces"
    assert words.line(result.weight_findings[0]).startswith(
        "transformer_blocks.1.attn1.to_qkv.weight[0:64] swapped pieces: holds upstream blocks.1.self_attn.k.weight "
        "where upstream blocks.1.self_attn.q.weight belongs")
    # Without the map the pieces are judged in the order their names give (q, k, v): the same finding.
    inferred = check_models(upstream, port)
    assert words.counts_line(inferred) == words.counts_line(result)
    assert words.line(inferred.weight_findings[0]).endswith("the conversion concatenated k, q, v, not q, k, v "
                                                       "(by the upstream's module names q, k, v)")


# -- traces -----------------------------------------------------------------------------


def test_clean_traces_report_identical_weights_and_inputs(traces) -> None:
    with load_trace(traces["upstream"]) as up, load_trace(traces["clean"]) as port:
        result = check_traces(up, port)
    assert result
    assert words.summary(result) == f"pre-flight: clean; {CLEAN_COUNTS}; inputs identical (3 tensors, steps 0, 1)"
    assert len(result.inputs) == 3 * STEPS and all(i.status == "identical" for i in result.inputs)


def test_traces_name_the_same_problems_from_fingerprints(traces) -> None:
    with load_trace(traces["upstream"]) as up, load_trace(traces["broken"]) as port:
        result = check_traces(up, port)
        mapped = check_traces(up, port, param_map=PARAM_NAMES_MAPPING)
    assert words.counts_line(result) == ("123 parameters compared: 120 identical, 1 transposed, 1 scaled, "
                                         "1 missing in port")
    found = lines(result)
    assert found[:2] == [MISSING, TRANSPOSED]
    assert mask_floats(found[2]) == SCALED + " over the sampled values)"
    assert_scaled_by_half(found[2])
    assert not result.weight_findings[2].exact
    # The map names the port parameter the converter should have filled; the aligner refuses such
    # a map, so modules are aligned without it and the result says so.
    assert words.counts_line(mapped) == words.counts_line(result)
    assert lines(mapped)[0] == ("upstream blocks.0.cross_attn.k.bias missing in port (the param map sends it to "
                                "'transformer_blocks.0.attn2.to_k.bias', which the port does not have)")
    assert any(note.startswith("modules aligned without the parameter map") for note in words.notes(mapped))


def test_traces_check_fused_pieces_against_their_slices(traces) -> None:
    with load_trace(traces["upstream"]) as up, load_trace(traces["swapped"]) as port:
        result = check_traces(up, port, param_map=PARAM_NAMES_MAPPING)
    assert words.counts_line(result) == "123 parameters compared: 119 identical, 4 swapped pieces"
    first = result.weight_findings[0]
    assert (first.port_label, first.upstream) == ("transformer_blocks.1.attn1.to_qkv.weight[0:64]",
                                                  "blocks.1.self_attn.q.weight")
    assert first.detail.startswith("holds upstream blocks.1.self_attn.k.weight where upstream "
                                   "blocks.1.self_attn.q.weight belongs")


def test_traces_name_inputs_that_differ(traces) -> None:
    with load_trace(traces["upstream"]) as up, load_trace(traces["inputs"]) as port:
        result = check_traces(up, port)
    assert not result and words.counts_line(result) == CLEAN_COUNTS
    assert words.inputs_line(result) == "inputs differ at steps 0, 1 (`context`)"
    found = [words.line(i) for i in result.input_findings]
    assert [line.split(" max-abs")[0] for line in found] == ["inputs differ at step 0: `context`",
                                                              "inputs differ at step 1: `context`"]
    assert mask_floats(found[0]).startswith("inputs differ at step 0: `context` max-abs #, rel #")
    assert number_after(found[0], "max-abs ") == pytest.approx(3e-2, rel=1e-3)
    assert found[0].endswith(" (all 256 elements)")
    assert {i.name for i in result.inputs if i.status == "identical"} == {"x", "t"}


# -- where the pre-flight shows up -------------------------------------------------------


def test_analysis_shows_the_preflight_first_and_the_likely_cause(traces, tmp_path) -> None:
    analysis = analyse(traces["upstream"], traces["scaled"], out_dir=tmp_path)
    text = analysis.text()
    assert text.startswith("pre-flight: 1 finding; 123 parameters compared: 122 identical, 1 scaled; "
                           "inputs identical (3 tensors, steps 0, 1)\n")
    assert analysis.result.first_drift.port == "transformer_blocks.2.ffn.fc_in"
    cause = "likely cause: transformer_blocks.2.ffn.fc_in.weight scaled by "
    masked = mask_floats(text)
    assert masked.index(f"{cause}# vs upstream blocks.2.ffn.0.weight (max-abs #") < masked.index(
        "first drift: transformer_blocks.2.ffn.fc_in")
    assert number_after(text, cause) == pytest.approx(0.5, rel=1e-3)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["preflight"]["ok"] is False
    assert report["preflight"]["counts"] == {"identical": 122, "scaled": 1}
    likely = report["preflight"]["likely_cause"]
    assert mask_floats(likely).startswith(f"{cause}# vs upstream blocks.2.ffn.0.weight (max-abs #")
    assert number_after(likely, cause) == pytest.approx(0.5, rel=1e-3)


def test_analysis_blames_different_inputs_before_any_layer(traces) -> None:
    text = analyse(traces["upstream"], traces["inputs"]).text()
    assert text.startswith("pre-flight: 2 findings; 123 parameters compared: 123 identical; "
                           "inputs differ at steps 0, 1 (`context`)\n")
    cause = "likely cause: inputs differ at step 0: `context` max-abs "
    assert cause in text and text.index(cause) < text.index("first drift: ")
    assert number_after(text, cause) == pytest.approx(3e-2, rel=1e-3)


def test_pytest_diagnosis_compares_the_live_weights(tmp_path) -> None:
    pair = make_pair(make_upstream(0), scaled_port(), make_inputs(0))
    diagnosis = diagnose(pair, tmp_path, Settings())
    assert diagnosis.analysis is not None, diagnosis.error
    assert diagnosis.analysis.preflight.source == "models"
    section = diagnosis.section()
    assert section.startswith("pre-flight: 1 finding; 123 parameters compared: 122 identical, 1 scaled; "
                              "inputs identical (3 tensors, step 0)")
    cause = "likely cause: transformer_blocks.2.ffn.fc_in.weight scaled by "
    assert f"{cause}# vs upstream blocks.2.ffn.0.weight" in mask_floats(section)
    assert number_after(section, cause) == pytest.approx(0.5, rel=1e-3)
    assert "over the sampled values" not in section  # exact numbers, from the tensors
