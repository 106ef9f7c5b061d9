"""Bisection of a port module computed in bf16 under ``torch.autocast``: named, and traced under that autocast.

The autocast is entered in the attention's forward, so its children run under it and
receive bf16 inputs; the operator level re-runs a child alone and must do so under the
same autocast (outside it, ``F.linear`` on a bf16 input and fp32 weights raises).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tracediff.bisect import BisectResult, bisect_models
from tracediff.render.bisect import text, to_json

WIDTH = 16


class Proj(nn.Module):
    """A projection written in the model's own code, so the operator level traces it."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, features) / features**0.5)
        self.bias = nn.Parameter(torch.randn(out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    """``bf16``: "all" wraps the whole forward in bf16 CPU autocast, "out" only the attention and ``o``."""

    def __init__(self, bf16: str = "") -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (Proj(WIDTH, WIDTH) for _ in range(4))
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16 == "all":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._attend(x)
        return self._attend(x)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.bf16 == "out":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.o(F.scaled_dot_product_attention(q, k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v))


class Gate(nn.Module):
    """Scales its input; only callable while its block has armed it (state set by the parent's forward)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.armed:
            raise RuntimeError("Gate called outside its block")
        return x * self.scale


class Block(nn.Module):
    def __init__(self, bf16: str = "", gate_scale: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.attn = Attention(bf16)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(Proj(WIDTH, 2 * WIDTH), nn.GELU(), Proj(2 * WIDTH, WIDTH))
        self.gate = Gate(gate_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        self.gate.armed = True
        try:
            return x + self.gate(self.mlp(self.norm2(x)))
        finally:
            self.gate.armed = False


class Net(nn.Module):
    def __init__(self, bf16: str = "", gate_scale: float = 1.0, buggy: int = 1) -> None:
        super().__init__()
        self.embed = Proj(8, WIDTH)
        self.blocks = nn.ModuleList(
            Block(bf16, gate_scale) if i == buggy else Block() for i in range(3)
        )
        self.head = Proj(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _bisect(**port_options: object) -> BisectResult:
    torch.manual_seed(0)
    upstream = Net().eval()
    port = Net(**port_options).eval()  # type: ignore[arg-type]
    port.load_state_dict(upstream.state_dict())
    inputs = torch.randn(2, 6, 8)
    result = bisect_models(upstream, port, inputs, tolerance="fp32", call=lambda m, x: m(x))
    text(result), to_json(result)  # the reports render whatever the operator level did
    return result


def _autocast_note(result: BisectResult) -> str:
    notes = [note for note in result.notes if "torch.autocast('cpu', dtype=torch.bfloat16)" in note]
    assert len(notes) == 1, result.notes
    return notes[0]


def test_a_child_fed_bf16_by_its_parents_autocast_is_traced_under_that_autocast() -> None:
    # q, k, v run in fp32; the attention and o under bf16 autocast, so o's captured input is bf16.
    result = _bisect(bf16="out")
    assert not result
    assert [e.port for e in result.chain] == ["blocks.1", "blocks.1.attn", "blocks.1.attn.o"]
    assert (result.culprit, result.culprit_upstream) == ("blocks.1.attn.o", "blocks.1.attn.o")
    op = result.operator
    assert op is not None and op.port_op is not None and op.upstream_op is not None, op
    assert (op.port_op.name, op.port_op.dtype) == ("nn.functional.linear", "bfloat16")
    assert (op.upstream_op.name, op.upstream_op.dtype) == ("nn.functional.linear", "float32")
    assert "F.linear(x, self.weight, self.bias)" in op.port_op.source.code  # type: ignore[union-attr]
    assert "blocks.1.attn.o runs under" in _autocast_note(result)
    assert "inside blocks.1.attn's forward" in _autocast_note(result)
    assert not any(note.startswith("operator level skipped") for note in result.notes)
    assert result.forward_passes == 3 * len(result.path) and result.module_calls == 2


def test_a_module_computed_in_bf16_is_named_with_the_first_bf16_operator() -> None:
    # The whole attention forward under autocast: its first child, q, already computes in bf16.
    result = _bisect(bf16="all")
    assert [e.port for e in result.chain] == ["blocks.1", "blocks.1.attn", "blocks.1.attn.q"]
    assert result.culprit == "blocks.1.attn.q"
    op = result.operator
    # Run alone outside the autocast, q would compute in fp32 and match upstream: nothing to name.
    assert op is not None and op.port_op is not None, op
    assert (op.port_op.name, op.port_op.dtype) == ("nn.functional.linear", "bfloat16")
    assert op.metrics is not None and op.metrics.failed
    assert "inside blocks.1.attn's forward" in _autocast_note(result)


def test_a_module_that_cannot_run_alone_skips_the_operator_level_with_a_note() -> None:
    # The gate scales by 1.01 (the bug) and raises unless its block armed it: it cannot be re-run alone.
    result = _bisect(gate_scale=1.01)
    assert (result.culprit, result.culprit_upstream) == ("blocks.1.gate", "blocks.1.gate")
    op = result.operator
    assert op is not None and op.port_op is None
    assert op.note.startswith("operator level skipped: blocks.1.gate (upstream blocks.1.gate) could not be re-run")
    assert "RuntimeError: Gate called outside its block" in op.note
    assert op.note in result.notes
    # The port's re-run raised, so the upstream's never started.
    assert result.forward_passes == 3 * len(result.path) and result.module_calls == 1


def test_the_same_autocast_on_both_sides_is_clean() -> None:
    torch.manual_seed(0)
    upstream, port = Net(bf16="all").eval(), Net(bf16="all").eval()
    port.load_state_dict(upstream.state_dict())
    result = bisect_models(upstream, port, torch.randn(2, 6, 8), tolerance="fp32", call=lambda m, x: m(x))
    assert result and result.culprit is None and result.notes == []
