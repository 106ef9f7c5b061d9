"""Bisection on the bundled demo pair: every planted bug is named, down to the operator where it lives."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tracediff.bisect import BisectResult, bisect_models, isolate_models
from tracediff.bisect.ops import operator_level
from tracediff.demo import port_dit, upstream_dit
from tracediff.demo.convert import PARAM_NAMES_MAPPING
from tracediff.demo.models import BUGS, make_inputs, make_port, make_upstream
from tracediff.render.bisect import text, to_json

PARAM_MAP = "tracediff.demo.convert:PARAM_NAMES_MAPPING"


def line_of(module: Any, snippet: str) -> int:
    """1-based line of the only line of ``module``'s source containing ``snippet``."""
    lines = Path(inspect.getsourcefile(module) or "").read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if snippet in line]
    assert len(hits) == 1, (snippet, hits)
    return hits[0]


@pytest.fixture(scope="module")
def bisected() -> dict[str, BisectResult]:
    upstream = make_upstream(0)
    results = {}
    for bug in BUGS:
        results[bug] = bisect_models(upstream, make_port(0, bug=bug), make_inputs(0), param_map=PARAM_MAP,
                                     tolerance="single-block")
    return results


@pytest.mark.parametrize("bug", list(BUGS))
def test_bisect_names_each_planted_culprit(bisected: dict[str, BisectResult], bug: str) -> None:
    result = bisected[bug]
    expected = BUGS[bug]
    assert not result
    assert (result.culprit, result.culprit_upstream) == (expected.port_module, expected.upstream_module)
    # The path goes from the top-level block down, one aligned level at a time.
    chain = [error.port for error in result.chain]
    block = ".".join(expected.port_module.split(".")[:2])
    assert chain[0] == block
    assert chain[-1] == expected.port_module or result.path[-1].culprit is None
    assert all(error.local is not None and error.local.failed for error in result.chain)
    # Three passes per level (upstream reference, forced port, free port), only the first step.
    assert result.forward_passes == 3 * len(result.path)
    assert result.step == 0 and result.steps_checked == 1


def test_leaf_culprits_come_with_their_differing_settings(bisected: dict[str, BisectResult]) -> None:
    gelu = bisected["gelu_tanh"]
    assert [e.port for e in gelu.chain] == ["transformer_blocks.2", "transformer_blocks.2.ffn",
                                            "transformer_blocks.2.ffn.act"]
    assert gelu.operator is not None and gelu.operator.settings == ("approximate='none'", "approximate='tanh'")
    eps = bisected["ln_eps"]
    assert eps.operator is not None and eps.operator.settings is not None
    assert "eps=0.01" in eps.operator.settings[0] and "eps=1e-06" in eps.operator.settings[1]
    # FP32LayerNorm is the port's own code: traced down to the F.layer_norm call on each side.
    assert eps.operator.port_op is not None and eps.operator.upstream_op is not None
    assert eps.operator.port_op.source.line == line_of(port_dit, "return F.layer_norm(h, self.normalized_shape")
    assert eps.operator.upstream_op.source.line == line_of(upstream_dit, "return F.layer_norm(x.to(dtype)")


def test_free_function_bug_names_attention_and_the_first_differing_operator(
    bisected: dict[str, BisectResult],
) -> None:
    result = bisected["rope_sign"]
    assert [e.port for e in result.chain] == ["transformer_blocks.2", "transformer_blocks.2.attn1"]
    inside = result.path[-1]
    assert inside.parent == "transformer_blocks.2.attn1" and inside.culprit is None
    assert {m.port.rsplit(".", 1)[1] for m in inside.modules} == {"norm_q", "norm_k", "to_out"}
    to_out = next(m for m in inside.modules if m.port.endswith("to_out"))
    # to_out is clean given upstream's inputs, but its own inputs (the attention output) drift.
    assert to_out.local is not None and not to_out.local.failed
    assert to_out.inputs_forced and to_out.input_drift is not None and to_out.input_drift.failed

    op = result.operator
    assert op is not None and op.port_op is not None and op.upstream_op is not None
    assert op.port_op.source.file == inspect.getsourcefile(port_dit)
    assert op.port_op.source.function == "apply_rotary"
    assert op.port_op.source.line == line_of(port_dit, "return rotated.flatten(-2)")
    assert op.upstream_op.source.file == inspect.getsourcefile(upstream_dit)
    assert op.upstream_op.source.function == "rope_apply"
    assert op.upstream_op.source.line == line_of(upstream_dit, "torch.view_as_real(x_i * freqs_i).flatten(3)")
    assert op.metrics is not None and op.metrics.failed
    # The data flow leads back to the flipped sine, the earliest port operator without an upstream counterpart.
    assert op.suspects[0].source.line == line_of(port_dit, "sin = sin * self.rope_sin_sign")
    assert op.suspects[0].source.function == "forward"
    assert op.last_match is not None and op.last_match[0].source.function == "apply_rotary"
    assert result.module_calls == 2


