"""Unit tests of the aligner: each source on its own, conflicts, and error messages.

The models here are a small second "architecture written twice": an upstream
with separate q/k/v and an ``nn.Sequential`` MLP, and a port with a fused
``qkv``, flat MLP layers, other names and another declaration order. Weights
are copied across by :func:`convert`, as a port's loader would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from tracediff import TraceConfig, attach, open_trace
from tracediff.align.aligner import (
    MappingSpec,
    align,
    align_models,
    alignment_to_dict,
    coverage,
    dump_mapping,
    load_mapping,
    load_param_map,
    parse_mapping,
    write_mapping,
)
from tracediff.align.alignment import Alignment
from tracediff.align.order import monotone_anchors, pair_by_order
from tracediff.errors import AlignmentError

DIM = 16


class UpBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # default init: every block's norm holds the same weights
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        attn = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), dim=-1) @ self.v(h)
        x = x + self.o(attn)
        return x + self.mlp(x)


class Upstream(nn.Module):
    def __init__(self, dim: int = DIM, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(UpBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class PortAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, dim)  # declared before qkv on purpose
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


class PortLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(2 * dim, dim)
        self.attention = PortAttention(dim)
        self.pre_norm = nn.LayerNorm(dim)
        self.unused = nn.Dropout(0.0)  # never called: must stay unmatched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.pre_norm(x))
        return x + self.fc_out(self.act(self.fc_in(x)))


class Port(nn.Module):
    def __init__(self, dim: int = DIM, depth: int = 2) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, dim)
        self.layers = nn.ModuleList(PortLayer(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for layer in self.layers:
            x = layer(x)
        return self.proj_out(x)


#: Upstream -> port, written by hand from the two classes above.
TRUTH = {
    "": "",
    "embed": "proj_in",
    "head": "proj_out",
    "blocks": "layers",
    **{
        f"blocks.{i}{up}": f"layers.{i}{port}"
        for i in range(2)
        for up, port in [
            ("", ""),
            (".norm", ".pre_norm"),
            (".o", ".attention.out"),
            (".mlp", ""),  # placeholder, removed below: the port has no MLP container
            (".mlp.0", ".fc_in"),
            (".mlp.1", ".act"),
            (".mlp.2", ".fc_out"),
        ]
    },
}
for _i in range(2):
    del TRUTH[f"blocks.{_i}.mlp"]
FUSED = [((f"blocks.{i}.q", f"blocks.{i}.k", f"blocks.{i}.v"), (f"layers.{i}.attention.qkv",)) for i in range(2)]

#: Parameter-name map of this pair in FastVideo's form (merge tuples for q/k/v).
PARAM_MAP = {
    r"^embed\.(.*)$": r"proj_in.\1",
    r"^head\.(.*)$": r"proj_out.\1",
    r"^blocks\.(\d+)\.norm\.(.*)$": r"layers.\1.pre_norm.\2",
    r"^blocks\.(\d+)\.q\.(.*)$": (r"layers.\1.attention.qkv.\2", 0, 3),
    r"^blocks\.(\d+)\.k\.(.*)$": (r"layers.\1.attention.qkv.\2", 1, 3),
    r"^blocks\.(\d+)\.v\.(.*)$": (r"layers.\1.attention.qkv.\2", 2, 3),
    r"^blocks\.(\d+)\.o\.(.*)$": r"layers.\1.attention.out.\2",
    r"^blocks\.(\d+)\.mlp\.0\.(.*)$": r"layers.\1.fc_in.\2",
    r"^blocks\.(\d+)\.mlp\.2\.(.*)$": r"layers.\1.fc_out.\2",
}


def make_pair(seed: int = 0, *, order: tuple[str, ...] = ("q", "k", "v")) -> tuple[Upstream, Port]:
    """Upstream with seeded weights and a port loaded from it (q/k/v stacked in ``order``)."""
    torch.manual_seed(seed)
    up = Upstream().eval()
    port = Port().eval()
    with torch.no_grad():
        port.proj_in.load_state_dict(up.embed.state_dict())
        port.proj_out.load_state_dict(up.head.state_dict())
        for block, layer in zip(up.blocks, port.layers, strict=True):
            layer.pre_norm.load_state_dict(block.norm.state_dict())
            layer.attention.out.load_state_dict(block.o.state_dict())
            layer.fc_in.load_state_dict(block.mlp[0].state_dict())
            layer.fc_out.load_state_dict(block.mlp[2].state_dict())
            parts = [getattr(block, name) for name in order]
            layer.attention.qkv.weight.copy_(torch.cat([p.weight for p in parts]))
            layer.attention.qkv.bias.copy_(torch.cat([p.bias for p in parts]))
    return up, port


def trace_both(up: nn.Module, port: nn.Module, tmp_path: Path, x: torch.Tensor | None = None):
    x = torch.randn(2, 5, 4) if x is None else x
    paths = []
    for model, side in ((up, "ref"), (port, "port")):
        path = tmp_path / f"{side}.h5"
        with attach(model, side=side, config=TraceConfig(stats="abs_mean,shape"), output=path), torch.no_grad():
            model(x.to(next(model.parameters()).dtype))
        paths.append(path)
    return open_trace(paths[0]), open_trace(paths[1])


def pairs_of(alignment: Alignment) -> dict[str, str]:
    return {pair.upstream: pair.port for pair in alignment.pairs}


def group_set(alignment: Alignment) -> set[tuple[tuple[str, ...], tuple[str, ...]]]:
    return {(g.upstream, g.port) for g in alignment.groups}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory):
    """One traced pair shared by the module's tests (the traces are only read)."""
    up, port = make_pair()
    upstream, ported = trace_both(up, port, tmp_path_factory.mktemp("traced"))
    yield upstream, ported
    upstream.close()
    ported.close()


