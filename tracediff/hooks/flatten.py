"""Find every tensor inside a module's output, each with a stable label.

Labels follow FastVideo's tracer (``out``, ``out[0]``, ``out.key``) so a
tracediff trace and a FastVideo JSONL trace of the same model line up; tracediff
also looks inside dataclasses (``out.sample``), which FastVideo skips.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

#: Nesting deeper than this is almost surely a cycle or a data structure, not an output.
MAX_DEPTH = 16


def iter_tensors(
    obj: Any, prefix: str = "out", _depth: int = 0, _path: frozenset[int] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(label, tensor)`` for each tensor leaf; other leaves are skipped.

    A container that holds itself (directly or further down) is walked once:
    following the cycle would repeat its tensors, twice per level for a list
    that holds itself twice, up to ``2**MAX_DEPTH`` records.
    """
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
        return
    if _depth >= MAX_DEPTH or id(obj) in _path:
        return
    if isinstance(obj, (tuple, list)):
        inside = _path | {id(obj)}
        for index, item in enumerate(obj):
            yield from iter_tensors(item, f"{prefix}[{index}]", _depth + 1, inside)
    elif isinstance(obj, Mapping):
        inside = _path | {id(obj)}
        for key, value in obj.items():
            yield from iter_tensors(value, f"{prefix}.{key}", _depth + 1, inside)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        inside = _path | {id(obj)}
        for item in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, item.name, None), f"{prefix}.{item.name}", _depth + 1, inside)


def iter_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Label a call's tensor arguments ``input[0]``, ``input.x``, … for the model-I/O records."""
    for index, value in enumerate(args):
        yield from iter_tensors(value, f"input[{index}]")
    for key, value in kwargs.items():
        yield from iter_tensors(value, f"input.{key}")
