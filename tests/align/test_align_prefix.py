"""Parameter maps written for a wrapper or for its child: the prefix offset the aligner detects.

A port's ``param_names_mapping`` is written for one module, while the module
traced may be a wrapper around it (``model.blocks.0...``) or the child inside
the wrapper the table is written for. The models are the pair of
``tests/align/test_align.py`` (separate q/k/v upstream, fused ``qkv`` port), traced
for real, with one side or both wrapped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.align.test_align import FUSED, PARAM_MAP, TRUTH, make_pair, trace_both
from tests.commands.test_cli_align import run_cli
from tracediff.align.aligner import align
from tracediff.align.alignment import Alignment
from tracediff.errors import AlignmentError

#: Upstream modules owning parameters that the table links one-to-one (q/k/v are merged into groups).
LINKED = ["embed", "head", *(f"blocks.{i}.{m}" for i in range(2) for m in ("norm", "o", "mlp.0", "mlp.2"))]


class Wrapper(nn.Module):
    """A pipeline-style wrapper: the real model is its child, plus a parameter of its own."""

    def __init__(self, inner: nn.Module, child: str) -> None:
        super().__init__()
        self.add_module(child, inner)
        self.child = child
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.child)(x) * self.gain


def wrapped(model: nn.Module, child: str | None) -> nn.Module:
    return model if child is None else Wrapper(model, child).eval()


def with_prefix(table: dict[str, Any], *, keys: str = "", values: str = "") -> dict[str, Any]:
    """The table as written for a wrapper: ``keys`` before the upstream names, ``values`` before the port's."""
    out: dict[str, Any] = {}
    for pattern, value in table.items():
        assert pattern.startswith("^")
        key = "^" + re.escape(keys) + pattern[1:]
        out[key] = values + value if isinstance(value, str) else (values + value[0], *value[1:])
    return out


def traced_pair(tmp_path: Path, up_child: str | None, port_child: str | None):
    up, port = make_pair()
    return trace_both(wrapped(up, up_child), wrapped(port, port_child), tmp_path)


def param_map_pairs(alignment: Alignment) -> dict[str, str]:
    return {p.upstream: p.port for p in alignment.pairs if p.source == "param_map"}


def param_map_groups(alignment: Alignment) -> set[tuple[tuple[str, ...], tuple[str, ...]]]:
    return {(g.upstream, g.port) for g in alignment.groups if g.source == "param_map"}


def assert_param_map_pairs(alignment: Alignment, up_prefix: str, port_prefix: str) -> None:
    """Every linked owner paired by the table, and every pair the table made right.

    Containers paired through their children (``blocks.0``, the wrapped models) may
    come on top; they are checked against the truth, not required.
    """
    found = param_map_pairs(alignment)
    assert {up_prefix + u: port_prefix + TRUTH[u] for u in LINKED}.items() <= found.items()
    truth = {up_prefix + u: port_prefix + p for u, p in TRUTH.items() if u}
    if up_prefix and port_prefix:
        truth[up_prefix[:-1]] = port_prefix[:-1]
    assert {u: p for u, p in found.items() if truth.get(u) != p} == {}


def offset_notes(alignment: Alignment) -> list[str]:
    return [note for note in alignment.notes if "off by a prefix" in note]


@pytest.mark.parametrize(
    ("up_child", "port_child", "keys", "values", "said"),
    [
        # (a) the port's traced module is the wrapper; the table is for the bare model.
        (None, "model", "", "", "port modules are traced as 'model.<name>' where the table says '<name>'"),
        # (b) the upstream's traced module is the wrapper; the table is for the bare model.
        (
            "transformer", None, "", "",
            "upstream modules are traced as 'transformer.<name>' where the table says '<name>'",
        ),
        # The table is written for the wrappers; the traced modules are the bare children.
        (None, None, "", "model.", "port modules are traced as '<name>' where the table says 'model.<name>'"),
        (
            None, None, "transformer.", "",
            "upstream modules are traced as '<name>' where the table says 'transformer.<name>'",
        ),
        # Both traced inside wrappers, the table bare: an offset on each side.
        (
            "transformer", "model", "", "",
            "upstream modules are traced as 'transformer.<name>' where the table says '<name>' and "
            "port modules are traced as 'model.<name>' where the table says '<name>'",
        ),
    ],
)
def test_offset_is_found_applied_and_said(
    tmp_path: Path, up_child: str | None, port_child: str | None, keys: str, values: str, said: str
) -> None:
    up_prefix = f"{up_child}." if up_child else ""
    port_prefix = f"{port_child}." if port_child else ""
    upstream, port = traced_pair(tmp_path, up_child, port_child)
    with upstream, port:
        alignment = align(upstream, port, param_map=with_prefix(PARAM_MAP, keys=keys, values=values))
    assert_param_map_pairs(alignment, up_prefix, port_prefix)
    assert param_map_groups(alignment) == {
        (tuple(up_prefix + u for u in ups), tuple(port_prefix + p for p in ports)) for ups, ports in FUSED
    }
    group = next(g for g in alignment.groups if g.upstream[0] == up_prefix + "blocks.0.q")
    assert group.note.startswith(
        f"{port_prefix}layers.0.attention.qkv.bias = cat({up_prefix}blocks.0.q.bias, {up_prefix}blocks.0.k.bias"
    )
    linked, total = 32, 33 if up_child else 32  # 2 embed + 2 head + 2 x 14 in blocks; + the wrapper's gain
    assert offset_notes(alignment) == [
        f"param map: its names are off by a prefix: {said}; applied the offset "
        f"({linked} of {total} upstream parameters linked, 0 without it)"
    ]