# -- fingerprints and structure, no mapping -------------------------------------------


def test_no_mapping_pairs_every_module_correctly_from_traces(traced) -> None:
    upstream, port = traced
    alignment = align(upstream, port)
    assert pairs_of(alignment) == TRUTH
    assert group_set(alignment) == set(FUSED)
    assert {g.source for g in alignment.groups} == {"fingerprint"}
    assert sorted(alignment.unmatched_upstream) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert sorted(alignment.unmatched_port) == [
        "layers.0.attention",
        "layers.0.unused",
        "layers.1.attention",
        "layers.1.unused",
    ]
    by_upstream = {pair.upstream: pair for pair in alignment.pairs}
    assert by_upstream["embed"].source == "fingerprint" and by_upstream["embed"].confidence == 0.9
    # Parameter-free modules come from order and shapes, never above 0.6.
    assert by_upstream["blocks.0.mlp.1"].source == "structure"
    assert by_upstream["blocks.0.mlp.1"].confidence <= 0.6
    # Identical default-initialised norms are told apart by execution order only.
    assert by_upstream["blocks.1.norm"].source == "fingerprint"
    assert by_upstream["blocks.1.norm"].confidence == 0.7
    assert "2 upstream modules hold these weights" in by_upstream["blocks.1.norm"].note


def test_fused_group_reports_concatenation_order_read_from_samples(tmp_path: Path) -> None:
    up, port = make_pair(order=("k", "v", "q"))
    alignment = align_models(up, port)
    assert group_set(alignment) == {
        ((f"blocks.{i}.k", f"blocks.{i}.v", f"blocks.{i}.q"), (f"layers.{i}.attention.qkv",)) for i in range(2)
    }
    assert "= cat(blocks.0.k, blocks.0.v, blocks.0.q) along dim 0" in alignment.groups[0].note


def test_fused_module_on_the_upstream_side_is_grouped_the_other_way() -> None:
    up, port = make_pair()
    # Swap the roles: the model with the fused qkv is now the reference.
    alignment = align_models(port, up)
    assert {(g.upstream, g.port) for g in alignment.groups} == {(p, u) for u, p in FUSED}


