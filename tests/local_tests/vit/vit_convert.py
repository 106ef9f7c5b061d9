"""timm -> transformers and timm -> torchvision weight conversion, as a real port keeps it.

Each port holds a ``param_names_mapping`` in FastVideo's form (regex matched
with ``re.match`` against a timm parameter name, first match wins, value a
template with backreferences). That is the table tracediff's aligner reads as
``param_map=``. FastVideo's form has merges (several upstream tensors
concatenated into one port tensor) but no splits, and real ports that split a
fused upstream tensor do it in a conversion script next to the table: here
``*_SPLITS`` (one timm tensor chunked along dim 0 into several port tensors),
used by :func:`convert` but not part of the ``param_map``; the aligner finds
those modules from their weights.

transformers splits timm's fused ``qkv`` into ``q_proj``/``k_proj``/``v_proj``.
torchvision's ``nn.MultiheadAttention`` keeps a fused ``in_proj_weight`` that it
owns itself: it has no q/k/v submodules at all.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import torch

TIMM_TO_TRANSFORMERS: dict[str, str] = {
    r"^cls_token$": r"vit.embeddings.cls_token",
    r"^pos_embed$": r"vit.embeddings.position_embeddings",
    r"^patch_embed\.proj\.(weight|bias)$": r"vit.embeddings.patch_embeddings.projection.\1",
    r"^blocks\.(\d+)\.norm1\.(weight|bias)$": r"vit.layers.\1.layernorm_before.\2",
    r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$": r"vit.layers.\1.attention.o_proj.\2",
    r"^blocks\.(\d+)\.norm2\.(weight|bias)$": r"vit.layers.\1.layernorm_after.\2",
    r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$": r"vit.layers.\1.mlp.fc1.\2",
    r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$": r"vit.layers.\1.mlp.fc2.\2",
    r"^norm\.(weight|bias)$": r"vit.layernorm.\1",
    r"^head\.(weight|bias)$": r"classifier.\1",
}

TIMM_TO_TRANSFORMERS_SPLITS: dict[str, tuple[str, ...]] = {
    r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$": (
        r"vit.layers.\1.attention.q_proj.\2",
        r"vit.layers.\1.attention.k_proj.\2",
        r"vit.layers.\1.attention.v_proj.\2",
    ),
}

TIMM_TO_TORCHVISION: dict[str, str] = {
    r"^cls_token$": r"class_token",
    r"^pos_embed$": r"encoder.pos_embedding",
    r"^patch_embed\.proj\.(weight|bias)$": r"conv_proj.\1",
    r"^blocks\.(\d+)\.norm1\.(weight|bias)$": r"encoder.layers.encoder_layer_\1.ln_1.\2",
    r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$": r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2",
    r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$": r"encoder.layers.encoder_layer_\1.self_attention.out_proj.\2",
    r"^blocks\.(\d+)\.norm2\.(weight|bias)$": r"encoder.layers.encoder_layer_\1.ln_2.\2",
    r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$": r"encoder.layers.encoder_layer_\1.mlp.0.\2",
    r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$": r"encoder.layers.encoder_layer_\1.mlp.3.\2",
    r"^norm\.(weight|bias)$": r"encoder.ln.\1",
    r"^head\.(weight|bias)$": r"heads.head.\1",
}

TIMM_TO_TORCHVISION_SPLITS: dict[str, tuple[str, ...]] = {}


class ConversionError(KeyError):
    """A state dict does not convert cleanly; the message names every bad parameter."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def convert(
    state: Mapping[str, torch.Tensor],
    mapping: Mapping[str, str],
    splits: Mapping[str, tuple[str, ...]] | None = None,
    *,
    transpose: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Rename (and split) a timm state dict into a port's names.

    Args:
        state: the upstream state dict.
        mapping: ``param_names_mapping``: regex -> template.
        splits: regex -> templates; the tensor is chunked along dim 0 into them, in order.
        transpose: port parameter names to store transposed (a planted conversion bug).

    Raises:
        ConversionError: a parameter no rule matches, or two rules writing one name.
    """
    rules = [(re.compile(pattern), (template,)) for pattern, template in mapping.items()]
    rules += [(re.compile(pattern), templates) for pattern, templates in (splits or {}).items()]
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for name, tensor in state.items():
        found = next(((m, t) for m, t in ((regex.match(name), t) for regex, t in rules) if m is not None), None)
        if found is None:
            problems.append(f"{name!r}: no rule matches")
            continue
        match, templates = found
        parts = tensor.chunk(len(templates), dim=0) if len(templates) > 1 else (tensor,)
        for template, part in zip(templates, parts, strict=True):
            target = match.expand(template)
            if target in out:
                problems.append(f"{name!r}: {target!r} is already written by another rule")
            value = part.detach().clone()
            out[target] = value.t().contiguous() if target in transpose else value
    missing = set(transpose) - set(out)
    problems += [f"transpose={name!r}: no such converted parameter" for name in sorted(missing)]
    if problems:
        raise ConversionError("cannot convert: " + "; ".join(problems))
    return out
