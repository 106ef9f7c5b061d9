"""Module pairs from a port's checkpoint-conversion table (FastVideo's ``param_names_mapping``).

A port already knows which upstream parameter becomes which of its own: the
table its weight loader applies. Each key is a regex matched (``re.match``)
against an upstream parameter name, the first match wins, and its value is
either a template (``r"transformer_blocks.\\1.attn2.to_q.\\2"``) or a tuple
``(template, merge_index, num_merges)``: ``num_merges`` upstream tensors are
concatenated along dim 0 into one port tensor (separate q/k/v into ``to_qkv``).

The module owning an upstream parameter pairs with the module owning its
mapped name. When the links between modules are not one-to-one (a merge, or
one module's parameters spread over several) the modules form a
:class:`~tracediff.alignment.Group` instead of a pair.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracediff.align_mapfile import quoted, read_table_file
from tracediff.align_side import Side
from tracediff.alignment import Group
from tracediff.errors import AlignmentError

ParamMap = dict[str, "str | tuple[str, int, int]"]

#: Attribute names looked up in a ``.py`` file given without ``:ATTR``.
DEFAULT_ATTRS = ("param_names_mapping", "PARAM_NAMES_MAPPING")


@dataclass
class ParamMapLinks:
    """What a parameter map says about modules.

    Attributes:
        pairs: ``(upstream module, port module)`` linked one-to-one.
        groups: modules linked many-to-one (merges, or parameters spread out).
        notes: rules that matched no upstream parameter in this model.
    """

    pairs: list[tuple[str, str]]
    groups: list[Group]
    notes: list[str]


def load_param_map(ref: str | Path) -> dict[str, Any]:
    """Load a parameter-name map from a file or a Python object reference.

    Args:
        ref: a ``.json`` or ``.toml`` file holding the dict (at the top level, or
            under a ``param_names_mapping`` key); a ``file.py[:ATTR]``; or an
            importable ``package.module:ATTR`` (``ATTR`` may be dotted).

    Raises:
        AlignmentError: the file is missing or does not parse, the object cannot
            be imported, or the dict is not a valid parameter map.
    """
    text = str(ref)
    path_part, _, attr = text.partition(":") if not Path(text).exists() else (text, "", "")
    path = Path(path_part)
    if path.suffix.lower() in (".json", ".toml"):
        data = read_table_file(path, what="parameter map")
        if set(data) == {"param_names_mapping"}:
            data = data["param_names_mapping"]
        return validate_param_map(data, origin=str(path))
    if path.suffix.lower() == ".py":
        return validate_param_map(_from_python_file(path, attr), origin=text)
    if attr:
        return validate_param_map(_from_module(path_part, attr), origin=text)
    raise AlignmentError(f"param map {text!r}: not a .json/.toml/.py file nor a 'package.module:ATTR' reference")


def validate_param_map(mapping: Any, *, origin: str = "<param map>") -> dict[str, Any]:
    """Check a parameter map's shape and normalise JSON/TOML arrays into tuples.

    Raises:
        AlignmentError: not a dict, a key that is not a valid regex, or a value
            that is neither a template string nor ``(template, merge_index, num_merges)``.
    """
    if not isinstance(mapping, Mapping):
        raise AlignmentError(
            f"{origin}: a parameter map must be a dict of regex -> template, not {type(mapping).__name__}"
        )
    out: dict[str, Any] = {}
    for pattern, value in mapping.items():
        if not isinstance(pattern, str):
            raise AlignmentError(f"{origin}: key {pattern!r} must be a regex string")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise AlignmentError(f"{origin}: rule {quoted(pattern)} is not a valid regex ({exc})") from None
        if isinstance(value, str):
            out[pattern] = value
            continue
        if (
            isinstance(value, (list, tuple))
            and len(value) == 3
            and isinstance(value[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:])
            and 0 <= value[1] < value[2]
        ):
            out[pattern] = (value[0], int(value[1]), int(value[2]))
            continue
        raise AlignmentError(
            f"{origin}: rule {quoted(pattern)} = {value!r}: the value must be a template string or "
            "(template, merge_index, num_merges) with 0 <= merge_index < num_merges"
        )
    return out


def param_map_links(mapping: Mapping[str, Any], upstream: Side, port: Side, *, origin: str) -> ParamMapLinks:
    """Turn parameter-level rules into module-level pairs and groups.

    Raises:
        AlignmentError: a rule maps an upstream parameter to a name the port does
            not have (the port's own loader would fail the same way), or a
            template does not expand.
    """
    port_params = {_full(port.names[e.module_index], e.name): e.module_index for e in port.table.params}
    compiled = [(pattern, value, re.compile(pattern)) for pattern, value in mapping.items()]
    used: set[str] = set()
    links: dict[tuple[int, int], list[str]] = {}  # (upstream, port) module -> merged port tensors
    merges: dict[str, dict[int, str]] = defaultdict(dict)  # merged port tensor -> {merge index: upstream name}
    merge_index: dict[int, int] = {}  # upstream module -> its place in a merge
    for entry in upstream.table.params:
        name = _full(upstream.names[entry.module_index], entry.name)
        for pattern, value, regex in compiled:
            match = regex.match(name)
            if match is None:
                continue
            used.add(pattern)
            template = value if isinstance(value, str) else value[0]
            try:
                target = match.expand(template)
            except (re.error, IndexError) as exc:
                raise AlignmentError(f"{origin}: rule {quoted(pattern)} cannot expand for {name!r}: {exc}") from None
            if target not in port_params:
                raise AlignmentError(
                    f"{origin}: rule {quoted(pattern)} maps upstream parameter {name!r} to {target!r}, "
                    "which is not a parameter of the port"
                )
            targets = links.setdefault((entry.module_index, port_params[target]), [])
            if not isinstance(value, str):
                merges[target][value[1]] = name
                merge_index.setdefault(entry.module_index, value[1])
                targets.append(target)
            break
    notes = [
        f"{origin}: rule {quoted(pattern)} matched no upstream parameter in this model"
        for pattern, _, _ in compiled
        if pattern not in used
    ]
    return _components(links, merges, merge_index, upstream, port, notes)


def _components(
    links: dict[tuple[int, int], list[str]],
    merges: dict[str, dict[int, str]],
    merge_index: dict[int, int],
    upstream: Side,
    port: Side,
    notes: list[str],
) -> ParamMapLinks:
    """Connected components of the module link graph: 1-to-1 without merge = pair, else group."""
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(node: tuple[str, int]) -> tuple[str, int]:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for up, port_module in links:
        parent[find(("u", up))] = find(("p", port_module))
    members: dict[tuple[str, int], list[tuple[str, int]]] = defaultdict(list)
    for node in list(parent):
        members[find(node)].append(node)
    pairs: list[tuple[str, str]] = []
    groups: list[Group] = []
    for nodes in sorted(members.values(), key=lambda ns: min(i for s, i in ns if s == "u")):
        ups = sorted(i for s, i in nodes if s == "u")
        ports = sorted(i for s, i in nodes if s == "p")
        merged = sorted({t for (u, p), targets in links.items() if u in ups and p in ports for t in targets})
        if len(ups) == 1 and len(ports) == 1 and not merged:
            pairs.append((upstream.names[ups[0]], port.names[ports[0]]))
            continue
        if merged:
            ups.sort(key=lambda u: (merge_index.get(u, len(ups)), u))
            note = "; ".join(
                f"{target} = cat({', '.join(merges[target][k] for k in sorted(merges[target]))})" for target in merged
            )
        else:
            note = "parameters of these modules are spread across modules of the other side"
        groups.append(
            Group(
                upstream=tuple(upstream.names[u] for u in ups),
                port=tuple(port.names[p] for p in ports),
                source="param_map",
                note=note,
            )
        )
    return ParamMapLinks(pairs=pairs, groups=groups, notes=notes)


def _from_python_file(path: Path, attr: str) -> Any:
    if not path.is_file():
        raise AlignmentError(f"{path}: no such parameter map file")
    spec = importlib.util.spec_from_file_location(f"_tracediff_param_map_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise AlignmentError(f"{path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (ImportError, SyntaxError, NameError) as exc:
        raise AlignmentError(f"{path}: importing it failed ({type(exc).__name__}: {exc})") from None
    if attr:
        return _attribute(module, attr, str(path))
    for name in DEFAULT_ATTRS:
        if hasattr(module, name):
            return getattr(module, name)
    raise AlignmentError(f"{path}: defines none of {', '.join(DEFAULT_ATTRS)}; name the dict as {path}:ATTR")


def _from_module(module_name: str, attr: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AlignmentError(f"param map {module_name}:{attr}: cannot import {module_name!r} ({exc})") from None
    return _attribute(module, attr, module_name)


def _attribute(obj: Any, dotted: str, where: str) -> Any:
    for part in dotted.split("."):
        if not hasattr(obj, part) and isinstance(obj, type) and dataclasses.is_dataclass(obj):
            # FastVideo keeps the map as a dataclass field with a default factory
            # (``WanVideoArchConfig.param_names_mapping``): only instances have it.
            obj = obj()
        if not hasattr(obj, part):
            raise AlignmentError(f"param map {where}:{dotted}: {part!r} not found")
        obj = getattr(obj, part)
    return obj


def _full(module: str, local: str) -> str:
    return f"{module}.{local}" if module else local