def test_table_that_fits_applies_no_offset(tmp_path: Path) -> None:
    """(c) Wrapped on both sides and the table written for the wrappers' names: nothing to correct."""
    upstream, port = traced_pair(tmp_path, "model", "model")
    with upstream, port:
        alignment = align(upstream, port, param_map=with_prefix(PARAM_MAP, keys="model.", values="model."))
    assert_param_map_pairs(alignment, "model.", "model.")
    assert alignment.notes == []


def test_bare_table_on_bare_traces_applies_no_offset(tmp_path: Path) -> None:
    upstream, port = traced_pair(tmp_path, None, None)
    with upstream, port:
        alignment = align(upstream, port, param_map=PARAM_MAP)
    assert_param_map_pairs(alignment, "", "")
    assert alignment.notes == []


def test_table_of_another_model_is_only_notes_as_before(tmp_path: Path) -> None:
    """(d) Rules that match nothing under any offset: notes about the rules, no offset, no pairs."""
    other = {r"^encoder\.layers\.(\d+)\.(.*)$": r"encoder.blocks.\1.\2", r"^vae\.(.*)$": r"vae.\1"}
    upstream, port = traced_pair(tmp_path, None, "model")
    with upstream, port:
        alignment = align(upstream, port, param_map=other)
    assert param_map_pairs(alignment) == {} and param_map_groups(alignment) == set()
    assert alignment.notes == [
        f"param map: rule '{pattern}' matched no upstream parameter in this model" for pattern in other
    ]


def test_table_whose_names_no_offset_explains_is_the_same_error_as_before(tmp_path: Path) -> None:
    """(d) Targets that exist under no prefix (``stages`` for ``layers``): today's error, word for word.

    Only ``proj_in``/``proj_out`` would resolve under the ``model.`` offset: 4 of 32 parameters,
    too few to call it an offset.
    """
    renamed = {
        k: (v.replace("layers.", "stages.") if isinstance(v, str) else (v[0].replace("layers.", "stages."), *v[1:]))
        for k, v in PARAM_MAP.items()
    }
    upstream, port = traced_pair(tmp_path, None, "model")
    with upstream, port, pytest.raises(
        AlignmentError,
        match=re.escape(
            r"param map: rule '^embed\.(.*)$' maps upstream parameter 'embed.weight' to 'proj_in.weight', "
            "which is not a parameter of the port"
        ),
    ):
        align(upstream, port, param_map=renamed)


def test_error_under_an_offset_names_the_traced_name(tmp_path: Path) -> None:
    """One wrong rule among many that fit under the offset: the error says what the name was looked up as."""
    bad = {**PARAM_MAP, r"^head\.(.*)$": r"final.\1"}
    upstream, port = traced_pair(tmp_path, None, "model")
    with upstream, port, pytest.raises(
        AlignmentError,
        match=re.escape(
            r"rule '^head\.(.*)$' maps upstream parameter 'head.weight' to 'final.weight' "
            "(traced as 'model.final.weight'), which is not a parameter of the port"
        ),
    ):
        align(upstream, port, param_map=bad)


def test_cli_align_prints_the_offset(tmp_path: Path) -> None:
    upstream, port = traced_pair(tmp_path, None, "model")
    upstream.close()
    port.close()
    table = tmp_path / "map.json"
    table.write_text(json.dumps(PARAM_MAP))
    result = run_cli(tmp_path / "ref.h5", tmp_path / "port.h5", "--param-map", table, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["notes"] == [
        f"{table}: its names are off by a prefix: port modules are traced as 'model.<name>' where the "
        "table says '<name>'; applied the offset (32 of 32 upstream parameters linked, 0 without it)"
    ]
    assert {"upstream": "head", "port": "model.proj_out", "source": "param_map"}.items() <= next(
        p for p in data["pairs"] if p["upstream"] == "head"
    ).items()
