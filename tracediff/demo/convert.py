"""Upstream -> port weight conversion, in FastVideo's ``param_names_mapping`` form.

Each key is a regex matched (``re.match``) against an upstream parameter name; the
first matching rule wins. Its value is either

* a template with backreferences, e.g. ``r"transformer_blocks.\\1.attn2.to_q.\\2"``:
  a plain rename; or
* a tuple ``(template, merge_index, num_merges)``: ``num_merges`` upstream tensors
  are concatenated along dim 0, in ``merge_index`` order, into one port tensor.
  That is how upstream's separate ``self_attn.q/k/v`` become the port's fused
  ``attn1.to_qkv``.

The same table is what the aligner reads to pair port modules with upstream ones,
so it is kept exactly as a real port's loader would hold it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from tracediff.errors import AlignmentError

MappingValue = str | tuple[str, int, int]

PARAM_NAMES_MAPPING: dict[str, MappingValue] = {
    # Embeddings: Wan's nn.Sequential indices -> named sub-modules.
    r"^patch_embedding\.(weight|bias)$": r"patch_embed.proj.\1",
    r"^time_embedding\.0\.(weight|bias)$": r"condition_embedder.time_embedder.linear_1.\1",
    r"^time_embedding\.2\.(weight|bias)$": r"condition_embedder.time_embedder.linear_2.\1",
    r"^time_projection\.1\.(weight|bias)$": r"condition_embedder.time_modulation.linear.\1",
    r"^text_embedding\.0\.(weight|bias)$": r"condition_embedder.text_embedder.fc_in.\1",
    r"^text_embedding\.2\.(weight|bias)$": r"condition_embedder.text_embedder.fc_out.\1",
    # Self-attention: q, k, v are fused into one projection.
    r"^blocks\.(\d+)\.self_attn\.q\.(weight|bias)$": (r"transformer_blocks.\1.attn1.to_qkv.\2", 0, 3),
    r"^blocks\.(\d+)\.self_attn\.k\.(weight|bias)$": (r"transformer_blocks.\1.attn1.to_qkv.\2", 1, 3),
    r"^blocks\.(\d+)\.self_attn\.v\.(weight|bias)$": (r"transformer_blocks.\1.attn1.to_qkv.\2", 2, 3),
    r"^blocks\.(\d+)\.self_attn\.o\.(weight|bias)$": r"transformer_blocks.\1.attn1.to_out.\2",
    r"^blocks\.(\d+)\.self_attn\.(norm_q|norm_k)\.weight$": r"transformer_blocks.\1.attn1.\2.weight",
    # Cross-attention.
    r"^blocks\.(\d+)\.cross_attn\.(q|k|v)\.(weight|bias)$": r"transformer_blocks.\1.attn2.to_\2.\3",
    r"^blocks\.(\d+)\.cross_attn\.o\.(weight|bias)$": r"transformer_blocks.\1.attn2.to_out.\2",
    r"^blocks\.(\d+)\.cross_attn\.(norm_q|norm_k)\.weight$": r"transformer_blocks.\1.attn2.\2.weight",
    # Norms, FFN and modulation (norm1 / norm2 have no parameters).
    r"^blocks\.(\d+)\.norm3\.(weight|bias)$": r"transformer_blocks.\1.norm_cross.\2",
    r"^blocks\.(\d+)\.ffn\.0\.(weight|bias)$": r"transformer_blocks.\1.ffn.fc_in.\2",
    r"^blocks\.(\d+)\.ffn\.2\.(weight|bias)$": r"transformer_blocks.\1.ffn.fc_out.\2",
    r"^blocks\.(\d+)\.modulation$": r"transformer_blocks.\1.scale_shift_table",
    # Output head.
    r"^head\.head\.(weight|bias)$": r"proj_out.\1",
    r"^head\.modulation$": r"scale_shift_table",
}


class ConversionError(AlignmentError, KeyError):
    """A state dict does not convert cleanly; the message names every bad parameter.

    A ``KeyError`` so loader-style ``except KeyError`` handlers catch it, and an
    ``AlignmentError`` so the CLI reports it in one line. ``unmatched`` lists the
    upstream names no rule matched, ``unfilled`` the port names left empty.
    """

    def __init__(self, message: str, unmatched: list[str], unfilled: list[str]) -> None:
        super().__init__(message)
        self.message = message
        self.unmatched = unmatched
        self.unfilled = unfilled

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def map_param_name(
    name: str, mapping: Mapping[str, MappingValue] = PARAM_NAMES_MAPPING
) -> tuple[str, int | None, int | None] | None:
    """Map one upstream parameter name with the first matching rule.

    Returns:
        ``(port_name, merge_index, num_merges)`` (the last two ``None`` for a plain
        rename), or ``None`` if no rule matches.
    """
    for pattern, value in mapping.items():
        match = re.match(pattern, name)
        if match is None:
            continue
        if isinstance(value, tuple):
            template, merge_index, num_merges = value
            return match.expand(template), merge_index, num_merges
        return match.expand(value), None, None
    return None


def convert_state_dict(
    upstream_sd: Mapping[str, torch.Tensor],
    mapping: Mapping[str, MappingValue] = PARAM_NAMES_MAPPING,
    expected_keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Convert an upstream state dict into the port's naming and layout.

    Args:
        upstream_sd: upstream ``state_dict()``.
        mapping: the ``param_names_mapping`` table to apply.
        expected_keys: the port's parameter names, if known; any of them left
            unfilled (or any produced name not among them) is an error too.

    Raises:
        ConversionError: an upstream parameter matched no rule, a fused port
            parameter is missing some of its parts, two upstream parameters map to
            the same port parameter, or ``expected_keys`` disagrees with the result.
    """
    port_sd: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    pending: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    pending_total: dict[str, int] = {}
    unmatched: list[str] = []
    problems: list[str] = []

    for name, tensor in upstream_sd.items():
        mapped = map_param_name(name, mapping)
        if mapped is None:
            unmatched.append(name)
            continue
        target, merge_index, num_merges = mapped
        if merge_index is None or num_merges is None:  # a plain rename (a rule gives both or neither)
            if target in sources:
                problems.append(f"{target!r} is produced by both {sources[target]!r} and {name!r}")
            sources[target] = name
            port_sd[target] = tensor
            continue
        parts = pending.setdefault(target, {})
        pending_total[target] = num_merges
        if merge_index in parts:
            problems.append(f"{target!r} part {merge_index} is produced by both {parts[merge_index][0]!r} and {name!r}")
        parts[merge_index] = (name, tensor)

    unfilled: list[str] = []
    for target, parts in pending.items():
        total = pending_total[target]
        missing = [i for i in range(total) if i not in parts]
        if missing:
            unfilled.append(target)
            have = ", ".join(f"{i}: {parts[i][0]!r}" for i in sorted(parts))
            problems.append(f"{target!r} is fused from {total} parts but parts {missing} are missing (have {have})")
            continue
        port_sd[target] = torch.cat([parts[i][1] for i in range(total)], dim=0)
        sources[target] = " + ".join(parts[i][0] for i in range(total))

    if expected_keys is not None:
        expected = list(expected_keys)
        for key in expected:
            if key not in port_sd and key not in unfilled:
                unfilled.append(key)
                problems.append(f"port parameter {key!r} is not filled by any upstream parameter")
        expected_set = set(expected)
        for key in port_sd:
            if key not in expected_set:
                problems.append(f"{key!r} (from {sources[key]!r}) is not a port parameter")

    if unmatched or problems:
        lines = [f"upstream parameter {n!r} matches no rule in the mapping" for n in unmatched] + problems
        raise ConversionError(
            f"state dict conversion failed ({len(lines)} problem(s)): " + "; ".join(lines),
            unmatched=unmatched,
            unfilled=unfilled,
        )
    return port_sd
