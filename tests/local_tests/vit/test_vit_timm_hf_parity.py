"""timm's VisionTransformer (upstream) against transformers' ViTForImageClassification (port).

The clean pair must pass the parity test at the ``fp32`` preset, and tracediff
must align the two without help (and with the converter's ``param_names_mapping``)
through every trap this port sets:

* every module name differs (``blocks.N`` vs ``vit.layers.N``, ``attn.proj`` vs ``attention.o_proj``);
* one fused module upstream is three here (``attn.qkv`` -> ``q_proj``/``k_proj``/``v_proj``);
* weightless layers (GELU, dropout) amid timm's ``Identity`` placeholders;
* modules returning tuples (``ViTAttention`` -> ``(output, None)``) and ``ModelOutput`` objects (the model);
* definition order is not execution order (``ViTLayer`` defines ``attention`` before ``layernorm_before``);
* the same short name meaning different things (``dropout`` runs twice per layer here; timm's ``norm``
  modules inside blocks are ``Identity`` placeholders, its top-level ``norm`` the final LayerNorm).
"""

from __future__ import annotations

import pytest
from torch import nn
from vit_ports import PORTS

from tracediff.align.aligner import coverage
from tracediff.store.load import load_trace

PARITY_SCOPE = "whole classifier (patch embedding to logits), same weights, float32"
PRESET = "fp32"  # docs/tolerance.md: same math, same precision (the clean pair is bit-identical here)
PORT = PORTS["transformers"]
BLOCKS = range(4)


def test_clean_pair_passes_at_fp32(parity, upstream, images, clean_ports) -> None:
    parity.compare(upstream, clean_ports["transformers"], images, preset=PRESET, port_call=PORT.call)


@pytest.fixture(params=["inferred", "param_map"])
def analysis(request, clean_analysis):
    return clean_analysis("transformers", request.param)


def _pairs(analysis) -> dict[str, str]:
    return {pair.upstream: pair.port for pair in analysis.alignment.pairs}


def _compared(analysis) -> dict[str, list[str]]:
    """Port module -> port labels of its records compared against upstream."""
    out: dict[str, list[str]] = {}
    for row in analysis.result.rows:
        out.setdefault(row.port, []).append(row.label)
    return out


def test_clean_pair_has_no_drift_in_any_layer(analysis) -> None:
    assert analysis, analysis.text()
    assert analysis.result.compared >= 43  # 4 blocks x 10 records, embeddings, head, model in/out


def test_clean_pair_leaves_no_alignment_suspect(analysis) -> None:
    """The first test of every family: automatic alignment, clean pair, nothing the values contradict."""
    assert analysis.alignment.suspects == [], analysis.alignment.suspects
    assert analysis.result.alignment_suspects == []


def test_every_module_with_weights_is_aligned(analysis) -> None:
    with load_trace(analysis.upstream) as up, load_trace(analysis.port) as port:
        figures = coverage(analysis.alignment, up, port)
    for side in ("upstream", "port"):
        assert figures[side]["params_aligned"] == figures[side]["params_total"], figures


def test_all_module_names_differ(analysis) -> None:
    named = [(p.upstream, p.port) for p in analysis.alignment.pairs if p.upstream]
    assert len(named) >= 40
    assert all(up != port for up, port in named)


def test_fused_qkv_is_one_group_with_three_port_modules(analysis) -> None:
    groups = {group.upstream: group.port for group in analysis.alignment.groups}
    for n in BLOCKS:
        assert groups[(f"blocks.{n}.attn.qkv",)] == tuple(
            f"vit.layers.{n}.attention.{p}_proj" for p in "qkv"
        )


def test_weightless_layers_are_paired_and_compared(analysis) -> None:
    pairs, compared = _pairs(analysis), _compared(analysis)
    assert pairs["pos_drop"] == "vit.embeddings.dropout"
    for n in BLOCKS:
        act = f"vit.layers.{n}.mlp.activation_fn"
        # timm's act is followed by drop1 and an Identity (mlp.norm): three look-alikes against one
        assert pairs[f"blocks.{n}.mlp.act"] == act
        assert compared[act] == ["input[0]", "out"]  # module inputs are traced too


def test_tuple_and_model_output_records_are_compared(analysis) -> None:
    pairs, compared = _pairs(analysis), _compared(analysis)
    for n in BLOCKS:
        assert pairs[f"blocks.{n}.attn"] == f"vit.layers.{n}.attention"
        # (output, None) against a tensor; the input is compared whatever each side calls it
        assert compared[f"vit.layers.{n}.attention"] == ["input[0]", "out[0]"]
    assert compared[""] == ["input.pixel_values", "out.logits"]  # ImageClassifierOutput against a tensor


def test_definition_order_differs_from_execution_order(analysis, clean_ports) -> None:
    layer: nn.Module = clean_ports["transformers"].vit.layers[0]
    defined = [name for name, _ in layer.named_children()]
    assert defined.index("attention") < defined.index("layernorm_before")
    ran = [row.port for row in analysis.result.rows]
    assert ran.index("vit.layers.0.layernorm_before") < ran.index("vit.layers.0.attention.o_proj")
    pairs = _pairs(analysis)
    for n in BLOCKS:
        assert pairs[f"blocks.{n}.norm1"] == f"vit.layers.{n}.layernorm_before"
        assert pairs[f"blocks.{n}.norm2"] == f"vit.layers.{n}.layernorm_after"


def test_same_short_name_is_not_taken_for_the_same_module(analysis) -> None:
    pairs = _pairs(analysis)
    assert pairs["norm"] == "vit.layernorm"
    port_layernorms = {name for name in pairs.values() if "layernorm" in name}
    for n in BLOCKS:
        # timm's attn.norm and mlp.norm are Identity placeholders: no LayerNorm of the port
        assert pairs.get(f"blocks.{n}.attn.norm") not in port_layernorms
        assert pairs.get(f"blocks.{n}.mlp.norm") not in port_layernorms
        # the port's per-layer dropout runs twice (after attention and after the MLP): no single counterpart
        assert f"vit.layers.{n}.dropout" in analysis.alignment.unmatched_port
        # same names, same meaning, found by their weights
        assert pairs[f"blocks.{n}.mlp.fc1"] == f"vit.layers.{n}.mlp.fc1"
        assert pairs[f"blocks.{n}.attn.proj"] == f"vit.layers.{n}.attention.o_proj"