def test_models_without_traces_use_definition_order_within_aligned_parents() -> None:
    up, port = make_pair()
    alignment = align_models(up, port)
    # The port never calls ``unused``, but without traces nothing says so: a
    # Dropout has no look-alike upstream, so it still stays unmatched.
    assert pairs_of(alignment) == TRUTH
    assert "layers.0.unused" in alignment.unmatched_port
    assert all(p.confidence <= 0.6 for p in alignment.pairs if p.source == "structure")


def test_fingerprints_tolerate_bfloat16_port_but_not_changed_values() -> None:
    up, port = make_pair()
    alignment = align_models(up, port.to(torch.bfloat16))
    assert pairs_of(alignment) == TRUTH
    embed = next(p for p in alignment.pairs if p.upstream == "embed")
    assert embed.confidence == 0.85 and "float32->bfloat16" in embed.note

    up, port = make_pair()
    with torch.no_grad():
        port.proj_in.weight.mul_(1.05)  # a conversion bug: no longer the same weights
    alignment = align_models(up, port)
    embed = next(p for p in alignment.pairs if p.upstream == "embed")
    assert embed.source == "structure" and embed.confidence < 0.5
    assert "weights differ" in embed.note


def test_transposed_weights_are_recognised() -> None:
    class Conv1D(nn.Module):
        """GPT-2 style: weight stored (in, out)."""

        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.weight = nn.Parameter(linear.weight.detach().t().clone())
            self.bias = nn.Parameter(linear.bias.detach().clone())

    torch.manual_seed(1)
    up = nn.ModuleDict({"fc": nn.Linear(6, 10), "other": nn.Linear(10, 6)})
    port = nn.ModuleDict({"c_other": Conv1D(up["other"]), "c_fc": Conv1D(up["fc"])})
    alignment = align_models(up, port)
    assert pairs_of(alignment) == {"": "", "fc": "c_fc", "other": "c_other"}
    assert all("transposed" in p.note for p in alignment.pairs if p.upstream)


def test_identical_weights_that_order_cannot_separate_stay_unmatched(tmp_path: Path) -> None:
    class Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.load_state_dict(self.a.state_dict())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    class Single(nn.Module):
        def __init__(self, src: nn.Linear) -> None:
            super().__init__()
            self.c = nn.Linear(4, 4)
            self.c.load_state_dict(src.state_dict())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.c(x))

    torch.manual_seed(2)
    up = Twins()
    port = Single(up.a)
    upstream, ported = trace_both(up, port, tmp_path, torch.randn(3, 4))
    with upstream, ported:
        alignment = align(upstream, ported)
    assert pairs_of(alignment) == {"": ""}
    assert alignment.unmatched_upstream == ["a", "b"] and alignment.unmatched_port == ["c"]


def test_coverage_and_json_figures(traced) -> None:
    upstream, port = traced
    alignment = align(upstream, port)
    figures = coverage(alignment, upstream, port)
    assert figures["upstream"] == {"aligned": 22, "total": 24, "ignored": 0, "params_aligned": 16, "params_total": 16}
    assert figures["port"] == {"aligned": 18, "total": 22, "ignored": 0, "params_aligned": 12, "params_total": 12}
    data = json.loads(json.dumps(alignment_to_dict(alignment, figures)))
    assert set(data) >= {"pairs", "groups", "unmatched_upstream", "unmatched_port", "coverage"}
    assert {"upstream": "embed", "port": "proj_in", "source": "fingerprint", "confidence": 0.9, "note": ""} in data[
        "pairs"
    ]


# -- parameter-name map ----------------------------------------------------------------


def test_param_map_pairs_modules_and_groups_merges(traced) -> None:
    upstream, port = traced
    alignment = align(upstream, port, param_map=PARAM_MAP)
    by_upstream = {pair.upstream: pair for pair in alignment.pairs}
    for name in ("embed", "head", "blocks.0.norm", "blocks.1.norm", "blocks.1.o", "blocks.0.mlp.2"):
        assert by_upstream[name].source == "param_map" and by_upstream[name].confidence == 0.95
        assert by_upstream[name].port == TRUTH[name]
    assert group_set(alignment) == set(FUSED)
    assert {g.source for g in alignment.groups} == {"param_map"}
    assert "layers.0.attention.qkv.weight = cat(blocks.0.q.weight, blocks.0.k.weight, blocks.0.v.weight)" in (
        alignment.groups[0].note
    )
    assert pairs_of(alignment) == TRUTH  # the rest still comes from structure


