"""Pre-flight checks on a second pair (tests/pairs/preflight_pair.py): buffers, layouts, renamed inputs.

Upstream and port name their modules and their forward arguments differently;
each keeps rotary frequencies as a buffer it computes itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tracediff.render.preflight as words
from tests.pairs.preflight_pair import (
    PARAM_MAP,
    THETA,
    inverse_frequencies,
    make_inputs,
    make_port,
    make_upstream,
    port_inputs,
)
from tests.printed_numbers import mask_floats, number_after
from tracediff import TraceConfig
from tracediff.pipeline.analyse import analyse
from tracediff.pipeline.runner import trace_model
from tracediff.preflight import check_models, check_traces
from tracediff.store.load import load_trace

STATS = "abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample"
CLEAN_COUNTS = "19 parameters and buffers compared: 19 identical"
BAD_THETA = 500000.0


#: the verdict on the port's rotary buffer computed with the wrong theta, numbers masked (tests/printed_numbers.py)
BUFFER_LINE = "rope.freqs (buffer) different from upstream rotary.inv_freq: max-abs #, rel #"


def assert_buffer_line(line: str, suffix: str = "") -> None:
    """``line`` is the buffer's verdict and prints its errors, to the two digits it shows, whatever the CPU."""
    assert mask_floats(line) == BUFFER_LINE + suffix
    good, bad = inverse_frequencies(8, THETA).double(), inverse_frequencies(8, BAD_THETA).double()
    max_abs = (bad - good).abs().max().item()
    rel = (torch.linalg.vector_norm(bad - good) / torch.linalg.vector_norm(good)).item()
    # printed with `.1e`: within half a unit of the second digit, 5 % of the value at most
    assert number_after(line, "max-abs ") == pytest.approx(max_abs, rel=0.05)
    assert number_after(line, ", rel ") == pytest.approx(rel, rel=0.05)


def permuted_port() -> torch.nn.Module:
    """Block 0's fc1 weight holds upstream's values with its rows rolled by one."""
    port = make_port()
    with torch.no_grad():
        weight = port.blocks[0].fc1.weight
        weight.copy_(weight.roll(1, dims=0))
    return port


def trace(model: torch.nn.Module, side: str, inputs: dict, path: Path) -> Path:
    trace_model(model, side=side, steps=[inputs], output=path, config=TraceConfig(stats=STATS))
    return path


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preflight_pair")
    shifted = port_inputs(make_inputs())
    shifted["encoder_hidden_states"] = shifted["encoder_hidden_states"] + 0.03
    return {
        "upstream": trace(make_upstream(), "upstream", make_inputs(), root / "upstream.h5"),
        "clean": trace(make_port(), "port", port_inputs(make_inputs()), root / "clean.h5"),
        "buffer": trace(make_port(rope_theta=BAD_THETA), "port", port_inputs(make_inputs()), root / "buffer.h5"),
        "in_out": trace(make_port(head_layout="in_out"), "port", port_inputs(make_inputs()), root / "in_out.h5"),
        "permuted": trace(permuted_port(), "port", port_inputs(make_inputs()), root / "permuted.h5"),
        "inputs": trace(make_port(), "port", shifted, root / "inputs.h5"),
    }


@pytest.mark.parametrize("param_map", [None, PARAM_MAP], ids=["aligned", "param_map"])
def test_clean_pair_is_identical_buffers_included(traces, param_map) -> None:
    live = check_models(make_upstream(), make_port(), param_map=param_map)
    with load_trace(traces["upstream"]) as up, load_trace(traces["clean"]) as port:
        traced = check_traces(up, port, param_map=param_map)
    for result in (live, traced):
        assert result and words.counts_line(result) == CLEAN_COUNTS
    buffer = next(p for p in traced.params if p.kind == "buffer")
    assert (buffer.upstream, buffer.port, buffer.status) == ("rotary.inv_freq", "rope.freqs", "identical")
    assert words.inputs_line(traced) == "inputs identical (2 tensors, step 0)"
    # The two forwards name their arguments differently; the inputs are paired by position.
    assert [(i.upstream_label, i.label) for i in traced.inputs] == [
        ("input.x", "input.hidden_states"), ("input.context", "input.encoder_hidden_states")]


def test_a_buffer_computed_differently_is_named(traces) -> None:
    live = check_models(make_upstream(), make_port(rope_theta=BAD_THETA))
    assert words.counts_line(live) == "19 parameters and buffers compared: 18 identical, 1 different"
    (finding,) = live.weight_findings
    assert_buffer_line(words.line(finding))
    with load_trace(traces["upstream"]) as up, load_trace(traces["buffer"]) as port:
        traced = check_traces(up, port)
    # The buffer has 4 elements, so the sample holds all of them and the numbers are exact too.
    (finding,) = traced.weight_findings
    assert_buffer_line(words.line(finding), " over the sampled values")


def test_the_first_drift_at_the_buffers_module_names_it_as_the_likely_cause(traces) -> None:
    analysis = analyse(traces["upstream"], traces["buffer"])
    assert analysis.result.first_drift.port == "rope"
    (cause,) = [line for line in analysis.text().splitlines() if line.startswith("likely cause: rope.freqs ")]
    assert_buffer_line(cause.removeprefix("likely cause: "), " over the sampled values")


def test_a_weight_stored_transposed_is_named_with_both_shapes(traces) -> None:
    expected = "head.weight transposed: holds upstream proj_out.weight transposed (4×16 -> 16×4)"
    live = check_models(make_upstream(), make_port(head_layout="in_out"), param_map=PARAM_MAP)
    with load_trace(traces["upstream"]) as up, load_trace(traces["in_out"]) as port:
        traced = check_traces(up, port)
    for result in (live, traced):
        assert words.counts_line(result) == "19 parameters and buffers compared: 18 identical, 1 transposed"
        assert [words.line(p) for p in result.weight_findings] == [expected]


def test_same_values_in_another_order_are_called_a_permutation(traces) -> None:
    expected = ("blocks.0.fc1.weight same values as upstream layers.0.mlp_in.weight, different order "
                "(permutation?)")
    live = check_models(make_upstream(), permuted_port())
    with load_trace(traces["upstream"]) as up, load_trace(traces["permuted"]) as port:
        traced = check_traces(up, port)
    assert [words.line(p) for p in live.weight_findings] == [expected]
    assert [words.line(p) for p in traced.weight_findings] == [
        expected + "; equal moments, different sampled values"]


def test_renamed_inputs_that_differ_are_named_by_the_ports_argument(traces) -> None:
    with load_trace(traces["upstream"]) as up, load_trace(traces["inputs"]) as port:
        result = check_traces(up, port)
    assert not result and words.counts_line(result) == CLEAN_COUNTS
    (finding,) = result.input_findings
    assert mask_floats(words.line(finding)).startswith(
        "inputs differ at step 0: `encoder_hidden_states` (upstream `context`) max-abs #, rel #")
    assert number_after(words.line(finding), "max-abs ") == pytest.approx(3e-2, rel=1e-3)
    assert words.line(finding).endswith(" (all 60 elements)")


def test_a_dtype_cast_is_equal_within_tolerance() -> None:
    result = check_models(make_upstream(), make_port().to(torch.bfloat16))
    assert result
    assert words.counts_line(result) == "19 parameters and buffers compared: 19 equal within tolerance"
    assert result.params[0].detail == "float32 -> bfloat16"
