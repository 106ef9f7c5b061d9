"""Explicit mapping files: what a user tells the aligner, and what ``--write`` saves.

A mapping file is TOML or JSON with these top-level keys (all optional)::

    version = 1                      # format version; only 1 exists
    infer = true                     # let fingerprints and structure pair what the map leaves out
    [pairs]                          # exact module names, upstream = port
    "blocks.0.self_attn.o" = "transformer_blocks.0.attn1.to_out"
    [rules]                          # regex (re.fullmatch on upstream names) = template with \\1 backrefs
    'blocks\\.(\\d+)\\.ffn\\.0' = 'transformer_blocks.\\1.ffn.fc_in'
    [ignore]                         # regexes (re.fullmatch) of modules to leave out entirely
    upstream = ['head']
    port = []
    [[groups]]                       # many-to-one: a fused module and its parts
    upstream = ["blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v"]
    port = ["transformer_blocks.0.attn1.to_qkv"]

Everything is checked against the two module tables before anything is
paired: a name that does not exist, a rule that matches nothing, or two
upstream modules sent to one port module is an :class:`AlignmentError` that
names the file, the rule and the modules involved.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from tracediff.align.alignment import Alignment, Group
from tracediff.errors import AlignmentError

MAPPING_VERSION = 1
TOP_LEVEL_KEYS = ("version", "infer", "pairs", "rules", "ignore", "groups")
IGNORE_KEYS = ("upstream", "port")
GROUP_KEYS = ("upstream", "port", "note")


@dataclass
class MappingSpec:
    """A parsed mapping file (or the same content built in Python).

    Attributes:
        pairs: exact ``upstream name -> port name``.
        rules: ``(regex, template)`` in file order; the first rule that
            ``re.fullmatch``-es an upstream name wins.
        ignore_upstream: regexes of upstream modules left out of the alignment.
        ignore_port: regexes of port modules left out of the alignment.
        groups: explicit many-to-one groups, ``(upstream names, port names, note)``.
        infer: whether fingerprints and structure may pair modules the map leaves out.
        origin: where it came from, for error messages.
    """

    pairs: dict[str, str] = field(default_factory=dict)
    rules: list[tuple[str, str]] = field(default_factory=list)
    ignore_upstream: list[str] = field(default_factory=list)
    ignore_port: list[str] = field(default_factory=list)
    groups: list[tuple[tuple[str, ...], tuple[str, ...], str]] = field(default_factory=list)
    infer: bool = True
    origin: str = "<mapping>"


@dataclass
class ResolvedMapping:
    """A :class:`MappingSpec` applied to two concrete module lists."""

    pairs: list[tuple[str, str, str]]  # (upstream, port, "pair" or the rule that produced it)
    groups: list[Group]
    ignored_upstream: set[str]
    ignored_port: set[str]


# -- loading ----------------------------------------------------------------------


def load_mapping(path: str | Path) -> MappingSpec:
    """Read and validate a mapping file (``.toml`` or ``.json``).

    Raises:
        AlignmentError: the file is missing, does not parse (the message gives
            the parser's line and column), or holds an unknown key or a bad value.
    """
    data = read_table_file(path, what="mapping file")
    return parse_mapping(data, origin=str(path))


def read_table_file(path: str | Path, *, what: str) -> dict[str, Any]:
    """Parse a TOML or JSON file into a dict, turning every failure into one clear line."""
    path = Path(path)
    if not path.is_file():
        raise AlignmentError(f"{path}: no such {what}" + (" (it is a directory)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise AlignmentError(f"{path}: a {what} must end in .toml or .json, not {suffix or '(no suffix)'!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AlignmentError(f"{path}: a {what} must be UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise AlignmentError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AlignmentError(f"{path}: not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise AlignmentError(
                f"{path}: not valid JSON: {exc.msg} (at line {exc.lineno}, column {exc.colno})"
            ) from None
        except _DuplicateKey as exc:
            raise AlignmentError(f"{path}: not valid JSON: key {exc.args[0]!r} appears twice") from None
    if not isinstance(data, dict):
        raise AlignmentError(f"{path}: a {what} must hold a table/object at the top, not {type(data).__name__}")
    return data


def parse_mapping(data: Mapping[str, Any], *, origin: str = "<mapping>") -> MappingSpec:
    """Validate the content of a mapping file and build a :class:`MappingSpec`.

    Raises:
        AlignmentError: unknown key, wrong type, or a rule that is not a valid regex.
    """
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise AlignmentError(f"{origin}: unknown key {key!r}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    version = data.get("version", MAPPING_VERSION)
    if version != MAPPING_VERSION:
        raise AlignmentError(f"{origin}: version = {version!r} is not supported; this tracediff reads version 1")
    infer = data.get("infer", True)
    if not isinstance(infer, bool):
        raise AlignmentError(f"{origin}: infer = {infer!r} must be true or false")
    spec = MappingSpec(infer=infer, origin=origin)
    spec.pairs = _string_table(data.get("pairs", {}), origin, "pairs")
    rules = _string_table(data.get("rules", {}), origin, "rules")
    for pattern, template in rules.items():
        _compile(pattern, f"{origin}: rule {quoted(pattern)} = {quoted(template)}")
    spec.rules = list(rules.items())
    ignore = data.get("ignore", {})
    if not isinstance(ignore, dict):
        raise AlignmentError(f"{origin}: [ignore] must be a table with keys {', '.join(IGNORE_KEYS)}")
    for key in ignore:
        if key not in IGNORE_KEYS:
            raise AlignmentError(f"{origin}: unknown key {key!r} in [ignore]; valid keys: {', '.join(IGNORE_KEYS)}")
    spec.ignore_upstream = _string_list(ignore.get("upstream", []), origin, "ignore.upstream")
    spec.ignore_port = _string_list(ignore.get("port", []), origin, "ignore.port")
    for where, patterns in (("ignore.upstream", spec.ignore_upstream), ("ignore.port", spec.ignore_port)):
        for pattern in patterns:
            _compile(pattern, f"{origin}: {where} pattern {quoted(pattern)}")
    spec.groups = _groups(data.get("groups", []), origin)
    return spec


def as_mapping_spec(mapping: MappingSpec | Mapping[str, Any] | str | Path) -> MappingSpec:
    """Accept a spec, the dict a mapping file would hold, or a path to one."""
    if isinstance(mapping, MappingSpec):
        return mapping
    if isinstance(mapping, Mapping):
        return parse_mapping(mapping, origin="<mapping dict>")
    return load_mapping(mapping)


# -- applying ---------------------------------------------------------------------


def resolve_mapping(spec: MappingSpec, upstream_names: list[str], port_names: list[str]) -> ResolvedMapping:
    """Apply a mapping to the two sides' module names, checking every entry.

    Raises:
        AlignmentError: a named module does not exist, a rule or ignore pattern
            matches nothing, a rule's template fails, or two upstream modules
            end up on one port module.
    """
    origin = spec.origin
    up_known, port_known = set(upstream_names), set(port_names)
    ignored_up = _ignored(spec.ignore_upstream, upstream_names, origin, "ignore.upstream", "upstream")
    ignored_port = _ignored(spec.ignore_port, port_names, origin, "ignore.port", "port")
    claimed: dict[str, tuple[str, str]] = {}  # port -> (upstream, how)
    pairs: list[tuple[str, str, str]] = []

    def claim(upstream: str, port: str, how: str) -> None:
        where = "[pairs]" if how == "pair" else f"rule {how}"
        if port in ignored_port:
            raise AlignmentError(f"{origin}: {where} maps {upstream!r} to {port!r}, which [ignore] port leaves out")
        if port in claimed:
            other, other_how = claimed[port]
            via = "[pairs]" if other_how == "pair" else f"rule {other_how}"
            raise AlignmentError(
                f"{origin}: {where} maps {upstream!r} onto port module {port!r}, which {via} already gives to "
                f"{other!r}; one port module takes one upstream module (declare a fused module in [[groups]])"
            )
        claimed[port] = (upstream, how)
        pairs.append((upstream, port, how))

    for upstream, port in spec.pairs.items():
        if upstream == "" or port == "":
            if upstream == port:
                continue
            raise AlignmentError(f"{origin}: [pairs] {upstream!r} = {port!r}: the root '' always pairs with ''")
        _check_exists(upstream, up_known, origin, "[pairs]", "upstream")
        _check_exists(port, port_known, origin, "[pairs]", "port")
        if upstream in ignored_up:
            raise AlignmentError(f"{origin}: [pairs] names {upstream!r}, which [ignore] upstream leaves out")
        claim(upstream, port, "pair")

    compiled = [(pattern, template, re.compile(pattern)) for pattern, template in spec.rules]
    used = [False] * len(compiled)
    for name in upstream_names:
        if name == "":
            continue
        for k, (pattern, template, regex) in enumerate(compiled):
            match = regex.fullmatch(name)
            if match is None:
                continue
            used[k] = True
            if name in spec.pairs or name in ignored_up:
                break
            rule = f"{quoted(pattern)} = {quoted(template)}"
            try:
                target = match.expand(template)
            except (re.error, IndexError) as exc:
                raise AlignmentError(f"{origin}: rule {rule} cannot expand for {name!r}: {exc}") from None
            _check_exists(target, port_known, origin, f"rule {rule} (from {name!r})", "port")
            claim(name, target, rule)
            break
    for k, (pattern, template, _) in enumerate(compiled):
        if not used[k]:
            raise AlignmentError(f"{origin}: rule {quoted(pattern)} = {quoted(template)} matches no upstream module")

    paired_up = {upstream for upstream, _, _ in pairs}
    groups = _resolve_groups(spec, up_known, port_known, paired_up, set(claimed), ignored_up, ignored_port)
    return ResolvedMapping(pairs=pairs, groups=groups, ignored_upstream=ignored_up, ignored_port=ignored_port)


def _resolve_groups(
    spec: MappingSpec,
    up_known: set[str],
    port_known: set[str],
    paired_up: set[str],
    paired_port: set[str],
    ignored_up: set[str],
    ignored_port: set[str],
) -> list[Group]:
    origin = spec.origin
    seen: dict[str, int] = {}
    groups = []
    for number, (ups, ports, note) in enumerate(spec.groups, start=1):
        where = f"[[groups]] #{number}"
        for side, names, known, paired, ignored in (
            ("upstream", ups, up_known, paired_up, ignored_up),
            ("port", ports, port_known, paired_port, ignored_port),
        ):
            for name in names:
                _check_exists(name, known, origin, where, side)
                if name == "":
                    continue  # the root may hold parameters of a module the other side keeps apart
                if name in paired or name in ignored:
                    state = "paired in [pairs]/[rules]" if name in paired else "left out by [ignore]"
                    raise AlignmentError(f"{origin}: {where} lists {side} module {name!r}, which is {state}")
                key = f"{side}:{name}"
                if key in seen:
                    raise AlignmentError(
                        f"{origin}: {side} module {name!r} is in [[groups]] #{seen[key]} and #{number}"
                    )
                seen[key] = number
        groups.append(Group(upstream=tuple(ups), port=tuple(ports), source="map", note=note))
    return groups


# -- writing ----------------------------------------------------------------------


def dump_mapping(alignment: Alignment, *, fmt: str = "toml") -> str:
    """A mapping file that reproduces ``alignment`` exactly when passed back with ``--map``.

    It lists every pair and group explicitly and sets ``infer = false``, so
    reading it back pairs exactly these modules and nothing else. In TOML each
    pair carries the source and confidence it was found with as a comment, so
    a reviewer sees which lines were guesses (JSON has no comments).
    """
    pairs = [pair for pair in alignment.pairs if not (pair.upstream == "" and pair.port == "")]
    if fmt == "json":
        data = {
            "version": MAPPING_VERSION,
            "infer": False,
            "pairs": {pair.upstream: pair.port for pair in pairs},
            "groups": [{"upstream": list(g.upstream), "port": list(g.port), "note": g.note} for g in alignment.groups],
        }
        return json.dumps(data, indent=2) + "\n"
    if fmt != "toml":
        raise ValueError(f"fmt={fmt!r}; use 'toml' or 'json'")
    lines = [
        "# tracediff alignment map: edit freely, then pass back with `tracediff align --map FILE`.",
        "# Every pair is explicit; the comment says how tracediff found it (source, confidence).",
        f"version = {MAPPING_VERSION}",
        "# false: pair exactly what is listed here; true: also infer pairs for modules left out.",
        "infer = false",
        "",
        "[pairs]",
    ]
    for pair in pairs:
        note = f"; {pair.note}" if pair.note else ""
        lines.append(f"{_toml(pair.upstream)} = {_toml(pair.port)}  # {pair.source} {pair.confidence:.2f}{note}")
    for group in alignment.groups:
        lines += ["", "[[groups]]  # " + group.source]
        lines.append(f"upstream = [{', '.join(map(_toml, group.upstream))}]")
        lines.append(f"port = [{', '.join(map(_toml, group.port))}]")
        if group.note:
            lines.append(f"note = {_toml(group.note)}")
    for side, names in (("upstream", alignment.unmatched_upstream), ("port", alignment.unmatched_port)):
        if names:
            lines += ["", f"# unmatched {side} modules ({len(names)}):"]
            lines += [f"#   {name}" for name in names]
    return "\n".join(lines) + "\n"


def write_mapping(alignment: Alignment, path: str | Path) -> Path:
    """Save ``alignment`` as a mapping file; ``.json`` gives JSON, anything else TOML."""
    path = Path(path)
    fmt = "json" if path.suffix.lower() == ".json" else "toml"
    try:
        path.write_text(dump_mapping(alignment, fmt=fmt), encoding="utf-8")
    except OSError as exc:
        raise AlignmentError(f"{path}: cannot write the mapping file ({exc.strerror or exc})") from None
    return path


# -- helpers ----------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _string_table(value: Any, origin: str, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise AlignmentError(f'{origin}: [{where}] must be a table of "name" = "name", not {type(value).__name__}')
    for key, item in value.items():
        if not isinstance(item, str):
            raise AlignmentError(f"{origin}: [{where}] {key!r} = {item!r}: the value must be a string")
    return dict(value)


def _string_list(value: Any, origin: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AlignmentError(f"{origin}: {where} must be a list of regex strings, not {value!r}")
    return list(value)


def _groups(value: Any, origin: str) -> list[tuple[tuple[str, ...], tuple[str, ...], str]]:
    if not isinstance(value, list):
        raise AlignmentError(f"{origin}: groups must be an array of tables ([[groups]]), not {type(value).__name__}")
    out = []
    for number, item in enumerate(value, start=1):
        where = f"[[groups]] #{number}"
        if not isinstance(item, dict):
            raise AlignmentError(f"{origin}: {where} must be a table with keys {', '.join(GROUP_KEYS)}")
        for key in item:
            if key not in GROUP_KEYS:
                raise AlignmentError(f"{origin}: unknown key {key!r} in {where}; valid keys: {', '.join(GROUP_KEYS)}")
        ups = _string_list(item.get("upstream", []), origin, f"{where} upstream")
        ports = _string_list(item.get("port", []), origin, f"{where} port")
        if not ups or not ports:
            raise AlignmentError(f"{origin}: {where} needs module names on both sides (upstream = [...], port = [...])")
        note = item.get("note", "")
        if not isinstance(note, str):
            raise AlignmentError(f"{origin}: {where} note must be a string")
        out.append((tuple(ups), tuple(ports), note))
    return out


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise AlignmentError(f"{where} is not a valid regex ({exc})") from None


def _ignored(patterns: list[str], names: list[str], origin: str, where: str, side: str) -> set[str]:
    out: set[str] = set()
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = {name for name in names if name and regex.fullmatch(name)}
        if not hits:
            raise AlignmentError(f"{origin}: {where} pattern {quoted(pattern)} matches no {side} module")
        out |= hits
    return out


def _check_exists(name: str, known: set[str], origin: str, where: str, side: str) -> None:
    if name in known:
        return
    close = difflib.get_close_matches(name, sorted(known), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise AlignmentError(f"{origin}: {where} names {side} module {name!r}, which the {side} model does not have{hint}")


def quoted(text: str) -> str:
    """A regex or template in quotes as written in the file (``repr`` would double every backslash)."""
    return f"'{text}'"


def _toml(text: str) -> str:
    """A TOML basic string (JSON string syntax is valid TOML for these characters)."""
    return json.dumps(text, ensure_ascii=False)
