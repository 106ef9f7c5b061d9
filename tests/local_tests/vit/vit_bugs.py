"""Planted bugs: what real ports get wrong, applied to a port at run time.

Nothing installed is edited: each bug sets an attribute, swaps a submodule,
wraps one module's ``forward`` (all through pytest's ``monkeypatch``, undone
after the test) or transposes one tensor during conversion.

Each bug names the port module where it lives, and how far a correct answer
may stray from it:

* ``scope="module"``: the bug is in that module's *own* code or parameters (an
  eps, a scale, a weight, a position table added in its forward). Only that
  module is the right answer; naming a module inside it blames code that is
  correct.
* ``scope="subtree"``: the whole module computes differently (the MLP in bf16),
  so it or any module inside it is right; the first of them to run is the
  sharpest answer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

#: The wrong eps of the LayerNorm bug (the models use 1e-6, as timm and torchvision do).
WRONG_EPS = 1e-3
#: Block indices (4 blocks, 0-3): each bug in its own block so a wrong block is visible.
EPS_BLOCK, GELU_BLOCK, SCALE_BLOCK, TRANSPOSE_BLOCK, BF16_BLOCK = 1, 2, 3, 0, 2

Plant = Callable[[nn.Module, pytest.MonkeyPatch], None]


@dataclass(frozen=True)
class Bug:
    """One planted bug in one port.

    Attributes:
        name: short id, shared between ports (the table's row key).
        what: one line for the table.
        expected: the port module a correct tool names.
        scope: ``"module"`` (exactly ``expected``) or ``"subtree"`` (``expected`` or inside it).
        plant: applies the bug to a converted port (``None`` for conversion bugs).
        transpose: port parameter that the converter stores transposed (conversion bugs).
        why: why ``expected`` is the answer, when it is not obvious.
    """

    name: str
    what: str
    expected: str
    scope: Literal["module", "subtree"] = "module"
    plant: Plant | None = None
    transpose: str | None = None
    why: str = ""

    def named_correctly(self, module: str | None) -> bool:
        if module is None:
            return False
        if self.scope == "subtree":
            return module == self.expected or module.startswith(self.expected + ".")
        return module == self.expected


def _set(path: str, attribute: str, value: Any) -> Plant:
    def plant(port: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(port.get_submodule(path), attribute, value)

    return plant


def _roll_position_table(path: str, attribute: str) -> Plant:
    """Shift the position table by one token (token i gets position i - 1's row)."""

    def plant(port: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        table = getattr(port.get_submodule(path), attribute)
        monkeypatch.setattr(table, "data", torch.roll(table.data, shifts=1, dims=1))

    return plant


def _in_bf16(path: str) -> Plant:
    """Run one module under CPU bf16 autocast: its matmuls in bf16, its output bf16."""

    def plant(port: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        module = port.get_submodule(path)
        original = module.forward

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return original(*args, **kwargs)

        monkeypatch.setattr(module, "forward", forward)

    return plant


def _gelu_tanh_transformers(path: str) -> Plant:
    def plant(port: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        from transformers.activations import ACT2FN

        parent, _, name = path.rpartition(".")
        # Through ``_modules``: ``monkeypatch.setattr`` would restore a submodule by deleting it
        # (it is not in the instance ``__dict__``).
        monkeypatch.setitem(port.get_submodule(parent)._modules, name, ACT2FN["gelu_pytorch_tanh"])

    return plant


def _mha_scale(path: str, scale: Callable[[int], float]) -> Plant:
    """Replace one ``nn.MultiheadAttention``'s forward by a re-implementation with another softmax scale."""

    def plant(port: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        mha = port.get_submodule(path)
        heads = mha.num_heads

        def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **_: Any) -> tuple[Any, None]:
            batch, tokens, width = query.shape
            qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
            q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale(width // heads))
            out = out.transpose(1, 2).reshape(batch, tokens, width)
            return F.linear(out, mha.out_proj.weight, mha.out_proj.bias), None

        monkeypatch.setattr(mha, "forward", forward)

    return plant


def _attention_scaling(path: str, scale: Callable[[int], float]) -> Plant:
    """Set a transformers attention module's ``scaling`` from its head size."""

    def plant(port: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        attention = port.get_submodule(path)
        monkeypatch.setattr(attention, "scaling", scale(attention.head_dim))

    return plant


def _no_sqrt(head_dim: int) -> float:
    """The classic slip: ``1 / head_dim`` instead of ``1 / sqrt(head_dim)``."""
    return 1.0 / head_dim


TRANSFORMERS_BUGS: tuple[Bug, ...] = (
    Bug(
        "ln_eps",
        f"LayerNorm eps 1e-6 -> {WRONG_EPS:g} in block {EPS_BLOCK}'s second norm",
        f"vit.layers.{EPS_BLOCK}.layernorm_after",
        plant=_set(f"vit.layers.{EPS_BLOCK}.layernorm_after", "eps", WRONG_EPS),
    ),
    Bug(
        "gelu_tanh",
        f"exact GELU -> tanh approximation in block {GELU_BLOCK}'s MLP",
        f"vit.layers.{GELU_BLOCK}.mlp.activation_fn",
        plant=_gelu_tanh_transformers(f"vit.layers.{GELU_BLOCK}.mlp.activation_fn"),
    ),
    Bug(
        "softmax_scale",
        f"attention scale 1/sqrt(d) -> 1/d in block {SCALE_BLOCK}",
        f"vit.layers.{SCALE_BLOCK}.attention",
        plant=_attention_scaling(f"vit.layers.{SCALE_BLOCK}.attention", _no_sqrt),
        why="ViTAttention applies the scale in its own forward, between q/k/v_proj and o_proj",
    ),
    Bug(
        "transposed_weight",
        f"block {TRANSPOSE_BLOCK}'s attention output projection stored transposed by the converter",
        f"vit.layers.{TRANSPOSE_BLOCK}.attention.o_proj",
        transpose=f"vit.layers.{TRANSPOSE_BLOCK}.attention.o_proj.weight",
    ),
    Bug(
        "pos_embed_shift",
        "position table shifted by one token",
        "vit.embeddings",
        plant=_roll_position_table("vit.embeddings", "position_embeddings"),
        why="ViTEmbeddings adds the table in its own forward, before its dropout child runs",
    ),
    Bug(
        "bf16_mlp",
        f"block {BF16_BLOCK}'s MLP computed in bf16 (autocast)",
        f"vit.layers.{BF16_BLOCK}.mlp",
        scope="subtree",
        plant=_in_bf16(f"vit.layers.{BF16_BLOCK}.mlp"),
    ),
)

_TV = "encoder.layers.encoder_layer_{}"

TORCHVISION_BUGS: tuple[Bug, ...] = (
    Bug(
        "ln_eps",
        f"LayerNorm eps 1e-6 -> {WRONG_EPS:g} in block {EPS_BLOCK}'s second norm",
        f"{_TV.format(EPS_BLOCK)}.ln_2",
        plant=_set(f"{_TV.format(EPS_BLOCK)}.ln_2", "eps", WRONG_EPS),
    ),
    Bug(
        "gelu_tanh",
        f"exact GELU -> tanh approximation in block {GELU_BLOCK}'s MLP",
        f"{_TV.format(GELU_BLOCK)}.mlp.1",
        plant=_set(f"{_TV.format(GELU_BLOCK)}.mlp.1", "approximate", "tanh"),
    ),
    Bug(
        "softmax_scale",
        f"attention scale 1/sqrt(d) -> 1/d in block {SCALE_BLOCK}",
        f"{_TV.format(SCALE_BLOCK)}.self_attention",
        plant=_mha_scale(f"{_TV.format(SCALE_BLOCK)}.self_attention", _no_sqrt),
    ),
    Bug(
        "transposed_weight",
        f"block {TRANSPOSE_BLOCK}'s attention output projection stored transposed by the converter",
        f"{_TV.format(TRANSPOSE_BLOCK)}.self_attention",
        transpose=f"{_TV.format(TRANSPOSE_BLOCK)}.self_attention.out_proj.weight",
        why="nn.MultiheadAttention reads out_proj.weight in its own forward; out_proj never runs as a module",
    ),
    Bug(
        "pos_embed_shift",
        "position table shifted by one token",
        "encoder",
        plant=_roll_position_table("encoder", "pos_embedding"),
        why="torchvision's Encoder adds the table in its own forward, before its dropout child runs",
    ),
    Bug(
        "bf16_mlp",
        f"block {BF16_BLOCK}'s MLP computed in bf16 (autocast)",
        f"{_TV.format(BF16_BLOCK)}.mlp",
        scope="subtree",
        plant=_in_bf16(f"{_TV.format(BF16_BLOCK)}.mlp"),
    ),
)
