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
:class:`~tracediff.align.alignment.Group` instead of a pair.

A table is written for one module; the module traced may be its child or its
parent (the table maps bare ``blocks.0...`` names while the port runs as
``model.blocks.0...`` inside a wrapper, or the other way round). When the table
links fewer than half of the parameters as it stands, prefix offsets read from
the names themselves are tried on each side (:func:`find_offsets`), and one that
links clearly more is applied and named in the notes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracediff.align.alignment import Group
from tracediff.align.mapfile import quoted, read_table_file
from tracediff.align.side import Side
from tracediff.errors import AlignmentError
from tracediff.modtree import ROOT, common_ancestor, join_name

#: Attribute names looked up in a ``.py`` file given without ``:ATTR``.
DEFAULT_ATTRS = ("param_names_mapping", "PARAM_NAMES_MAPPING")

#: Most candidate prefixes tried per side and per kind (strip / add): the search
#: is a fallback for a table that fits badly, it must stay cheap on big models.
MAX_CANDIDATES = 6


@dataclass(frozen=True)
class PrefixOffset:
    """How one side's traced names differ from the table's names by a leading prefix.

    A traced name ``traced + rest`` is the table's ``table + rest``; at most one of
    the two prefixes is non-empty (``traced="model."``: the traced module is a
    wrapper around the table's model; ``table="model."``: the traced module is
    the child the table calls ``model``). Both empty: no offset.
    """

    traced: str = ""
    table: str = ""

    def __bool__(self) -> bool:
        return self.traced != self.table

    def to_table(self, name: str) -> str | None:
        """The table's name for a traced name; ``None`` outside the part the table covers."""
        return self.table + name[len(self.traced) :] if name.startswith(self.traced) else None

    def to_traced(self, name: str) -> str | None:
        """The traced name for a table name; ``None`` outside the traced module."""
        return self.traced + name[len(self.table) :] if name.startswith(self.table) else None

    def describe(self, label: str) -> str:
        return f"{label} modules are traced as '{self.traced}<name>' where the table says '{self.table}<name>'"


