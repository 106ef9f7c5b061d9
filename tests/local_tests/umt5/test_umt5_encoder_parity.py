"""transformers' UMT5EncoderModel (upstream) against FastVideo's UMT5EncoderModel (port).

The port is loaded through its own ``load_weights`` (q/k/v fused into
``qkv_proj``); every port parameter must be loaded and hold the upstream's
values. The clean pair must pass the parity test at the ``fp32`` preset
(transformers' SDPA attention against FastVideo's einsum attention), and
tracediff must align the two without help (and with the loader's name table)
through every trap this port sets:

* three upstream modules are one here (``SelfAttention.q/k/v`` -> ``SelfAttention.qkv_proj``);
* a module with no counterpart: the port's ``SelfAttention.attn`` (T5MultiHeadAttention) runs the
  attention core that transformers runs as a function; upstream's dropouts (eval: pass-through) have
  none on the port side;
* one module under two names: the port's stack uses the model's ``shared`` table as its
  ``embed_tokens`` (one module, named ``shared``), the upstream's stack has its own
  ``encoder.embed_tokens`` tied to ``shared`` (two modules, one tensor; ``shared`` never runs);
* a padded table: FastVideo's ``VocabParallelEmbedding`` pads the 100-row token table to 128 rows;
* layers returning ``(output, bias)`` tuples (FastVideo's parallel linears) against tensors;
* the attention mask reaches the blocks as the caller's int64 ``(batch, tokens)`` mask in the port,
  as transformers' 4-d boolean mask upstream;
* the port's output dataclass carries the attention mask as well as ``last_hidden_state``.
"""

from __future__ import annotations

import pytest
import torch
import umt5_models

from tracediff.align.aligner import coverage
from tracediff.store.load import load_trace
from tracediff.tolerance import preset

PARITY_SCOPE = "whole text encoder (token ids + attention mask to last_hidden_state), same weights, float32"
PRESET = "fp32"  # docs/tolerance.md: same math, same precision, different attention kernels
CALLS = dict(upstream_call=umt5_models.upstream_call, port_call=umt5_models.port_call)
BLOCKS = range(umt5_models.TINY["num_layers"])
ATTN = "encoder.block.{}.layer.0.SelfAttention"
FF = "encoder.block.{}.layer.1.DenseReluDense"


def test_clean_pair_passes_at_fp32(parity, upstream, clean_port, inputs) -> None:
    parity.compare(upstream, clean_port, inputs, preset=PRESET, **CALLS)


def test_clean_pair_uses_under_half_the_tolerance(upstream, clean_port, inputs) -> None:
    """Not bit-identical (SDPA against einsum + float softmax), but well inside ``fp32``."""
    tol = preset(PRESET)
    with torch.no_grad():
        expected = umt5_models.upstream_call(upstream, dict(inputs))
        actual = umt5_models.port_call(clean_port, dict(inputs))
    used = ((actual - expected).abs() / (tol.atol + tol.rtol * expected.abs())).max().item()
    assert used < 0.5, f"the clean pair's output uses {used:.0%} of the fp32 tolerance"


def test_port_loader_loads_every_parameter_with_upstream_values(upstream_state, clean_port) -> None:
    """FastVideo's ``load_weights`` writes every port parameter, each from the upstream tensor it should hold."""
    port = dict(clean_port.named_parameters())
    from fastvideo.models.encoders.t5 import UMT5EncoderModel

    scratch = UMT5EncoderModel(umt5_models.port_config())
    loaded = scratch.load_weights(iter(upstream_state.items()))
    assert loaded == set(port), (sorted(set(port) - loaded), sorted(loaded - set(port)))
    vocab = umt5_models.TINY["vocab_size"]
    assert torch.equal(port["shared.weight"][:vocab], upstream_state["shared.weight"])
    assert not port["shared.weight"][vocab:].any()  # VocabParallelEmbedding's padding rows
    for n in BLOCKS:
        fused = port[f"{ATTN.format(n)}.qkv_proj.weight"]
        parts = [upstream_state[f"{ATTN.format(n)}.{p}.weight"] for p in "qkv"]
        assert torch.equal(fused, torch.cat(parts))
    same = set(port) - {"shared.weight"} - {f"{ATTN.format(n)}.qkv_proj.weight" for n in BLOCKS}
    assert len(same) == 1 + 7 * len(BLOCKS)  # final norm; per block o, bias table, 2 norms, wi_0, wi_1, wo
    for name in same:
        assert torch.equal(port[name], upstream_state[name]), name


