"""Bisection on a second, independently written pair (tests/pairs/llama_*.py), and the case it exists for.

The reference is written Hugging Face style (rotate_half RoPE, separate q/k/v and
gate/up projections, ``model(input_ids=...)``); the port Meta/vLLM style (complex
RoPE, fused ``wqkv``/``w13``, ``F.scaled_dot_product_attention``, ``model(tokens)``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from tests.pairs import llama_port, llama_ref
from tests.pairs.llama import BUGS, PARAM_NAMES_MAPPING, call_reference, make_inputs, make_port, make_reference
from tracediff.bisect import bisect_models, isolate_models
from tracediff.bisect.ops import operator_level
from tracediff.config import TraceConfig
from tracediff.pipeline.analyse import analyse
from tracediff.pipeline.runner import clone_inputs, trace_model
from tracediff.tolerance import preset


def line_of(module: object, snippet: str) -> int:
    lines = Path(inspect.getsourcefile(module) or "").read_text().splitlines()  # type: ignore[arg-type]
    hits = [i + 1 for i, line in enumerate(lines) if snippet in line]
    assert len(hits) == 1, (snippet, hits)
    return hits[0]


def bisect(bug: str | None, **options: object):
    return bisect_models(make_reference(0), make_port(0, bug=bug), make_inputs(0), param_map=PARAM_NAMES_MAPPING,
                         upstream_call=call_reference, tolerance="single-block", **options)


def test_planted_mlp_bug_is_named_at_its_leaf_module() -> None:
    result = bisect("tp_bias")
    assert not result
    assert (result.culprit, result.culprit_upstream) == (BUGS["tp_bias"].port_module, BUGS["tp_bias"].upstream_module)
    assert [e.port for e in result.chain] == ["layers.2", "layers.2.feed_forward", "layers.2.feed_forward.w2"]
    assert result.forward_passes == 9
    # RowLinear is the port's own code: the operator trace lands in its forward.
    op = result.operator
    assert op is not None and op.port_op is not None
    assert op.port_op.source.file == inspect.getsourcefile(llama_port)
    assert op.port_op.source.function == "forward"
    assert op.port_op.source.line == line_of(llama_port, "partial = F.linear(x, self.weight) + self.bias")


def test_free_function_bug_names_attention_and_the_operator_in_apply_rotary_emb() -> None:
    result = bisect("rope_conj")
    assert result.culprit == "layers.1.attention" and result.culprit_upstream == "model.layers.1.self_attn"
    assert result.path[-1].parent == "layers.1.attention" and result.path[-1].culprit is None
    op = result.operator
    assert op is not None and op.port_op is not None and op.upstream_op is not None
    assert op.port_op.source.function == "apply_rotary_emb"
    assert op.port_op.source.line == line_of(llama_port, "return torch.cat([rotated.real, rotated.imag]")
    assert op.upstream_op.source.file == inspect.getsourcefile(llama_ref)
    conj = line_of(llama_port, "freqs = freqs.conj()")
    assert conj in [s.source.line for s in op.suspects if s.source is not None]


def test_clean_pair_is_truthy_and_its_attention_has_no_differing_operator() -> None:
    result = bisect(None)
    assert result and result.culprit is None and result.forward_passes == 3
    # Complex-number RoPE against rotate_half: different operators, same values.
    reference, port, inputs = make_reference(0), make_port(0), make_inputs(0)
    captured = {}
    for name, model, call in (("layers.1.attention", port, lambda m: m(**inputs)),
                              ("model.layers.1.self_attn", reference, lambda m: call_reference(m, inputs))):
        module = dict(model.named_modules())[name]
        handle = module.register_forward_pre_hook(lambda m, a, k, n=name: captured.setdefault(n, (a, k)),
                                                  with_kwargs=True)
        call(model)
        handle.remove()
    finding = operator_level(port.layers[1].attention, reference.model.layers[1].self_attn,
                             captured["layers.1.attention"], captured["model.layers.1.self_attn"],
                             preset("single-block"), port_name="layers.1.attention",
                             upstream_name="model.layers.1.self_attn")
    assert finding.port_op is None and finding.matched >= 5, finding


def test_accumulated_first_drift_lands_layers_after_the_culprit_isolation_does_not(tmp_path: Path) -> None:
    """The case this issue exists for.

    A small bug in layer 1 (an RMSNorm eps) stays within the model-level tolerance
    where it happens, then grows through the next layers until the accumulated
    drift crosses the tolerance in layer 3: that is where first-drift points.
    Isolation measures what each layer adds when fed upstream's own inputs, and
    against each layer's calibrated noise floor layer 1 stands out by nearly three orders
    of magnitude while every other layer sits at its floor.
    """
    seed, depth, gain = 1, 6, 3.0  # gain > 1: perturbations grow from layer to layer
    reference = make_reference(seed, n_layers=depth, gain=gain)
    port = make_port(seed, bug="norm_eps", n_layers=depth, gain=gain)
    inputs = make_inputs(seed)
    tolerance = "dit-aligned"

    config = TraceConfig(stats="abs_mean,l2,sample")
    trace_model(reference, side="upstream", steps=[clone_inputs(inputs)], output=tmp_path / "upstream.h5",
                config=config, call=call_reference)
    trace_model(port, side="port", steps=[clone_inputs(inputs)], output=tmp_path / "port.h5", config=config)
    accumulated = analyse(tmp_path / "upstream.h5", tmp_path / "port.h5", param_map=PARAM_NAMES_MAPPING,
                          tolerance=tolerance).result
    first = accumulated.first_drift
    assert first is not None and first.port is not None
    first_layer = int(first.port.split(".")[1])
    assert first_layer >= 3, first.port  # two layers after the culprit
    assert all(not row.failed for row in accumulated.rows if row.port.startswith("layers.1"))

    # Same tolerance, no calibration: the culprit's local error is under it too.
    level = isolate_models(reference, port, inputs, param_map=PARAM_NAMES_MAPPING, upstream_call=call_reference,
                           tolerance=tolerance)
    by_name = {m.port: m for m in level.modules}
    assert level.culprit is None
    culprit = by_name["layers.1"]
    assert culprit.local is not None and culprit.local.rel_l2 > 1e-4
    for index in range(2, depth):
        later = by_name[f"layers.{index}"]
        assert later.local is not None and later.local.rel_l2 < 1e-6  # adds nothing of its own ...
        assert later.amplification is not None and later.amplification > 100  # ... yet carries the drift

    result = bisect_models(reference, port, inputs, param_map=PARAM_NAMES_MAPPING, upstream_call=call_reference,
                           tolerance=tolerance, noise_floor=True)
    assert result.culprit == BUGS["norm_eps"].port_module
    assert [e.port for e in result.chain] == ["layers.1", "layers.1.attention_norm"]
    top = {m.port: m for m in result.path[0].modules}
    assert top["layers.1"].noise_ratio is not None and top["layers.1"].noise_ratio > 100
    assert all(top[f"layers.{i}"].noise_ratio < 3 for i in range(depth) if i != 1)
    assert result.forward_passes == 2 * 5  # two levels, each with two calibration passes
    assert result.operator is not None and result.operator.settings == ("(32,), eps=0.2", "(32,), eps=1e-06")
