"""Pre-flight names pieces of a fused weight that the conversion stacked in another order, without a param map.

The bug (issue 19, problem 5): a conversion that builds the port's fused ``to_qkv``
as ``cat(q, v, k)`` instead of ``cat(q, k, v)``. Every value is in the port, so a
check that pairs by value alone called it clean, and ``run`` then blamed the
attention's own code. Here the swap is planted the way a real loader makes it: the
bundled demo's real ``convert_state_dict`` with a ``param_names_mapping`` whose
merge indices are wrong. The upstream's q/k/v Linears have biases, so the bias
pieces are swapped too. The clean conversion of each pair must stay clean.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import tracediff.render.preflight as words
from tests.cli_helpers import report_lines, run_cli
from tests.pairs import llama
from tracediff import TraceConfig
from tracediff.demo import make_inputs, make_upstream
from tracediff.demo.convert import PARAM_NAMES_MAPPING, convert_state_dict
from tracediff.demo.models import DemoConfig, _port_kwargs
from tracediff.demo.port_dit import VideoDiTTransformer
from tracediff.pipeline.runner import trace_model
from tracediff.preflight import check_models, check_traces
from tracediff.store.load import load_trace

STATS = "abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample"
CLEAN = "123 parameters compared: 123 identical"
#: q/k/v weight and bias of the 4 blocks: k and v of each are swapped
SWAPPED = "123 parameters compared: 107 identical, 16 swapped pieces"
K_IN_V = ("transformer_blocks.0.attn1.to_qkv.weight[64:128] swapped pieces: holds upstream "
          "blocks.0.self_attn.v.weight where upstream blocks.0.self_attn.k.weight belongs (k is in rows 128:192); "
          "the conversion concatenated q, v, k, not q, k, v (by the upstream's module names q, k, v)")


def reordered_map(order: tuple[int, int, int]) -> dict:
    """The demo's ``param_names_mapping`` with the self-attention's q, k, v sent to merge slots ``order``."""
    slots = dict(zip((0, 1, 2), order, strict=True))
    return {pattern: (value[0], slots[value[1]], value[2]) if isinstance(value, tuple) else value
            for pattern, value in PARAM_NAMES_MAPPING.items()}


def converted_port(mapping: dict, seed: int = 0) -> nn.Module:
    """The demo port loaded from the demo upstream's weights through ``mapping`` (strict load)."""
    upstream = make_upstream(seed)
    port = VideoDiTTransformer(**_port_kwargs(DemoConfig()))
    port.load_state_dict(convert_state_dict(upstream.state_dict(), mapping, port.state_dict().keys()), strict=True)
    return port.eval()


def kv_swapped_port(seed: int = 0) -> nn.Module:
    """Run-spec factory: the port as a conversion that concatenates ``[q, v, k]`` builds it."""
    return converted_port(reordered_map((0, 2, 1)), seed)


def trace(model: nn.Module, side: str, path: Path) -> Path:
    trace_model(model, side=side, steps=[make_inputs(0, step=0)], output=path, config=TraceConfig(stats=STATS))
    return path


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fused_swap")
    return {
        "root": root,
        "upstream": trace(make_upstream(0), "upstream", root / "upstream.h5"),
        "clean": trace(converted_port(PARAM_NAMES_MAPPING), "port", root / "clean.h5"),
        "swapped": trace(kv_swapped_port(), "port", root / "swapped.h5"),
    }


def swapped_lines(result) -> list[str]:
    return [words.line(p) for p in result.weight_findings if p.status == "swapped"]


# -- live models ------------------------------------------------------------------------


def test_clean_fused_conversion_stays_clean_without_a_param_map() -> None:
    result = check_models(make_upstream(0), converted_port(PARAM_NAMES_MAPPING))
    assert result and words.counts_line(result) == CLEAN
    assert not words.notes(result)