@dataclass
class ParamMapLinks:
    """What a parameter map says about modules.

    Attributes:
        pairs: ``(upstream module, port module)`` linked one-to-one.
        groups: modules linked many-to-one (merges, or parameters spread out).
        notes: rules that matched no upstream parameter in this model, and the
            prefix offset applied, if any.
        upstream_offset, port_offset: the prefix offsets applied (empty: none).
    """

    pairs: list[tuple[str, str]]
    groups: list[Group]
    notes: list[str]
    upstream_offset: PrefixOffset = PrefixOffset()
    port_offset: PrefixOffset = PrefixOffset()


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

    When the table as it stands links fewer than half of the parameters and a
    prefix offset on either side links clearly more (:func:`find_offsets`), the
    offset is applied and said in the first note.

    Raises:
        AlignmentError: a rule maps an upstream parameter to a name the port does
            not have (the port's own loader would fail the same way), or a
            template does not expand.
    """
    compiled = [(pattern, value, re.compile(pattern)) for pattern, value in mapping.items()]
    up_offset, port_offset, note = find_offsets(compiled, upstream, port, origin=origin)
    links = _links(compiled, upstream, port, origin, up_offset, port_offset)
    if note:
        links.notes.insert(0, note)
    links.upstream_offset, links.port_offset = up_offset, port_offset
    return links


def _links(
    compiled: Sequence[tuple[str, Any, re.Pattern[str]]],
    upstream: Side,
    port: Side,
    origin: str,
    up_offset: PrefixOffset,
    port_offset: PrefixOffset,
) -> ParamMapLinks:
    port_params = _port_params(port)
    used: set[str] = set()
    links: dict[tuple[int, int], list[str]] = {}  # (upstream, port) module -> merged port tensors
    merges: dict[str, dict[int, str]] = defaultdict(dict)  # merged port tensor -> {merge index: upstream name}
    merge_index: dict[int, int] = {}  # upstream module -> its place in a merge
    for entry in upstream.table.params:
        name = join_name(upstream.names[entry.module_index], entry.name)
        table_name = up_offset.to_table(name)
        if table_name is None:  # outside the model the table is written for
            continue
        for pattern, value, regex in compiled:
            match = regex.match(table_name)
            if match is None:
                continue
            used.add(pattern)
            template = value if isinstance(value, str) else value[0]
            try:
                mapped = match.expand(template)
            except (re.error, IndexError) as exc:
                raise AlignmentError(f"{origin}: rule {quoted(pattern)} cannot expand for {name!r}: {exc}") from None
            target = port_offset.to_traced(mapped)
            if target is None:  # a part of the table's model outside the traced port module
                break
            if target not in port_params:
                traced_as = f" (traced as {target!r})" if port_offset else ""
                raise AlignmentError(
                    f"{origin}: rule {quoted(pattern)} maps upstream parameter {name!r} to {mapped!r}{traced_as}, "
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


# -- prefix offsets ---------------------------------------------------------------


def find_offsets(
    compiled: Sequence[tuple[str, Any, re.Pattern[str]]], upstream: Side, port: Side, *, origin: str
) -> tuple[PrefixOffset, PrefixOffset, str]:
    """The prefix offsets (upstream, port) under which the table links the most parameters.

    Nothing is searched while the table as it stands links at least half of the
    upstream parameters or of the port parameters. Otherwise candidates come from
    the names: on the upstream side, stripping the dotted ancestors of the
    parameter owners' longest common prefix and the leading components of the
    names no rule matches, or adding the leading literal components of the
    rules' regexes; on the port side, for every name the table produces, the
    prefix it lacks or has in excess compared with a port parameter that ends
    the same. The best pair (most upstream parameters linked, then most port
    parameters, then the fewest and shortest prefixes) is taken only if it links
    more parameters than no offset and at least half of one side's parameters.

    Returns:
        ``(upstream offset, port offset, note)``; empty offsets and note when none applies.
    """
    none = PrefixOffset()
    up_total = sum(1 for e in upstream.table.params if e.kind == "parameter")
    port_total = sum(1 for e in port.table.params if e.kind == "parameter")
    port_params = _port_params(port)
    port_parameters = {
        join_name(port.names[e.module_index], e.name) for e in port.table.params if e.kind == "parameter"
    }

    def enough(score: tuple[int, int]) -> bool:
        return 2 * score[0] >= up_total or 2 * score[1] >= port_total

    def score(targets: list[str | None], offset: PrefixOffset) -> tuple[int, int]:
        hits = [offset.to_traced(t) for t in targets if t is not None]
        found = [t for t in hits if t is not None and t in port_params]
        return len(found), len(port_parameters.intersection(found))

    baseline_targets = _targets(compiled, upstream, none)
    baseline = score(baseline_targets, none)
    if up_total == 0 or enough(baseline):
        return none, none, ""
    best: tuple[tuple[int, int, int, int], PrefixOffset, PrefixOffset] | None = None
    for up_offset in [none, *_upstream_candidates(compiled, upstream, baseline_targets)]:
        targets = baseline_targets if not up_offset else _targets(compiled, upstream, up_offset)
        for port_offset in [none, *_port_candidates(targets, port_params)]:
            if not up_offset and not port_offset:
                continue
            linked = score(targets, port_offset)
            changed = bool(up_offset) + bool(port_offset)
            length = sum(len(o.traced) + len(o.table) for o in (up_offset, port_offset))
            key = (linked[0], linked[1], -changed, -length)
            if best is None or key > best[0]:
                best = (key, up_offset, port_offset)
    if best is None:
        return none, none, ""
    (n_up, n_port, _, _), up_offset, port_offset = best
    if n_up <= baseline[0] or not enough((n_up, n_port)):
        return none, none, ""
    said = " and ".join(
        offset.describe(label) for label, offset in (("upstream", up_offset), ("port", port_offset)) if offset
    )
    note = (
        f"{origin}: its names are off by a prefix: {said}; applied the offset "
        f"({n_up} of {up_total} upstream parameters linked, {baseline[0]} without it)"
    )
    return up_offset, port_offset, note


def _targets(
    compiled: Sequence[tuple[str, Any, re.Pattern[str]]], upstream: Side, offset: PrefixOffset
) -> list[str | None]:
    """Per upstream parameter (buffers left out), the table's name for it, or ``None``."""
    out: list[str | None] = []
    for entry in upstream.table.params:
        if entry.kind != "parameter":
            continue
        name = offset.to_table(join_name(upstream.names[entry.module_index], entry.name))
        target = None
        if name is not None:
            for _, value, regex in compiled:
                match = regex.match(name)
                if match is not None:
                    with contextlib.suppress(re.error, IndexError):  # the strict pass names the rule
                        target = match.expand(value if isinstance(value, str) else value[0])
                    break
        out.append(target)
    return out


def _upstream_candidates(
    compiled: Sequence[tuple[str, Any, re.Pattern[str]]], upstream: Side, targets: list[str | None]
) -> list[PrefixOffset]:
    """Offsets worth trying on the upstream side, read from its names and the rules' regexes."""
    names = [
        join_name(upstream.names[e.module_index], e.name) for e in upstream.table.params if e.kind == "parameter"
    ]
    owners = [upstream.names[e.module_index] for e in upstream.table.params if e.kind == "parameter"]
    strip: Counter[str] = Counter()
    shared = common_ancestor(owners) if all(owners) else ROOT
    common = shared.split(".") if shared else []
    for depth in range(1, len(common) + 1):
        strip[".".join(common[:depth]) + "."] += len(names)
    unmatched = [name.split(".") for name, target in zip(names, targets, strict=True) if target is None]
    for parts in unmatched:
        for depth in (1, 2):
            if len(parts) > depth:
                strip[".".join(parts[:depth]) + "."] += 1
    add: Counter[str] = Counter()
    for pattern, _, _ in compiled:
        literal = _literal_prefix(pattern)
        for position, char in enumerate(literal):
            if char == ".":
                add[literal[: position + 1]] += 1
    return [PrefixOffset(traced=p) for p, _ in strip.most_common(MAX_CANDIDATES)] + [
        PrefixOffset(table=p) for p, _ in add.most_common(MAX_CANDIDATES)
    ]


def _port_candidates(targets: list[str | None], port_params: Mapping[str, int]) -> list[PrefixOffset]:
    """Offsets worth trying on the port side: what the table's names lack or have in excess.

    For a produced name ``a + rest`` and a port parameter ``b + rest`` (``rest`` at
    least a module and a parameter name), ``a`` -> ``b`` is a candidate when one of
    them is empty; candidates are ranked by how many produced names they resolve.
    """
    by_suffix: dict[str, set[str]] = defaultdict(set)
    for name in port_params:
        parts = name.split(".")
        for depth in range(len(parts) - 1):
            by_suffix[".".join(parts[depth:])].add(".".join(parts[:depth]) + "." if depth else "")
    support: Counter[PrefixOffset] = Counter()
    for target in targets:
        if target is None or target in port_params:
            continue
        parts = target.split(".")
        for depth in range(len(parts) - 1):
            lacks = ".".join(parts[:depth]) + "." if depth else ""
            for has in by_suffix.get(".".join(parts[depth:]), ()):
                if (lacks == "") != (has == ""):
                    support[PrefixOffset(traced=has, table=lacks)] += 1
    return [offset for offset, _ in support.most_common(MAX_CANDIDATES)]


def _literal_prefix(pattern: str) -> str:
    """The literal start of a regex, dots unescaped: ``^blocks\\.(\\d+)`` -> ``blocks.``."""
    out: list[str] = []
    i = 1 if pattern.startswith("^") else 0
    while i < len(pattern):
        char = pattern[i]
        if char.isalnum() or char in "_-":
            literal, step = char, 1
        elif char == "\\" and pattern[i + 1 : i + 2] in (".", "_", "-"):
            literal, step = pattern[i + 1], 2
        elif char == ".":  # an unescaped dot in a name regex almost always means a dot
            literal, step = ".", 1
        else:
            break
        if pattern[i + step : i + step + 1] in ("?", "*", "+", "{"):  # the character is optional or repeated
            break
        out.append(literal)
        i += step
    return "".join(out)


def _port_params(port: Side) -> dict[str, int]:
    return {join_name(port.names[e.module_index], e.name): e.module_index for e in port.table.params}


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
