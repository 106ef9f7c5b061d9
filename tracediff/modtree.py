"""Dotted module names as a tree: ``blocks.0.attn`` lies in ``blocks.0``, which lies in ``blocks``.

``named_modules()`` names are the only tree a trace keeps, so every layer that
asks "which module contains this one" asks it here, with the same answer. The
root module's name is ``""``; it contains every other module.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

#: Name of the root module (the model itself).
ROOT = ""
#: How the root module is shown to people.
ROOT_DISPLAY = "<model>"


def parent(name: str) -> str:
    """The dotted parent of a module name: ``ROOT`` for top-level modules (and for the root itself)."""
    return name.rsplit(".", 1)[0] if "." in name else ROOT


def local_name(name: str) -> str:
    """The last part of a dotted name: ``attn`` for ``blocks.0.attn``."""
    return name.rsplit(".", 1)[-1]


def join_name(parent_name: str, child: str) -> str:
    """The full name of ``child`` (relative to ``parent_name``; ``""`` is the parent itself)."""
    if not child:
        return parent_name
    return f"{parent_name}.{child}" if parent_name else child


def is_within(name: str, ancestor: str, *, strict: bool) -> bool:
    """Whether ``name`` lies in the subtree of ``ancestor`` (the root's subtree holds every name).

    Args:
        strict: leave ``ancestor`` itself out (only modules strictly below it count).
    """
    if ancestor == ROOT:
        return not strict or name != ROOT
    return name.startswith(ancestor + ".") or (not strict and name == ancestor)


def ancestors(name: str) -> tuple[str, ...]:
    """The modules strictly above ``name``, nearest first, without the root."""
    out = []
    while "." in name:
        name = parent(name)
        out.append(name)
    return tuple(out)


def common_ancestor(names: Sequence[str], known: Container[str] | None = None) -> str:
    """The deepest name whose subtree holds every name in ``names`` (``ROOT`` at worst).

    Args:
        known: only names in it qualify (the modules a model has); default any dotted prefix.
    """
    parts = [name.split(".") if name else [] for name in names]
    prefix: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    while known is not None and prefix and ".".join(prefix) not in known:
        prefix.pop()
    return ".".join(prefix)


def display_name(name: str) -> str:
    """A module name for people: the root is ``<model>``."""
    return name if name else ROOT_DISPLAY