def test_kv_swapped_in_conversion_is_named_without_a_param_map() -> None:
    result = check_models(make_upstream(0), kv_swapped_port())
    assert not result
    assert words.counts_line(result) == SWAPPED
    found = result.weight_findings
    assert {(p.port_label, p.upstream) for p in found} == {
        (f"transformer_blocks.{b}.attn1.to_qkv.{n}[{rows}]", f"blocks.{b}.self_attn.{piece}.{n}")
        for b in range(4) for n in ("weight", "bias") for piece, rows in (("k", "64:128"), ("v", "128:192"))}
    assert all(p.exact and p.failing and p.port_module == f"transformer_blocks.{p.upstream.split('.')[1]}.attn1.to_qkv"
               for p in found)
    assert words.line(found[0]) == K_IN_V
    bias_v = next(p for p in found if p.upstream == "blocks.3.self_attn.v.bias")
    assert words.line(bias_v).startswith("transformer_blocks.3.attn1.to_qkv.bias[128:192] swapped pieces: holds "
                                         "upstream blocks.3.self_attn.k.bias where upstream blocks.3.self_attn.v.bias "
                                         "belongs")
    # q stayed in place: its slices are identical, not swapped.
    q = [p for p in result.params if p.upstream is not None and ".self_attn.q." in p.upstream]
    assert len(q) == 8 and {p.status for p in q} == {"identical"}


@pytest.mark.parametrize(("order", "stacked"), [((1, 2, 0), "v, q, k"), ((2, 0, 1), "k, v, q")],
                         ids=["rotated_left", "rotated_right"])
def test_every_piece_out_of_place_is_named(order, stacked) -> None:
    """Three pieces that trade places in a cycle: each slice names the piece it holds and where its own went."""
    result = check_models(make_upstream(0), converted_port(reordered_map(order)))
    assert words.counts_line(result) == "123 parameters compared: 99 identical, 24 swapped pieces"
    lines = [words.line(p) for p in result.weight_findings if p.upstream and p.upstream.startswith("blocks.1.")
             and p.upstream.endswith("weight")]
    assert len(lines) == 3
    assert all(f"the conversion concatenated {stacked}, not q, k, v" in line for line in lines)
    # Slot i of the port holds the upstream piece the buggy map sent there.
    names = "qkv"
    for line, slot in zip(lines, range(3), strict=True):
        held = names[order.index(slot)]
        assert re.search(rf"\[{64 * slot}:{64 * slot + 64}\] swapped pieces: holds upstream "
                         rf"blocks\.1\.self_attn\.{held}\.weight where upstream "
                         rf"blocks\.1\.self_attn\.{names[slot]}\.weight belongs", line), line


def test_a_scaled_piece_beside_the_swap_is_named_too() -> None:
    """The aligner leaves a fused module alone when a piece differs; its pieces are still judged in q, k, v order."""
    port = kv_swapped_port()
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(port.transformer_blocks[2].attn1.to_qkv, name)[:64].mul_(0.5)
    result = check_models(make_upstream(0), port)
    block = {p.upstream: p for p in result.params if p.upstream and p.upstream.startswith("blocks.2.self_attn.")}
    assert block["blocks.2.self_attn.q.weight"].status == "scaled"
    assert block["blocks.2.self_attn.q.weight"].scale == pytest.approx(0.5)
    assert block["blocks.2.self_attn.k.weight"].status == "swapped"
    assert block["blocks.2.self_attn.v.bias"].status == "swapped"
    assert words.counts_line(result) == "123 parameters compared: 105 identical, 2 scaled, 16 swapped pieces"
    assert words.line(block["blocks.2.self_attn.k.weight"]).endswith("the conversion concatenated q, v, k, not q, k, v "
                                                                "(by the upstream's module names q, k, v)")


def test_a_piece_copied_over_another_is_different_not_swapped() -> None:
    """``cat(q, k, k)``: v's slice holds k's values, but nothing traded places, so it is no swap."""
    port = converted_port(PARAM_NAMES_MAPPING)
    with torch.no_grad():
        fused = port.transformer_blocks[1].attn1.to_qkv.weight
        fused[128:192] = fused[64:128].clone()
    result = check_models(make_upstream(0), port)
    assert words.counts_line(result) == "123 parameters compared: 122 identical, 1 different"
    (finding,) = result.weight_findings
    assert finding.port_label == "transformer_blocks.1.attn1.to_qkv.weight[128:192]"
    assert finding.detail.endswith("it holds blocks.1.self_attn.k.weight's values (pieces swapped?)")


