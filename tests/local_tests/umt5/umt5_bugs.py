"""Planted bugs: what a UMT5 port gets wrong, applied to FastVideo's encoder at run time.

Each bug sets an attribute, swaps a submodule or wraps one module's ``forward``
(all through pytest's ``monkeypatch``, undone after the test), or hands the
port's real ``load_weights`` a state dict with two tensors exchanged (a
converter's slip; a fresh port is loaded for it). ``tests/local_tests/planted.py``
has the ``Bug`` record and what its ``scope`` means (as in
``tests/local_tests/vit/vit_bugs.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from planted import Bug, Convert, Plant, in_bf16, set_attribute
from torch import nn

#: The wrong eps of the RMSNorm bug (UMT5 uses 1e-6).
WRONG_EPS = 1e-3
#: Block indices (3 blocks, 0-2).
BIAS_BLOCK, KV_BLOCK, EPS_BLOCK, GATE_BLOCK, GELU_BLOCK, BF16_BLOCK = 0, 1, 1, 0, 2, 2

_BLOCK = "encoder.block.{}"
_ATTN = _BLOCK + ".layer.0.SelfAttention"
_FF = _BLOCK + ".layer.1"
_UP_ATTN = "encoder.block.{}.layer.0.SelfAttention"
_UP_FF = "encoder.block.{}.layer.1.DenseReluDense"


def _replace_child(path: str, make: Callable[[], nn.Module]) -> Plant:
    def plant(port: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        parent, _, name = path.rpartition(".")
        # Through ``_modules``: ``monkeypatch.setattr`` would restore a submodule by deleting it
        # (it is not in the instance ``__dict__``).
        monkeypatch.setitem(port.get_submodule(parent)._modules, name, make())

    return plant


def _swap(*pairs: tuple[str, str]) -> Convert:
    """The converter exchanges the tensors of each pair of upstream names (a converter's slip)."""

    def convert(state: dict[str, torch.Tensor]) -> None:
        original = dict(state)
        for a, b in pairs:
            if a not in state or b not in state:
                raise KeyError(f"cannot swap {a!r} and {b!r}: not in the upstream state dict")
            state[a], state[b] = original[b], original[a]

    return convert


BUGS: tuple[Bug, ...] = (
    Bug(
        "rel_bias_causal",
        f"block {BIAS_BLOCK}'s relative-position buckets one-directional (decoder-style) instead of bidirectional",
        _ATTN.format(BIAS_BLOCK),
        plant=set_attribute(_ATTN.format(BIAS_BLOCK), "is_decoder", True),
        why="T5Attention computes the bucket ids in its own forward (compute_bias), then looks them up in its "
            "relative_attention_bias child: the child gets wrong ids, its own code is right",
    ),
    Bug(
        "kv_swapped",
        f"block {KV_BLOCK}'s k and v given to the fused qkv_proj as each other's shard",
        f"{_ATTN.format(KV_BLOCK)}.qkv_proj",
        convert=_swap((f"{_UP_ATTN.format(KV_BLOCK)}.k.weight", f"{_UP_ATTN.format(KV_BLOCK)}.v.weight")),
        why="qkv_proj holds q | v | k instead of q | k | v; its output is the first to differ",
    ),
    Bug(
        "rms_eps",
        f"RMSNorm eps 1e-6 -> {WRONG_EPS:g} in block {EPS_BLOCK}'s feed-forward norm",
        f"{_FF.format(EPS_BLOCK)}.layer_norm",
        plant=set_attribute(f"{_FF.format(EPS_BLOCK)}.layer_norm", "variance_epsilon", WRONG_EPS),
    ),
    Bug(
        "gate_swapped",
        f"block {GATE_BLOCK}'s gated-GELU wi_0 (gate) and wi_1 (linear) weights exchanged by the converter",
        f"{_FF.format(GATE_BLOCK)}.DenseReluDense.wi_0",
        convert=_swap((f"{_UP_FF.format(GATE_BLOCK)}.wi_0.weight", f"{_UP_FF.format(GATE_BLOCK)}.wi_1.weight")),
        why="wi_0 runs first and holds wi_1's weights; by weights alone the two look like a renaming",
    ),
    Bug(
        "gelu_exact",
        f"gated activation gelu_new (tanh) -> exact erf GELU in block {GELU_BLOCK}",
        f"{_FF.format(GELU_BLOCK)}.DenseReluDense.act",
        plant=_replace_child(f"{_FF.format(GELU_BLOCK)}.DenseReluDense.act", nn.GELU),
    ),
    Bug(
        "bf16_attention",
        f"block {BF16_BLOCK}'s self-attention computed in bf16 (autocast)",
        _ATTN.format(BF16_BLOCK),
        scope="subtree",
        plant=in_bf16(_ATTN.format(BF16_BLOCK)),
    ),
)


def bug(name: str) -> Bug:
    return next(b for b in BUGS if b.name == name)