def test_param_map_rule_that_matches_nothing_is_only_a_note(traced) -> None:
    upstream, port = traced
    alignment = align(upstream, port, param_map={**PARAM_MAP, r"^rope\.(.*)$": r"rotary.\1"})
    assert alignment.notes == [r"param map: rule '^rope\.(.*)$' matched no upstream parameter in this model"]


def test_param_map_target_missing_in_port_is_an_error(traced) -> None:
    upstream, port = traced
    bad = {**PARAM_MAP, r"^head\.(.*)$": r"final.\1"}
    with pytest.raises(
        AlignmentError,
        match=re.escape(
            r"rule '^head\.(.*)$' maps upstream parameter 'head.weight' to 'final.weight', "
            "which is not a parameter of the port"
        ),
    ):
        align(upstream, port, param_map=bad)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (("proj_in.\\1", 3, 3), "0 <= merge_index < num_merges"),
        (42, "must be a template string"),
    ],
)
def test_param_map_bad_value_names_the_rule(value: object, message: str) -> None:
    up, port = make_pair()
    with pytest.raises(AlignmentError, match=re.escape(r"rule '^embed\.(.*)$' = ") + ".*" + re.escape(message)):
        align_models(up, port, param_map={r"^embed\.(.*)$": value})


def test_load_param_map_from_json_toml_python_and_module(tmp_path: Path) -> None:
    from tracediff.demo.convert import PARAM_NAMES_MAPPING

    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"param_names_mapping": PARAM_NAMES_MAPPING}))
    as_toml = tmp_path / "map.toml"
    as_toml.write_text(
        "\n".join(
            f"'{k}' = " + (f"'{v}'" if isinstance(v, str) else f"['{v[0]}', {v[1]}, {v[2]}]")
            for k, v in PARAM_NAMES_MAPPING.items()
        )
    )
    as_py = tmp_path / "conv.py"
    as_py.write_text(
        "from dataclasses import dataclass, field\n"
        f"MY_MAP = {PARAM_NAMES_MAPPING!r}\n"
        "@dataclass\n"
        "class ArchConfig:  # FastVideo keeps the map in a dataclass field\n"
        "    param_names_mapping: dict = field(default_factory=lambda: dict(MY_MAP))\n"
    )
    refs = (as_json, as_toml, f"{as_py}:MY_MAP", f"{as_py}:ArchConfig.param_names_mapping")
    for ref in (*refs, "tracediff.demo.convert:PARAM_NAMES_MAPPING"):
        assert load_param_map(ref) == PARAM_NAMES_MAPPING, ref
    with pytest.raises(AlignmentError, match="'NOPE' not found"):
        load_param_map("tracediff.demo.convert:NOPE")
    with pytest.raises(AlignmentError, match="not a .json/.toml/.py file nor a 'package.module:ATTR'"):
        load_param_map("whatever")


# -- explicit mapping ----------------------------------------------------------------


def test_mapping_pairs_and_backreference_rules_beat_fingerprints(traced) -> None:
    upstream, port = traced
    spec = parse_mapping(
        {
            "pairs": {"head": "proj_out"},
            "rules": {r"blocks\.(\d+)\.o": r"layers.\1.attention.out", r"blocks\.(\d+)": r"layers.\1"},
        }
    )
    alignment = align(upstream, port, mapping=spec)
    by_upstream = {pair.upstream: pair for pair in alignment.pairs}
    assert by_upstream["head"].source == "map" and by_upstream["head"].confidence == 1.0
    assert by_upstream["blocks.1.o"].source == "map"
    assert by_upstream["blocks.1.o"].note == r"rule 'blocks\.(\d+)\.o' = 'layers.\1.attention.out'"
    # fullmatch: 'blocks\.(\d+)' pairs the blocks themselves, not their children.
    assert by_upstream["blocks.0"].source == "map"
    assert by_upstream["blocks.0.mlp.0"].source == "fingerprint"
    assert pairs_of(alignment) == TRUTH

    # An explicit (wrong on purpose) pair wins over the weights.
    alignment = align(upstream, port, mapping={"pairs": {"embed": "proj_out"}})
    assert pairs_of(alignment)["embed"] == "proj_out"
    assert "head" in alignment.unmatched_upstream and "proj_in" in alignment.unmatched_port