def test_the_param_map_decides_the_order_when_given() -> None:
    """With the right map the swap is named against its merge order; a map that describes the port's layout is the
    truth, so a port built through that very map is clean."""
    upstream, port = make_upstream(0), kv_swapped_port()
    mapped = check_models(upstream, port, param_map=PARAM_NAMES_MAPPING)
    assert words.counts_line(mapped) == SWAPPED
    assert words.line(mapped.weight_findings[0]) == K_IN_V.replace("by the upstream's module names q, k, v",
                                                              "the param map's merge order")
    deliberate = check_models(upstream, port, param_map=reordered_map((0, 2, 1)))
    assert deliberate and words.counts_line(deliberate) == CLEAN


def test_a_fused_upstream_split_wrongly_into_the_port_is_named() -> None:
    """The other way round: the reference holds the fused tensor, the conversion splits it into k and v swapped."""
    fused_reference = converted_port(PARAM_NAMES_MAPPING)
    split_port = make_upstream(0)
    with torch.no_grad():
        for block in split_port.blocks:
            for name in ("weight", "bias"):
                k, v = getattr(block.self_attn.k, name), getattr(block.self_attn.v, name)
                k_values = k.clone()
                k.copy_(v)
                v.copy_(k_values)
    result = check_models(fused_reference, split_port)
    assert words.counts_line(result) == SWAPPED
    assert words.line(result.weight_findings[0]) == (
        "blocks.0.self_attn.k.weight swapped pieces: holds upstream transformer_blocks.0.attn1.to_qkv.weight[128:192] "
        "(v) where upstream transformer_blocks.0.attn1.to_qkv.weight[64:128] belongs; the conversion split it into "
        "q, v, k, not q, k, v (by the port's module names q, k, v)")


def test_llama_pair_fused_qkv_and_gate_up() -> None:
    """A second pair: HF-style q_proj/k_proj/v_proj and gate_proj/up_proj (with biases) fused Meta-style."""
    reference = llama.make_reference(0)
    clean = check_models(reference, llama.make_port(0))
    assert clean and words.counts_line(clean) == ("52 parameters and buffers compared: 51 identical, 1 computed "
                                                  "(not in the state dict)")
    port = llama.make_port(0)
    with torch.no_grad():
        for name in ("weight", "bias"):  # the conversion stacked cat(up, gate) in layer 1
            fused = getattr(port.layers[1].feed_forward.w13, name)
            gate = fused[:64].clone()
            fused[:64] = fused[64:].clone()
            fused[64:] = gate
    result = check_models(reference, port)
    assert words.counts_line(result) == ("52 parameters and buffers compared: 47 identical, 1 computed (not in the "
                                         "state dict), 4 swapped pieces")
    assert words.line(result.weight_findings[0]) == (
        "layers.1.feed_forward.w13.weight[0:64] swapped pieces: holds upstream model.layers.1.mlp.up_proj.weight "
        "where upstream model.layers.1.mlp.gate_proj.weight belongs (gate_proj is in rows 64:128); the conversion "
        "concatenated up_proj, gate_proj, not gate_proj, up_proj (by the upstream's module names gate_proj, up_proj)")


