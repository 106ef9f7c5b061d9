"""Bisection building blocks on small real modules: metrics, leaf replacement, levels, layouts."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from tracediff.align.alignment import Alignment, Pair
from tracediff.bisect import BisectError, bisect_models, isolate_models
from tracediff.bisect.metrics import compare
from tracediff.bisect.ops import best_match
from tracediff.bisect.tree import frontier, replace_leaves, tensor_leaves, top_level
from tracediff.diff.elements import _segment_metrics
from tracediff.hooks.flatten import iter_tensors
from tracediff.tolerance import Tolerance, preset


@pytest.mark.parametrize("case", ["noise", "zeros", "nonfinite", "zero-tolerance"])
def test_local_error_metrics_are_the_differs_element_check(case: str) -> None:
    generator = torch.Generator().manual_seed(3)
    ref = torch.randn(6, 7, generator=generator, dtype=torch.float64)
    port = ref + 1e-4 * torch.randn(6, 7, generator=generator, dtype=torch.float64)
    tol = preset("single-block")
    if case == "zeros":
        ref, port = torch.zeros(5), torch.zeros(5)
    elif case == "nonfinite":
        ref[0, 0], port[0, 0] = float("nan"), float("nan")
        port[1, 1] = float("inf")
    elif case == "zero-tolerance":
        tol = Tolerance(atol=0.0, rtol=0.0)
    mine = compare(port, ref, tol)
    a, b = port.reshape(-1).numpy(), ref.reshape(-1).numpy()
    theirs = _segment_metrics(a, np.array([0]), b, np.array([0]), np.array([a.size]), np.array([tol.atol]),
                              np.array([tol.rtol]))
    for name, value in (("ratio", mine.ratio), ("rel_l2", mine.rel_l2), ("max_abs", mine.max_abs)):
        expected = float(theirs[name if name != "max_abs" else "max_abs"][0])
        assert value == pytest.approx(expected, rel=1e-9, nan_ok=True) or (np.isinf(value) and np.isinf(expected))


class Pairish(NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


@dataclass
class Output:
    sample: torch.Tensor
    extra: tuple[torch.Tensor, str]


def test_replace_leaves_keeps_structure_and_follows_the_recorders_labels() -> None:
    tensors = [torch.full((2,), float(i)) for i in range(5)]
    structure = {"a": Pairish(tensors[0], tensors[1]), "b": [Output(tensors[2], (tensors[3], "tag"))],
                 "c": OrderedDict(d=tensors[4]), "n": None}
    labels = [label for label, _ in iter_tensors(structure)]
    assert len(labels) == len(list(tensor_leaves(structure))) == 5
    replaced = replace_leaves(structure, iter([t + 10 for t in tensor_leaves(structure)]))
    assert isinstance(replaced["a"], Pairish) and isinstance(replaced["b"][0], Output)
    assert isinstance(replaced["c"], OrderedDict) and replaced["n"] is None
    assert replaced["b"][0].extra[1] == "tag"
    assert [float(t[0]) for t in tensor_leaves(replaced)] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert float(structure["a"].first[0]) == 0.0  # the original is untouched


def test_best_match_compares_up_to_a_permutation_of_dimensions() -> None:
    x = torch.randn(1, 4, 6, 5)
    tol = preset("fp32")
    assert best_match(x.transpose(1, 2).contiguous(), x, tol).ratio == 0.0
    assert best_match(x.permute(0, 3, 1, 2), x, tol).ratio == 0.0
    assert best_match(torch.view_as_complex(x.reshape(1, 4, 6, 5)[..., :4].reshape(1, 4, 6, 2, 2).contiguous()),
                      x[..., :4].reshape(1, 4, 6, 2, 2), tol).ratio == 0.0
    assert best_match(-x, x, tol).ratio > 1


# -- levels ----------------------------------------------------------------------------------


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.inner = nn.Module()
        self.inner.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 2)


def test_top_level_starts_at_the_largest_block_list_even_inside_an_aligned_wrapper() -> None:
    model = Wrapper()
    modules = dict(model.named_modules())
    aligned = {name: name for name in modules if name}
    assert top_level(modules, aligned) == ["embed", "inner.blocks.0", "inner.blocks.1", "inner.blocks.2", "head"]
    assert frontier(modules, aligned, "inner") == ["inner.blocks.0", "inner.blocks.1", "inner.blocks.2"]
    del aligned["inner.blocks.1"]
    assert frontier(modules, aligned, "") == ["embed", "inner", "head"]


# -- layouts: not isolatable, then adapted by a transform ---------------------------------------


class TokensFirst(nn.Module):
    """(B, S, D) blocks, as upstream writes them."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


