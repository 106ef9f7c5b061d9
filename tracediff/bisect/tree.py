"""Where bisection looks: levels of the aligned module tree, and nested outputs rebuilt leaf by leaf.

A *level* is a set of aligned port modules none of which contains another: the
first level is the model's top (the largest repeated module list, with the aligned
modules around it), each next level the aligned modules just below the culprit.
Containers that are never called (``nn.ModuleList``, ``nn.ModuleDict``) are
looked through, since they have no output to compare.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from tracediff.hooks.flatten import MAX_DEPTH
from tracediff.modtree import ROOT, ancestors, is_within, join_name


def is_container(module: nn.Module) -> bool:
    """A module that is never called itself: only a holder of children."""
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def frontier(modules: Mapping[str, nn.Module], aligned: Mapping[str, str], within: str) -> list[str]:
    """The aligned modules just below ``within``: aligned, with no aligned module between.

    Args:
        modules: the port's ``named_modules()`` as a dict (definition order).
        aligned: port name -> upstream name of every aligned pair.
        within: the port module to look below (``""`` for the whole model).

    Returns:
        Port names in definition order; containers are looked through.
    """
    candidates = [
        name for name in modules
        if is_within(name, within, strict=True) and name in aligned and not is_container(modules[name])
    ]
    chosen = set(candidates)
    # every candidate lies below ``within``, so an ancestor in ``chosen`` lies between the two
    return [name for name in candidates if not any(a in chosen for a in ancestors(name))]


def blocks_list(modules: Mapping[str, nn.Module], aligned: Mapping[str, str]) -> str | None:
    """The largest repeated module list: the container with the most aligned direct children."""
    best, best_count = None, 1
    for name, module in modules.items():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        count = sum(1 for child, _ in module.named_children() if join_name(name, child) in aligned)
        if count > best_count:
            best, best_count = name, count
    return best


def top_level(modules: Mapping[str, nn.Module], aligned: Mapping[str, str]) -> list[str]:
    """The first level: the blocks of the largest repeated list and the aligned modules around them.

    Aligned modules that merely contain the block list (a ``model.model`` wrapper,
    an aligned ``nn.Sequential`` of blocks) are replaced by what lies below them, so
    the first level always starts at block granularity.
    """
    blocks = blocks_list(modules, aligned)
    level = frontier(modules, aligned, ROOT)
    if blocks is None:
        return level
    changed = True
    while changed:
        changed = False
        expanded: list[str] = []
        for name in level:
            if is_within(blocks, name, strict=False):
                expanded.extend(frontier(modules, aligned, name))
                changed = True
            else:
                expanded.append(name)
        level = expanded
    return level


# -- nested outputs ------------------------------------------------------------------------


def tensor_leaves(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensor leaves in the order :func:`tracediff.hooks.flatten.iter_tensors` labels them."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if _depth >= MAX_DEPTH:
        return
    if isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensor_leaves(item, _depth + 1)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from tensor_leaves(value, _depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for item in dataclasses.fields(obj):
            yield from tensor_leaves(getattr(obj, item.name, None), _depth + 1)


def replace_leaves(obj: Any, new: Iterator[torch.Tensor], _depth: int = 0) -> Any:
    """A copy of ``obj`` whose tensor leaves are taken, in order, from ``new``.

    Containers are rebuilt with their own type (named tuples, dict subclasses,
    dataclasses); non-tensor leaves are kept as they are. ``new`` must yield
    exactly as many tensors as :func:`tensor_leaves` finds.
    """
    if isinstance(obj, torch.Tensor):
        return next(new)
    if _depth >= MAX_DEPTH:
        return obj
    if isinstance(obj, (tuple, list)):
        items = [replace_leaves(item, new, _depth + 1) for item in obj]
        if isinstance(obj, list):
            return type(obj)(items) if type(obj) is not list else items
        if hasattr(obj, "_fields"):  # named tuple
            return type(obj)(*items)
        return tuple(items) if type(obj) is tuple else type(obj)(items)
    if isinstance(obj, Mapping):
        mapping: Any = copy.copy(obj)  # its own type (a dict subclass, an OrderedDict), filled in below
        for key, value in obj.items():
            mapping[key] = replace_leaves(value, new, _depth + 1)
        return mapping
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        instance = copy.copy(obj)
        for item in dataclasses.fields(obj):
            value = getattr(obj, item.name, None)
            object.__setattr__(instance, item.name, replace_leaves(value, new, _depth + 1))
        return instance
    return obj


def snapshot(obj: Any, device: torch.device | str | None = None) -> Any:
    """``obj`` with every tensor leaf detached and cloned (safe from later in-place writes).

    With ``device``, the copies are kept there instead (``"cpu"``: off the accelerator, see ``low_memory``).
    """
    if device is None:
        return replace_leaves(obj, (t.detach().clone() for t in tensor_leaves(obj)))
    return replace_leaves(obj, (t.detach().to(device, copy=True) for t in tensor_leaves(obj)))


def to_device_of(obj: Any, like: Any) -> Any:
    """``obj`` with tensor leaves moved to the device of ``like``'s first parameter (or buffer); as is without one."""
    device = next((t.device for t in (*like.parameters(), *like.buffers())), None)
    if device is None:
        return obj
    return replace_leaves(obj, (t.to(device) for t in tensor_leaves(obj)))


def shapes(leaves: list[torch.Tensor]) -> str:
    return ", ".join("(" + ", ".join(map(str, t.shape)) + ")" for t in leaves) or "no tensors"