def test_ignore_lists_remove_modules_from_alignment_and_coverage(traced) -> None:
    upstream, port = traced
    alignment = align(
        upstream, port, mapping={"ignore": {"upstream": [r"blocks\.\d+\.mlp"], "port": [r"layers\.\d+\.unused"]}}
    )
    assert "blocks.0.mlp" not in alignment.unmatched_upstream
    assert not any("unused" in name for name in alignment.unmatched_port)
    assert pairs_of(alignment) == TRUTH
    figures = coverage(alignment, upstream, port)
    assert figures["upstream"]["ignored"] == 2 and figures["port"]["ignored"] == 2


def test_infer_false_keeps_only_what_the_map_lists(traced) -> None:
    upstream, port = traced
    spec = {
        "infer": False,
        "pairs": {"embed": "proj_in"},
        "groups": [{"upstream": ["blocks.0.q", "blocks.0.k"], "port": ["layers.0.attention.qkv"]}],
    }
    alignment = align(upstream, port, mapping=spec)
    assert pairs_of(alignment) == {"": "", "embed": "proj_in"}
    assert group_set(alignment) == {(("blocks.0.q", "blocks.0.k"), ("layers.0.attention.qkv",))}
    assert len(alignment.unmatched_upstream) == 24 - 4  # all but root, embed, q, k


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_written_mapping_reproduces_the_alignment(traced, tmp_path: Path, suffix: str) -> None:
    upstream, port = traced
    first = align(upstream, port, param_map=PARAM_MAP)
    path = write_mapping(first, tmp_path / f"written{suffix}")
    second = align(upstream, port, mapping=path)
    assert pairs_of(second) == pairs_of(first)
    assert group_set(second) == group_set(first)
    assert second.unmatched_upstream == first.unmatched_upstream
    assert second.unmatched_port == first.unmatched_port
    assert {p.source for p in second.pairs} == {"root", "map"}
    if suffix == ".toml":
        assert '"blocks.0.mlp.1" = "layers.0.act"  # structure 0.60' in path.read_text()


# -- errors ----------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_rule_matching_nothing_names_the_rule(traced, tmp_path: Path) -> None:
    upstream, port = traced
    path = write(tmp_path, "m.toml", "[rules]\n'blocks\\.(\\d+)\\.attn' = 'layers.\\1.attention'\n")
    with pytest.raises(AlignmentError) as info:
        align(upstream, port, mapping=path)
    assert (
        str(info.value)
        == f"{path}: " + r"rule 'blocks\.(\d+)\.attn' = 'layers.\1.attention' matches no upstream module"
    )


def test_rule_mapping_two_upstream_modules_onto_one_names_both(traced) -> None:
    upstream, port = traced
    with pytest.raises(AlignmentError) as info:
        align(upstream, port, mapping={"rules": {r"blocks\.(\d+)\.(q|k)": r"layers.\1.attention.qkv"}})
    message = str(info.value)
    assert "'blocks.0.k'" in message and "'blocks.0.q'" in message
    assert "layers.0.attention.qkv" in message and r"rule 'blocks\.(\d+)\.(q|k)'" in message
    assert "[[groups]]" in message


def test_pairs_mapping_two_upstream_modules_onto_one_names_both(traced) -> None:
    upstream, port = traced
    with pytest.raises(AlignmentError, match=r"\[pairs\] maps 'head' onto port module 'proj_in'.*'embed'"):
        align(upstream, port, mapping={"pairs": {"embed": "proj_in", "head": "proj_in"}})