class KeyFirstAttention(nn.Module):
    """Defines its projections k, v, q, as HF's CLIP does; it computes q first."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.k_proj, self.v_proj, self.q_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v)


class FusedAttention(nn.Module):
    """The port: one ``qkv_proj`` sliced as q, k, v (vLLM's QKVParallelLinear layout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv_proj, self.out_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.out_proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v)


def test_role_names_not_definition_order_set_the_natural_order() -> None:
    """An upstream that defines k before q is not a swap when the port stacks q, k, v; k and v swapped still is."""
    torch.manual_seed(0)
    upstream, port = KeyFirstAttention(32), FusedAttention(32)

    def load(order: str) -> FusedAttention:
        with torch.no_grad():
            for name in ("weight", "bias"):
                parts = [getattr(getattr(upstream, f"{role}_proj"), name) for role in order]
                getattr(port.qkv_proj, name).copy_(torch.cat(parts))
            port.out_proj.load_state_dict(upstream.out_proj.state_dict())
        return port

    clean = check_models(upstream, load("qkv"))
    assert clean and words.counts_line(clean) == "8 parameters compared: 8 identical"
    swapped = check_models(upstream, load("qvk"))
    assert words.counts_line(swapped) == "8 parameters compared: 4 identical, 4 swapped pieces"
    assert words.line(swapped.weight_findings[0]).endswith(
        "the conversion concatenated q_proj, v_proj, k_proj, not q_proj, k_proj, v_proj "
        "(by the upstream's module names q_proj, k_proj, v_proj)")


# -- traces and the CLI -----------------------------------------------------------------


def test_traces_name_the_swap_from_fingerprints(traces) -> None:
    with load_trace(traces["upstream"]) as up, load_trace(traces["clean"]) as clean:
        assert words.counts_line(check_traces(up, clean)) == CLEAN
    with load_trace(traces["upstream"]) as up, load_trace(traces["swapped"]) as port:
        result = check_traces(up, port)
    assert words.counts_line(result) == SWAPPED
    assert swapped_lines(result)[0] == K_IN_V
    assert not any(p.exact for p in result.weight_findings)
    assert result.weight_findings[1].port_label == "transformer_blocks.0.attn1.to_qkv.bias[64:128]"


def test_weights_cli_exits_one_on_the_swap_and_zero_on_the_clean_demo(traces) -> None:
    up = str(traces["upstream"])
    clean = run_cli("weights", up, str(traces["clean"]), cwd=traces["root"])
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.splitlines() == [CLEAN, "inputs identical (3 tensors, step 0)"]
    swapped = run_cli("weights", up, str(traces["swapped"]), "--json", cwd=traces["root"])
    assert swapped.returncode == 1, swapped.stdout + swapped.stderr
    result = json.loads(swapped.stdout)
    assert result["counts"] == {"identical": 107, "swapped": 16}
    assert result["findings"][0] == K_IN_V
    table = run_cli("weights", up, str(traces["swapped"]), cwd=traces["root"])
    assert table.returncode == 1
    row = next(line for line in table.stdout.splitlines() if "to_qkv.weight[64:128]" in line).split(None, 3)
    assert row[:3] == ["weight", "transformer_blocks.0.attn1.to_qkv.weight[64:128]", "blocks.0.self_attn.k.weight"]
    assert row[3].startswith("swapped pieces: holds upstream blocks.0.self_attn.v.weight (k is in rows 128:192)")


SPEC = """
    [upstream]
    factory = "tracediff.demo.models:make_upstream"

    [port]
    factory = "tests.preflight.test_preflight_fused_swap:kv_swapped_port"

    [inputs]
    factory = "tracediff.demo.models:make_inputs"

    [run]
    steps = 1

    [tolerance]
    preset = "single-block"
"""


def test_run_shows_the_swap_before_the_report(tmp_path) -> None:
    """No param map in the spec: the pre-flight block names the swapped pieces before any layer is blamed."""
    spec = tmp_path / "parity.toml"
    spec.write_text(textwrap.dedent(SPEC))
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    head = lines[:len(lines) - len(report_lines(proc.stdout))]
    assert head[0].startswith("pre-flight: 16 findings; " + SWAPPED)
    assert any("swapped pieces: holds upstream blocks.0.self_attn.v.weight" in line for line in head)
    report = json.loads(next((tmp_path / "out").glob("**/report.json")).read_text())
    assert report["preflight"]["counts"] == {"identical": 107, "swapped": 16}
    assert report["preflight"]["findings"][0] == K_IN_V


def test_bisect_shows_the_swap_before_its_culprit(tmp_path) -> None:
    """Bisection alone blames the attention that uses the swapped weight; its pre-flight names the conversion."""
    spec = tmp_path / "parity.toml"
    spec.write_text(textwrap.dedent(SPEC))
    proc = run_cli("bisect", str(spec), "--max-depth", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("pre-flight: 16 findings; " + SWAPPED), proc.stdout
    headline = next(index for index, line in enumerate(lines) if line.startswith("culprit:"))
    cause = [line for line in lines[:headline] if line.startswith(("likely cause:", "possible cause"))]
    assert cause and "swapped pieces" in cause[0], proc.stdout
    as_json = json.loads(run_cli("bisect", str(spec), "--max-depth", "1", "--json").stdout)
    assert as_json["preflight"]["counts"] == {"identical": 107, "swapped": 16}
    assert "swapped pieces" in as_json["preflight"]["likely_cause"]


def test_bisect_of_the_clean_demo_reports_a_clean_pre_flight() -> None:
    proc = run_cli("bisect", "--demo", "clean", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    preflight = json.loads(proc.stdout)["preflight"]
    assert preflight["counts"] == {"identical": 123} and preflight["likely_cause"] is None