class ChannelsFirstBlock(nn.Linear):
    """The port's block works on (B, D, S): same weights, transposed layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ChannelsFirst(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(ChannelsFirstBlock(dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).transpose(1, 2)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x.transpose(1, 2))


def _layout_pair(bug: bool) -> tuple[nn.Module, nn.Module, Alignment, torch.Tensor]:
    torch.manual_seed(0)
    upstream = TokensFirst().eval()
    port = ChannelsFirst().eval()
    port.load_state_dict(upstream.state_dict())
    if bug:
        with torch.no_grad():
            port.blocks[1].bias += 0.5
    names = [n for n, _ in upstream.named_modules() if n and n != "blocks"]
    alignment = Alignment(pairs=[Pair("", "", "root", 1.0)] + [Pair(n, n, "map", 1.0) for n in names])
    return upstream, port, alignment, torch.randn(2, 5, 4)


def test_a_module_with_another_layout_is_reported_not_isolatable_and_left_unforced() -> None:
    upstream, port, alignment, x = _layout_pair(bug=True)
    level = isolate_models(upstream, port, x, alignment=alignment, tolerance="fp32")
    by_name = {m.port: m for m in level.modules}
    for name in ("blocks.0", "blocks.1", "blocks.2"):
        assert not by_name[name].isolatable
        assert "upstream shape (2, 5, 8) vs port (2, 8, 5)" in by_name[name].reason
    assert by_name["embed"].isolatable and by_name["head"].isolatable
    # Unforced blocks pass their error on; the head, fed upstream's inputs, adds none of its own.
    assert level.culprit is None
    assert by_name["head"].input_drift is not None and by_name["head"].input_drift.failed
    result = bisect_models(upstream, port, x, alignment=alignment, tolerance="fp32")
    assert not result and result.output_drifts and result.culprit == ""
    # The operator level of the model's own forward compares the block outputs up to a transpose.
    assert result.operator is not None and result.operator.port_op is not None
    assert result.operator.port_op.name.startswith("blocks.1 ")
    assert any("not isolatable at depth 0: blocks.0" in note for note in result.notes)


def test_a_transform_adapts_the_layout_and_isolation_finds_the_block() -> None:
    upstream, port, alignment, x = _layout_pair(bug=True)
    transforms = {r"blocks\.\d+": lambda out: out.transpose(1, 2)}
    level = isolate_models(upstream, port, x, alignment=alignment, tolerance="fp32", transforms=transforms)
    assert all(m.isolatable for m in level.modules)
    assert level.culprit is not None and level.culprit.port == "blocks.1" and level.culprit.transformed
    by_name = {m.port: m for m in level.modules}
    assert by_name["blocks.2"].local is not None and not by_name["blocks.2"].local.failed
    assert by_name["blocks.2"].accumulated is not None and by_name["blocks.2"].accumulated.failed
    result = bisect_models(upstream, port, x, alignment=alignment, tolerance="fp32", transforms=transforms)
    assert result.culprit == "blocks.1" and not result
    clean = bisect_models(*_layout_pair(bug=False)[:2], x, alignment=alignment, tolerance="fp32",
                          transforms=transforms)
    assert clean and clean.culprit is None and clean.forward_passes == 3


def test_bad_arguments_are_one_clear_error() -> None:
    upstream, port, alignment, x = _layout_pair(bug=False)
    with pytest.raises(BisectError, match="not both"):
        bisect_models(upstream, port, x, step_inputs=[x], alignment=alignment)
    with pytest.raises(BisectError, match="step 3 is out of range: 1 step input"):
        bisect_models(upstream, port, step_inputs=[x], step=3, alignment=alignment)
    with pytest.raises(BisectError, match="nothing to isolate"):
        bisect_models(upstream, port, x, alignment=Alignment(pairs=[Pair("", "", "root", 1.0)]))


class _UpstreamEmbedNet(nn.Module):
    """Adds its position table in its own forward (as timm's ViT does)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.pos = nn.Parameter(torch.randn(5, 8))
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.proj(x) + self.pos))


class _Embed(nn.Module):
    """The port's embedding module: no upstream counterpart; adds the table, rolled when ``shift``."""

    def __init__(self, shift: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.pos = nn.Parameter(torch.randn(5, 8))
        self.drop = nn.Dropout(0.0)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.roll(self.pos, 1, dims=0) if self.shift else self.pos
        return self.drop(self.proj(x) + table)


class _PortEmbedNet(nn.Module):
    def __init__(self, shift: bool) -> None:
        super().__init__()
        self.embed = _Embed(shift)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _embed_pair(shift: bool) -> tuple[nn.Module, nn.Module, Alignment]:
    torch.manual_seed(0)
    upstream, port = _UpstreamEmbedNet(), _PortEmbedNet(shift)
    port.load_state_dict({f"embed.{k}" if not k.startswith("head") else k: v
                          for k, v in upstream.state_dict().items()})
    alignment = Alignment(pairs=[Pair("proj", "embed.proj", "map", 1.0), Pair("drop", "embed.drop", "map", 1.0),
                                 Pair("head", "head", "map", 1.0)])
    return upstream, port, alignment


def test_a_bug_in_a_module_with_no_counterpart_is_named_by_that_module() -> None:
    upstream, port, alignment = _embed_pair(shift=True)
    result = bisect_models(upstream, port, torch.randn(2, 5, 8), alignment=alignment, call=lambda m, x: m(x),
                           tolerance="fp32")
    # No aligned module adds error (drop is fed upstream's input); the operator trace of the model
    # looks through "embed" and finds the add of the rolled table running in its forward.
    assert all(not m.drifts for m in result.path[0].modules)
    assert (result.culprit, result.culprit_upstream, result.found_in) == ("embed", "", "")
    op = result.operator
    assert op is not None and op.port_op is not None and op.upstream_op is not None
    assert (op.port_op.name, op.port_op.module, op.upstream_op.module) == ("Tensor.add", "embed", "")
    assert "self.drop(self.proj(x) + table)" in op.port_op.source.code  # type: ignore[union-attr]
    assert [(ref.name, ref.module) for ref in op.suspects] == [("roll", "embed")]  # the rolled table feeds it


def test_a_clean_module_with_no_counterpart_gives_no_culprit() -> None:
    upstream, port, alignment = _embed_pair(shift=False)
    result = bisect_models(upstream, port, torch.randn(2, 5, 8), alignment=alignment, call=lambda m, x: m(x),
                           tolerance="fp32")
    assert result.culprit is None and bool(result)