def test_unknown_module_name_is_named_with_suggestions(traced) -> None:
    upstream, port = traced
    with pytest.raises(
        AlignmentError,
        match=r"names port module 'proj_ot', which the port model does not have; did you mean 'proj_out'",
    ):
        align(upstream, port, mapping={"pairs": {"head": "proj_ot"}})
    with pytest.raises(
        AlignmentError,
        match=re.escape(r"rule 'blocks\.(\d+)' = 'layer.\1' (from 'blocks.0') names port module 'layer.0'"),
    ):
        align(upstream, port, mapping={"rules": {r"blocks\.(\d+)": r"layer.\1"}})


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.toml", '[pairs]\n"a" = \n', r"bad.toml: not valid TOML: .*\(at line 2, column 7\)"),
        ("bad.json", '{"pairs": {"a": "b",}}', r"bad.json: not valid JSON: .* \(at line 1, column 21\)"),
        ("dup.json", '{"pairs": {"a": "b", "a": "c"}}', r"dup.json: not valid JSON: key 'a' appears twice"),
        (
            "key.toml",
            "[pair]\n",
            r"key.toml: unknown key 'pair'; valid keys: version, infer, pairs, rules, ignore, groups",
        ),
        ("ign.toml", "[ignore]\nupstrem = []\n", r"unknown key 'upstrem' in \[ignore\]; valid keys: upstream, port"),
        ("re.toml", "[rules]\n'blocks.(' = 'x'\n", r"re.toml: rule 'blocks.\(' = 'x' is not a valid regex"),
        ("ver.toml", "version = 2\n", r"version = 2 is not supported"),
        ("m.yaml", "pairs: {}\n", r"m.yaml: a mapping file must end in .toml or .json"),
    ],
)
def test_unusable_mapping_files_are_one_clear_error(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(AlignmentError, match=expected) as info:
        load_mapping(path)
    assert "\n" not in str(info.value)


def test_missing_mapping_file_and_bad_patterns(traced, tmp_path: Path) -> None:
    upstream, port = traced
    with pytest.raises(AlignmentError, match="no such mapping file"):
        load_mapping(tmp_path / "nope.toml")
    with pytest.raises(AlignmentError, match=re.escape(r"ignore.port pattern 'decoder\..*' matches no port module")):
        align(upstream, port, mapping={"ignore": {"port": [r"decoder\..*"]}})
    with pytest.raises(AlignmentError, match=r"cannot expand for 'embed'"):
        align(upstream, port, mapping={"rules": {"embed": r"\2"}})
    with pytest.raises(AlignmentError, match=r"the root '' always pairs with ''"):
        align(upstream, port, mapping={"pairs": {"": "proj_in"}})
    with pytest.raises(AlignmentError, match=r"\[\[groups\]\] #1 lists upstream module 'embed', which is paired"):
        align(
            upstream,
            port,
            mapping={"pairs": {"embed": "proj_in"}, "groups": [{"upstream": ["embed"], "port": ["layers.0.fc_in"]}]},
        )


def test_mapping_spec_round_trips_through_dump(traced) -> None:
    upstream, port = traced
    alignment = align(upstream, port)
    spec = parse_mapping(json.loads(dump_mapping(alignment, fmt="json")))
    assert isinstance(spec, MappingSpec) and spec.infer is False
    assert spec.pairs == {p.upstream: p.port for p in alignment.pairs if p.upstream}


# -- order helpers --------------------------------------------------------------------


def test_monotone_anchors_drop_the_fewest_crossing_pairs() -> None:
    assert monotone_anchors([(0, 0), (1, 5), (2, 1), (3, 2), (4, 3)]) == [(0, 0), (2, 1), (3, 2), (4, 3)]


def test_pair_by_order_refuses_ambiguous_classes() -> None:
    # Stretch between anchors (0,0) and (10,10): upstream has one GELU, port two.
    found = pair_by_order(
        {1: 1, 2: 2},
        {3: 3, 4: 4, 5: 5},
        [(0, 0), (10, 10)],
        {1: "gelu", 2: "norm"}.get,
        {3: "gelu", 4: "gelu", 5: "norm"}.get,
    )
    assert [(f.upstream, f.port) for f in found] == [(2, 5)]