@pytest.fixture(params=["inferred", "param_map"])
def analysis(request, clean_analysis):
    return clean_analysis(request.param)


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
    assert analysis.result.first_drift is None, analysis.text()
    assert analysis.result.compared >= 80  # 3 blocks x 24 records, embedding, final norm, model in/out


def test_clean_pair_leaves_no_alignment_suspect(analysis) -> None:
    """The first test of every family: automatic alignment, clean pair, nothing the values contradict."""
    assert analysis.alignment.suspects == [], analysis.alignment.suspects


def test_clean_pair_preflight_has_no_findings(analysis) -> None:
    """Same weights on both sides: a tied table and a padded table are layout, not a wrong weight."""
    assert analysis.preflight is not None
    failing = [check for check in analysis.preflight.params if check.failing]
    assert not failing, analysis.text()


def test_every_module_with_weights_that_runs_is_aligned(analysis) -> None:
    with load_trace(analysis.upstream) as up, load_trace(analysis.port) as port:
        figures = coverage(analysis.alignment, up, port)
    assert figures["port"]["params_aligned"] == figures["port"]["params_total"], figures
    # upstream: all but ``shared``, which holds the tied token table and never runs
    assert figures["upstream"]["params_aligned"] >= figures["upstream"]["params_total"] - 1, figures


def test_token_embedding_is_paired_across_names(analysis) -> None:
    """The module that embeds the tokens is ``encoder.embed_tokens`` upstream, ``shared`` in the port."""
    pairs, compared = _pairs(analysis), _compared(analysis)
    assert pairs.get("encoder.embed_tokens") == "shared", pairs
    assert compared["shared"] == ["input[0]", "out"]


def test_fused_qkv_is_one_group_with_three_upstream_modules(analysis) -> None:
    groups = {group.port: group.upstream for group in analysis.alignment.groups}
    for n in BLOCKS:
        assert groups[(f"{ATTN.format(n)}.qkv_proj",)] == tuple(f"{ATTN.format(n)}.{p}" for p in "qkv")


def test_attention_core_and_dropouts_have_no_counterpart(analysis) -> None:
    unmatched_up, unmatched_port = analysis.alignment.unmatched_upstream, analysis.alignment.unmatched_port
    for n in BLOCKS:
        assert f"{ATTN.format(n)}.attn" in unmatched_port  # transformers runs it as a function
        for dropout in ("layer.0.dropout", "layer.1.dropout", "layer.1.DenseReluDense.dropout"):
            assert f"encoder.block.{n}.{dropout}" in unmatched_up
    assert "encoder.dropout" in unmatched_up  # runs twice (after the embedding and the final norm)


def test_every_layer_has_its_own_relative_position_bias(analysis) -> None:
    """UMT5 (unlike T5) gives every layer a bias table; ids and looked-up biases are compared."""
    pairs, compared = _pairs(analysis), _compared(analysis)
    for n in BLOCKS:
        table = f"{ATTN.format(n)}.relative_attention_bias"
        assert pairs[table] == table
        assert compared[table] == ["input[0]", "out"]
        assert pairs[ATTN.format(n)] == ATTN.format(n)
        assert pairs[f"{ATTN.format(n)}.o"] == f"{ATTN.format(n)}.o"


def test_gated_feed_forward_pairs_by_role(analysis) -> None:
    pairs, compared = _pairs(analysis), _compared(analysis)
    for n in BLOCKS:
        for child in ("wi_0", "wi_1", "wo", "act"):
            assert pairs[f"{FF.format(n)}.{child}"] == f"{FF.format(n)}.{child}"
        # (output, bias) tuples of the parallel linears against transformers' tensors
        assert compared[f"{FF.format(n)}.wi_0"] == ["input[0]", "out[0]"]
        assert compared[f"{FF.format(n)}.act"] == ["input[0]", "out"]


def test_model_output_is_compared(analysis) -> None:
    compared = _compared(analysis)
    # BaseEncoderOutput (last_hidden_state, attention_mask) against BaseModelOutput (last_hidden_state)
    assert "out.last_hidden_state" in compared[""]
    assert compared["encoder.final_layer_norm"] == ["input[0]", "out"]
