"""Planted bugs in FastVideo's Wan DiT: what real ports get wrong, applied at run time.

A run-time bug sets an attribute or wraps one module's ``forward``; a
conversion bug edits the converted state dict the way a wrong conversion would.
``tests/local_tests/planted.py`` has the ``Bug`` record, how it is planted and
what its ``scope`` means.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from planted import Bug, Convert, in_bf16, set_attribute, wrap_forward


def _rope_sign(original: Callable[..., Any]) -> Callable[..., Any]:
    """The rotary embedding turned the other way (sin negated), inside the attention core."""

    def forward(*args: Any, freqs_cis: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> Any:
        if freqs_cis is not None:
            freqs_cis = (freqs_cis[0], -freqs_cis[1])
        return original(*args, freqs_cis=freqs_cis, **kwargs)

    return forward


def _transpose(key: str) -> Convert:
    def convert(state: dict[str, torch.Tensor]) -> None:
        state[key] = state[key].t().contiguous()

    return convert


def _shift(key: str, by: float) -> Convert:
    def convert(state: dict[str, torch.Tensor]) -> None:
        state[key] = state[key] + by

    return convert


def _swap_modulation_rows(key: str, first: int, second: int) -> Convert:
    """A converter that reads the 6-row modulation table in another order (shift and scale swapped)."""

    def convert(state: dict[str, torch.Tensor]) -> None:
        table = state[key].clone()
        table[:, [first, second]] = table[:, [second, first]]
        state[key] = table

    return convert


BUGS: tuple[Bug, ...] = (
    Bug("transposed_weight", "block 0's self-attention value projection stored transposed by the converter",
        "blocks.0.to_v", convert=_transpose("blocks.0.to_v.weight")),
    Bug("cross_attn_bias", "block 1's cross-attention key bias shifted by 0.05 in conversion",
        "blocks.1.attn2.to_k", convert=_shift("blocks.1.attn2.to_k.bias", 0.05),
        why="its weights no longer match upstream's: it must still pair by name, not drop out"),
    Bug("norm_eps", "LayerNorm eps 1e-6 -> 1e-3 in block 0's first norm", "blocks.0.norm1",
        plant=set_attribute("blocks.0.norm1", "eps", 1e-3)),
    Bug("gelu_exact", "FFN activation: exact GELU instead of the tanh approximation in block 1",
        "blocks.1.ffn.act", plant=set_attribute("blocks.1.ffn.act", "approximate", "none")),
    Bug("rope_sign", "rotary embedding turned the wrong way inside block 0's attention core",
        "blocks.0.attn1", plant=wrap_forward("blocks.0.attn1", _rope_sign),
        why="FastVideo applies the rotary embedding inside DistributedAttention, which has no diffusers module"),
    Bug("modulation_rows", "block 1's modulation table read with shift and scale swapped",
        "blocks.1", convert=_swap_modulation_rows("blocks.1.scale_shift_table", 0, 1),
        why="WanTransformerBlock applies its own scale_shift_table in its own forward, before to_q runs"),
    Bug("time_embedding_period", "sinusoidal timestep embedding with max_period 5000 instead of 10000",
        "condition_embedder.time_embedder", plant=set_attribute("condition_embedder.time_embedder", "max_period", 5000),
        why="FastVideo's TimestepEmbedder computes the sinusoid in its own forward (diffusers: timesteps_proj)"),
    Bug("bf16_cross_attention", "block 1's cross-attention computed in bf16 (autocast)", "blocks.1.attn2",
        scope="subtree", plant=in_bf16("blocks.1.attn2")),
)


def bug(name: str) -> Bug:
    return next(b for b in BUGS if b.name == name)