def test_glue_code_bug_is_blamed_on_the_block_with_the_operator(bisected: dict[str, BisectResult]) -> None:
    result = bisected["residual_scale"]
    assert result.path[-1].parent == "transformer_blocks.3" and result.path[-1].culprit is None
    op = result.operator
    assert op is not None and op.port_op is not None and op.upstream_op is not None
    assert op.port_op.source.line == line_of(port_dit, "return hidden_states + ffn_out")
    assert op.upstream_op.source.line == line_of(upstream_dit, "return x + y * e[5]")
    assert op.suspects == []  # both inputs of the add match upstream: the add itself is the bug


def test_clean_pair_is_truthy_after_one_level() -> None:
    result = bisect_models(make_upstream(0), make_port(0), make_inputs(0), param_map=PARAM_NAMES_MAPPING,
                           tolerance="single-block")
    assert result and result.culprit is None and result.operator is None
    assert result.forward_passes == 3 and len(result.path) == 1
    assert result.output is not None and not result.output.failed
    assert "no local drift" in text(result)
    assert to_json(result)["ok"] is True


def test_isolation_separates_local_from_accumulated_error() -> None:
    level = isolate_models(make_upstream(0), make_port(0, bug="ln_eps"), make_inputs(0), param_map=PARAM_MAP,
                           tolerance="single-block")
    by_name = {m.port: m for m in level.modules}
    culprit = by_name["transformer_blocks.1"]
    assert level.culprit is culprit and culprit.amplification == pytest.approx(1.0, rel=1e-3)
    later = by_name["transformer_blocks.2"]
    assert later.local is not None and later.local.rel_l2 < 1e-6 and not later.drifts
    assert later.accumulated is not None and later.accumulated.failed
    assert later.amplification is not None and later.amplification > 1e3
    assert [m.port for m in level.modules][:2] == ["patch_embed.proj", "condition_embedder.time_embedder"]


def test_only_the_first_drifting_step_is_drilled() -> None:
    steps = [make_inputs(0, step=s) for s in (0, 10, 20)]
    result = bisect_models(make_upstream(0), make_port(0, bug="gelu_tanh"), step_inputs=steps, step=2,
                           param_map=PARAM_MAP, tolerance="single-block")
    assert result.step == 2 and all(level.step == 2 for level in result.path)
    assert result.culprit == BUGS["gelu_tanh"].port_module


def _captured_inputs(model: nn.Module, name: str, inputs: dict[str, torch.Tensor]) -> Any:
    seen: list[Any] = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize(("port_name", "upstream_name"), [
    ("transformer_blocks.2.attn1", "blocks.2.self_attn"),
    ("transformer_blocks.2", "blocks.2"),
])
def test_operator_level_finds_nothing_in_clean_modules(port_name: str, upstream_name: str) -> None:
    upstream, port, inputs = make_upstream(0), make_port(0), make_inputs(0)
    finding = operator_level(
        dict(port.named_modules())[port_name], dict(upstream.named_modules())[upstream_name],
        _captured_inputs(port, port_name, inputs), _captured_inputs(upstream, upstream_name, inputs),
        bisect_tolerance(), port_name=port_name, upstream_name=upstream_name,
    )
    assert finding.port_op is None, finding
    assert "no operator differs" in finding.note and finding.matched > 5


def bisect_tolerance() -> Any:
    from tracediff.tolerance import preset

    return preset("single-block")


def test_noise_floor_keeps_bf16_round_off_from_being_called_a_bug() -> None:
    from tracediff.call_context import clone_inputs

    bf16 = torch.bfloat16
    upstream = make_upstream(0).to(bf16)
    inputs = clone_inputs(make_inputs(0), dtype=bf16)
    options: dict[str, Any] = {"param_map": PARAM_MAP, "tolerance": "single-block"}
    calibrated = bisect_models(upstream, make_port(0).to(bf16), inputs, noise_floor=True, **options)
    assert calibrated and calibrated.culprit is None
    blocks = [m for m in calibrated.path[0].modules if m.port.startswith("transformer_blocks.")]
    # A correct bf16 port breaks a float32 tolerance in every block, yet sits at its noise floor.
    assert all(m.local is not None and m.local.failed for m in blocks)
    assert all(m.noise_ratio is not None and m.noise_ratio < 1.5 for m in blocks)
    buggy = bisect_models(upstream, make_port(0, bug="rope_sign").to(bf16), inputs, noise_floor=True, max_depth=1,
                          **options)
    assert buggy.culprit == BUGS["rope_sign"].port_module
    assert len(buggy.path) == 2 and buggy.forward_passes == 10  # max_depth=1: attn1's children are not measured
    assert buggy.operator is not None and buggy.operator.port_op is not None
    assert buggy.operator.port_op.source.function == "apply_rotary"
