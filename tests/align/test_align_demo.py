"""Alignment of the bundled demo pair: two independently written DiTs, real HDF5 traces.

The ground truth below was written by hand from reading
``tracediff/demo/upstream_dit.py`` and ``tracediff/demo/port_dit.py`` side by
side (which module computes what), not derived from the conversion map, so the
parameter-map run is checked against something independent too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tracediff import TraceConfig, attach, open_trace
from tracediff.align.aligner import align, align_models, coverage
from tracediff.align.alignment import Alignment
from tracediff.demo import (
    BUGS,
    PARAM_NAMES_MAPPING,
    DemoConfig,
    convert_state_dict,
    make_inputs,
    make_port,
    make_upstream,
)
from tracediff.demo.port_dit import VideoDiTTransformer
from tracediff.demo.upstream_dit import WanLikeModel

DEPTH = DemoConfig().depth

_TOP = {
    "": "",
    "patch_embedding": "patch_embed.proj",
    "time_embedding": "condition_embedder.time_embedder",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.1": "condition_embedder.time_embedder.act",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection": "condition_embedder.time_modulation",
    "time_projection.0": "condition_embedder.time_modulation.act",
    "time_projection.1": "condition_embedder.time_modulation.linear",
    "text_embedding": "condition_embedder.text_embedder",
    "text_embedding.0": "condition_embedder.text_embedder.fc_in",
    "text_embedding.1": "condition_embedder.text_embedder.act",
    "text_embedding.2": "condition_embedder.text_embedder.fc_out",
    "blocks": "transformer_blocks",
    "head.norm": "final_norm",
    "head.head": "proj_out",
}
_BLOCK = {
    "": "",  # the block owns its modulation table (port: scale_shift_table)
    ".norm1": ".norm_attn",
    ".self_attn": ".attn1",
    ".self_attn.norm_q": ".attn1.norm_q",
    ".self_attn.norm_k": ".attn1.norm_k",
    ".self_attn.o": ".attn1.to_out",
    ".norm3": ".norm_cross",
    ".cross_attn": ".attn2",
    ".cross_attn.q": ".attn2.to_q",
    ".cross_attn.k": ".attn2.to_k",
    ".cross_attn.v": ".attn2.to_v",
    ".cross_attn.o": ".attn2.to_out",
    ".cross_attn.norm_q": ".attn2.norm_q",
    ".cross_attn.norm_k": ".attn2.norm_k",
    ".norm2": ".norm_ffn",
    ".ffn": ".ffn",
    ".ffn.0": ".ffn.fc_in",
    ".ffn.1": ".ffn.act",
    ".ffn.2": ".ffn.fc_out",
}


def truth(depth: int = DEPTH) -> tuple[dict[str, str], set[tuple[tuple[str, ...], tuple[str, ...]]]]:
    """Hand-written ground truth: one-to-one pairs and many-to-one groups."""
    pairs = dict(_TOP)
    for i in range(depth):
        pairs.update({f"blocks.{i}{u}": f"transformer_blocks.{i}{p}" for u, p in _BLOCK.items()})
    groups = {
        (tuple(f"blocks.{i}.self_attn.{x}" for x in "qkv"), (f"transformer_blocks.{i}.attn1.to_qkv",))
        for i in range(depth)
    }
    groups.add((("head",), ("",)))  # the head's modulation table lives in the port's root
    return pairs, groups


def param_owners(trace) -> list[str]:
    names = trace.modules.names
    return sorted({names[e.module_index] for e in trace.modules.params if e.kind == "parameter"})


def score(alignment: Alignment, upstream) -> float:
    """Share of parameter-owning upstream modules paired (or grouped) exactly as the truth says."""
    pairs, groups = truth()
    got_pairs = {p.upstream: p.port for p in alignment.pairs}
    got_groups = {(g.upstream, g.port) for g in alignment.groups}
    correct = 0
    owners = param_owners(upstream)
    for name in owners:
        if name in pairs:
            correct += got_pairs.get(name) == pairs[name]
        else:
            correct += any(name in ups and (ups, ports) in got_groups for ups, ports in groups)
    return correct / len(owners)


def assert_no_wrong_answer(alignment: Alignment) -> None:
    pairs, groups = truth()
    wrong = [(p.upstream, p.port) for p in alignment.pairs if pairs.get(p.upstream) != p.port]
    assert wrong == []
    assert {(g.upstream, g.port) for g in alignment.groups} <= groups


def record(model: torch.nn.Module, path: Path, side: str, inputs: dict[str, torch.Tensor]) -> Path:
    with attach(model, side=side, config=TraceConfig(stats="abs_mean,shape"), output=path), torch.no_grad():
        model(**inputs)
    return path


@pytest.fixture(scope="module")
def demo_traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("demo")
    inputs = make_inputs(0)
    return (
        record(make_upstream(0), folder / "ref.h5", "ref", inputs),
        record(make_port(0), folder / "port.h5", "port", inputs),
    )


def test_no_mapping_pairs_at_least_95_percent_of_parameter_owners_and_nothing_wrong(demo_traces) -> None:
    with open_trace(demo_traces[0]) as upstream, open_trace(demo_traces[1]) as port:
        alignment = align(upstream, port)
        assert len(param_owners(upstream)) == 8 + 16 * DEPTH
        assert score(alignment, upstream) >= 0.95
        assert score(alignment, upstream) == 1.0  # measured today; the bar above is the contract
        figures = coverage(alignment, upstream, port)
    assert_no_wrong_answer(alignment)
    assert alignment.unmatched_upstream == []
    assert alignment.unmatched_port == ["patch_embed", "condition_embedder"]  # port-only wrappers
    assert figures["upstream"]["params_aligned"] == figures["upstream"]["params_total"] == 72
    structure = [p for p in alignment.pairs if p.source == "structure"]
    assert {p.upstream for p in structure} >= {"blocks.2.ffn.1", "blocks.1.norm2", "head.norm"}
    assert all(p.confidence <= 0.6 for p in structure)


def test_param_map_pairs_every_parameter_owner(demo_traces) -> None:
    with open_trace(demo_traces[0]) as upstream, open_trace(demo_traces[1]) as port:
        alignment = align(upstream, port, param_map=PARAM_NAMES_MAPPING)
        assert score(alignment, upstream) == 1.0
        owners = set(param_owners(upstream))
    assert_no_wrong_answer(alignment)
    assert {p.source for p in alignment.pairs if p.upstream in owners} == {"param_map"}
    assert {g.source for g in alignment.groups} == {"param_map"}
    assert alignment.notes == []


def test_bfloat16_port_trace_aligns_the_same(demo_traces, tmp_path: Path) -> None:
    inputs = make_inputs(0)
    inputs = {"x": inputs["x"].bfloat16(), "t": inputs["t"], "context": inputs["context"].bfloat16()}
    path = record(make_port(0).to(torch.bfloat16), tmp_path / "port_bf16.h5", "port", inputs)
    with open_trace(demo_traces[0]) as upstream, open_trace(path) as port:
        alignment = align(upstream, port)
        assert score(alignment, upstream) == 1.0
    assert_no_wrong_answer(alignment)
    assert any("float32->bfloat16" in p.note for p in alignment.pairs)


def test_default_initialised_weights_are_split_by_order_not_guessed(tmp_path: Path) -> None:
    """Without the demo's randomisation every RMSNorm holds ones: 16 identical q/k norms."""
    cfg = DemoConfig()
    torch.manual_seed(0)
    from tracediff.demo.models import _port_kwargs, _upstream_kwargs

    up = WanLikeModel(**_upstream_kwargs(cfg)).eval()
    port = VideoDiTTransformer(**_port_kwargs(cfg)).eval()
    port.load_state_dict(convert_state_dict(up.state_dict()))
    inputs = make_inputs(0)
    with (
        open_trace(record(up, tmp_path / "ref.h5", "ref", inputs)) as upstream,
        open_trace(record(port, tmp_path / "port.h5", "port", inputs)) as ported,
    ):
        alignment = align(upstream, ported)
        assert score(alignment, upstream) >= 0.95
    assert_no_wrong_answer(alignment)
    tied = [p for p in alignment.pairs if "hold these weights" in p.note]
    assert len(tied) >= 4 * DEPTH and all(p.confidence <= 0.7 for p in tied)

    models = align_models(up, port)  # same pair without traces: definition order inside parents
    assert_no_wrong_answer(models)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_each_planted_bug_site_is_a_pair(demo_traces, tmp_path: Path, bug: str) -> None:
    path = record(make_port(0, bug=bug), tmp_path / "port.h5", "port", make_inputs(0))
    with open_trace(demo_traces[0]) as upstream, open_trace(path) as port:
        alignment = align(upstream, port)
    assert alignment.port_for(BUGS[bug].upstream_module) == BUGS[bug].port_module
    assert_no_wrong_answer(alignment)


def test_live_models_align_like_their_traces(demo_traces) -> None:
    alignment = align_models(make_upstream(0), make_port(0))
    with open_trace(demo_traces[0]) as upstream, open_trace(demo_traces[1]) as port:
        from_traces = align(upstream, port)
        assert score(alignment, upstream) == 1.0
    assert_no_wrong_answer(alignment)
    assert {(p.upstream, p.port) for p in alignment.pairs} == {(p.upstream, p.port) for p in from_traces.pairs}
