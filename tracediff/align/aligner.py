"""Align two models: which upstream module computes what which port module computes.

Evidence is used strongest first, and each stage only sees what earlier
stages left unpaired:

1. ``root``: the two models themselves.
2. ``map``: an explicit mapping file (exact pairs, regex rules, ignore lists, groups).
3. ``param_map``: the port's checkpoint-conversion table (FastVideo's ``param_names_mapping``).
4. ``fingerprint``: modules whose own weights hold the same values; fused
   projections (``to_qkv`` = ``q`` + ``k`` + ``v``) become groups; identical
   weights (shared, zero-initialised) are split by order or left unmatched.
   Parameter-free containers whose children all pair into one module pair too.
5. ``name``: a module that owns weights whose values match nothing (the port
   converted them wrong) still pairs with the module of the same name, class
   and parameter shapes: the module that holds a bug must never drop out.
6. ``structure``: what is left and ran is paired by order between anchors and
   by equal output shapes, with confidence at most 0.6.
7. ``values`` (traces only): what each module computed in its first call
   confirms, replaces or drops the pairs of the two weakest stages and pairs
   modules without weights of different extent (:mod:`tracediff.align.values`);
   a pair the values contradict and nothing explains is an *alignment suspect*.

Everything works from two trace files alone (the module tables carry the
weight fingerprints); :func:`align_models` does the same for live models, with
definition order standing in for execution order.
"""

from __future__ import annotations

import functools
import json
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracediff.align.alignment import NEVER_CALLED, SOURCES, Alignment, Group, Pair, Suspect
from tracediff.align.fingerprint import FingerprintIndex, FusedShortlist, find_fused
from tracediff.align.mapfile import (
    MappingSpec,
    ResolvedMapping,
    as_mapping_spec,
    dump_mapping,
    load_mapping,
    parse_mapping,
    resolve_mapping,
    write_mapping,
)
from tracediff.align.order import OrderedPair, pair_by_order, pair_by_rank
from tracediff.align.parammap import load_param_map, param_map_links, validate_param_map
from tracediff.align.side import Side, side_from_model, side_from_trace
from tracediff.align.values import ValueStage, apply_value_evidence
from tracediff.modtree import ROOT, ancestors, common_ancestor, is_within, local_name, parent
from tracediff.store.trace import ModuleTable, Trace

if TYPE_CHECKING:  # torch is imported only to trace or to align live models, never to read traces
    from torch import nn

__all__ = [
    "MappingSpec",
    "align",
    "align_models",
    "align_sides",
    "alignment_to_dict",
    "coverage",
    "dump_mapping",
    "load_mapping",
    "load_param_map",
    "parse_mapping",
    "write_mapping",
]

#: Confidence of each kind of evidence (structure is graded lower inside its stage).
CONFIDENCE = {
    "root": 1.0,
    "map": 1.0,
    "param_map": 0.95,
    "fingerprint": 0.9,
    "fingerprint_converted": 0.85,
    "fingerprint_tie": 0.7,
    "container": 0.85,
    "enclosing": 0.8,
    "values": 0.8,
    "name": 0.5,
}
#: Added to the note of a pair made by order or through its children when its outputs hold the same values.
VALUES_AGREE = "values agree"
#: Notes of pairs whose evidence is order, shape or children only: value evidence may overrule them.
CONTAINER_NOTE = "paired through the modules inside it"


def align(
    upstream: Trace,
    port: Trace,
    *,
    mapping: MappingSpec | Mapping[str, Any] | str | Path | None = None,
    param_map: Mapping[str, Any] | str | Path | None = None,
) -> Alignment:
    """Align two traces (upstream reference and port) from their files' content alone.

    Args:
        upstream: the reference side's trace.
        port: the port's trace.
        mapping: an explicit mapping (:class:`MappingSpec`, the dict a mapping file
            holds, or a path to a ``.toml``/``.json`` mapping file).
        param_map: the port's ``param_names_mapping`` (a dict, or anything
            :func:`load_param_map` reads).

    Returns:
        The :class:`~tracediff.align.alignment.Alignment`.

    Raises:
        AlignmentError: the mapping or parameter map is invalid or does not fit these models.
    """
    return align_sides(
        side_from_trace(upstream, "upstream"), side_from_trace(port, "port"), mapping=mapping, param_map=param_map
    )


def align_models(
    upstream: nn.Module,
    port: nn.Module,
    *,
    mapping: MappingSpec | Mapping[str, Any] | str | Path | None = None,
    param_map: Mapping[str, Any] | str | Path | None = None,
) -> Alignment:
    """Align two live models without running them (for the runner and bisection).

    Same sources as :func:`align`; the structure stage uses definition order and
    ``torch.nn`` layer types instead of execution order and output shapes.
    """
    return align_sides(
        side_from_model(upstream, "upstream"), side_from_model(port, "port"), mapping=mapping, param_map=param_map
    )


def align_sides(
    upstream: Side,
    port: Side,
    *,
    mapping: MappingSpec | Mapping[str, Any] | str | Path | None = None,
    param_map: Mapping[str, Any] | str | Path | None = None,
) -> Alignment:
    """Run every stage on two prepared sides (see :mod:`tracediff.align.side`)."""
    spec = as_mapping_spec(mapping) if mapping is not None else None
    state = _State(upstream, port)
    if ROOT in upstream.index and ROOT in port.index:
        state.add_pair(upstream.index[ROOT], port.index[ROOT], "root", CONFIDENCE["root"])
    if spec is not None:
        _apply_mapping(state, resolve_mapping(spec, upstream.names, port.names))
    if param_map is not None:
        _apply_param_map(state, param_map)
    if spec is None or spec.infer:
        _fingerprints(state)
        _containers(state)
        _same_name(state)
        _structure(state)
        _containers(state)
        if _values(state):  # the values' pairs are anchors: what is left is paired again in shorter stretches
            _structure(state)
            _containers(state)
            _values(state)
    return state.result()


# -- bookkeeping ------------------------------------------------------------------


class _State:
    """Pairs and groups found so far, and which modules are still free."""

    def __init__(self, upstream: Side, port: Side) -> None:
        self.up = upstream
        self.port = port
        self.pairs: dict[int, Pair] = {}
        self.port_partner: dict[int, int] = {}
        self.up_partner: dict[int, int] = {}
        self.groups: list[tuple[list[int], list[int], Group]] = []
        self.grouped_up: set[int] = set()
        self.grouped_port: set[int] = set()
        self.ignored_up: set[int] = set()
        self.ignored_port: set[int] = set()
        self.notes: list[str] = []
        self.suspects: list[Suspect] = []
        # Modules whose traced values equal a module's on the other side without being its pair
        # (wrappers, modules of another extent): explained, never paired by order and shape.
        self.explained_up: set[int] = set()
        self.explained_port: set[int] = set()
        # Modules whose weights equal some module's on the other side: if still
        # unpaired after the fingerprint stage they are ambiguous twins, and
        # pairing them by order and shape would only dress a guess up as evidence.
        self.weight_twins_up: set[int] = set()
        self.weight_twins_port: set[int] = set()

    def free_up(self, module: int) -> bool:
        return module not in self.up_partner and module not in self.grouped_up and module not in self.ignored_up

    def free_port(self, module: int) -> bool:
        return module not in self.port_partner and module not in self.grouped_port and module not in self.ignored_port

    def add_pair(self, up: int, port: int, source: str, confidence: float, note: str = "") -> None:
        self.up_partner[up] = port
        self.port_partner[port] = up
        self.pairs[up] = Pair(self.up.names[up], self.port.names[port], source, round(confidence, 3), note)

    def remove_pair(self, up: int) -> None:
        port = self.up_partner.pop(up)
        del self.port_partner[port]
        del self.pairs[up]

    def weak(self, up: int) -> bool:
        """The pair rests on order, shape or its children only (value evidence may overrule it)."""
        pair = self.pairs.get(up)
        return pair is not None and (pair.source == "structure" or pair.note == CONTAINER_NOTE)

    def add_group(self, ups: list[int], ports: list[int], source: str, note: str) -> None:
        group = Group(tuple(self.up.names[u] for u in ups), tuple(self.port.names[p] for p in ports), source, note)
        self.groups.append((ups, ports, group))
        self.grouped_up.update(u for u in ups if u not in self.up_partner)
        self.grouped_port.update(p for p in ports if p not in self.port_partner)

    def result(self) -> Alignment:
        up_key = _order_key(self.up)
        port_key = _order_key(self.port)
        pairs = [self.pairs[u] for u in sorted(self.pairs, key=up_key)]
        groups = [g for ups, _, g in sorted(self.groups, key=lambda item: up_key(min(item[0], key=up_key)))]
        return Alignment(
            pairs=pairs,
            groups=groups,
            unmatched_upstream=[
                self.up.names[m] for m in sorted(range(len(self.up.names)), key=up_key) if self.free_up(m)
            ],
            unmatched_port=[
                self.port.names[m] for m in sorted(range(len(self.port.names)), key=port_key) if self.free_port(m)
            ],
            notes=list(self.notes),
            suspects=list(self.suspects),
        )


def _order_key(side: Side) -> Any:
    """Execution order first (where known), then definition order."""
    return lambda module: (side.exec_order.get(module, len(side.names) + module), module)


# -- explicit sources ---------------------------------------------------------------


def _apply_mapping(state: _State, resolved: ResolvedMapping) -> None:
    up, port = state.up, state.port
    state.ignored_up = {up.index[name] for name in resolved.ignored_upstream}
    state.ignored_port = {port.index[name] for name in resolved.ignored_port}
    for upstream, port_name, how in resolved.pairs:
        note = "" if how == "pair" else f"rule {how}"
        state.add_pair(up.index[upstream], port.index[port_name], "map", CONFIDENCE["map"], note)
    for group in resolved.groups:
        state.add_group([up.index[n] for n in group.upstream], [port.index[n] for n in group.port], "map", group.note)


def _apply_param_map(state: _State, param_map: Mapping[str, Any] | str | Path) -> None:
    if isinstance(param_map, Mapping):
        origin, table = "param map", validate_param_map(param_map, origin="param map")
    else:
        origin, table = str(param_map), load_param_map(param_map)
    up, port = state.up, state.port
    links = param_map_links(table, up, port, origin=origin)
    state.notes += links.notes
    for up_name, port_name in links.pairs:
        u, p = up.index[up_name], port.index[port_name]
        if state.up_partner.get(u) == p:
            continue
        if state.free_up(u) and state.free_port(p):
            if not _pair_enclosing(state, u, p, "param_map"):
                state.add_pair(u, p, "param_map", CONFIDENCE["param_map"])
        elif state.free_up(u) and port_name == ROOT:
            state.add_group([u], [p], "param_map", f"{up_name}'s parameters live in the port's top-level module")
        elif state.free_port(p) and up_name == ROOT:
            state.add_group([u], [p], "param_map", f"the upstream top-level module's parameters live in {port_name}")
        else:
            state.notes.append(
                f"{origin}: links {up_name!r} with {port_name!r}, but the mapping file decides otherwise"
            )
    for group in links.groups:
        ups = [up.index[n] for n in group.upstream]
        ports = [port.index[n] for n in group.port]
        if all(state.free_up(u) for u in ups) and all(state.free_port(p) for p in ports):
            state.add_group(ups, ports, "param_map", group.note)
        else:
            state.notes.append(f"{origin}: group {group.upstream} -> {group.port} overlaps the mapping file; skipped")


# -- weights ----------------------------------------------------------------------


def _fingerprints(state: _State) -> None:
    up, port = state.up, state.port
    index = FingerprintIndex(up, port, skip_upstream=state.ignored_up, skip_port=state.ignored_port)
    state.weight_twins_up = set(index.candidates)
    state.weight_twins_port = set(index.reverse)
    for u, candidates in sorted(index.candidates.items()):
        free = [p for p in candidates if state.free_port(p)]
        if not state.free_up(u) or len(free) != 1:
            continue
        p = free[0]
        if [v for v in index.reverse[p] if state.free_up(v)] != [u]:
            continue
        how = candidates[p]
        key = "fingerprint" if how.exact else "fingerprint_converted"
        if _pair_enclosing(state, u, p, "fingerprint"):
            continue
        state.add_pair(u, p, "fingerprint", CONFIDENCE[key], how.detail)
    _uncross(state)
    _fused(state, index)
    _containers(state)
    _ties(state, index)
    _weights_in_root(state, index)


def _uncross(state: _State) -> None:
    """Two sibling pairs whose weights match crosswise (port ``wi_0`` holds upstream ``wi_1``'s and the other
    way round) are two weights swapped in conversion, not two renamed modules: pair them by name.

    The port's code calls its modules by their names (``act(wi_0(x)) * wi_1(x)``),
    so the module that holds the wrong weights is the one to blame; paired by
    weights, both outputs would agree and the difference would surface only
    later, in code that did nothing wrong.
    """
    up, port = state.up, state.port
    by_place: dict[tuple[str, str, str], int] = {}
    for u, pair in state.pairs.items():
        if pair.source == "fingerprint" and pair.upstream and pair.port:
            by_place[(parent(pair.upstream), parent(pair.port), local_name(pair.upstream))] = u
    for u1, pair in list(state.pairs.items()):
        if pair.source != "fingerprint" or not pair.upstream or not pair.port:
            continue
        u_local, p_local = local_name(pair.upstream), local_name(pair.port)
        if u_local == p_local:
            continue
        u2 = by_place.get((parent(pair.upstream), parent(pair.port), p_local))
        if u2 is None or u2 == u1 or u2 not in state.pairs or local_name(state.pairs[u2].port) != u_local:
            continue
        p1, p2 = state.up_partner[u1], state.up_partner[u2]
        if up.param_shapes(u1) != up.param_shapes(u2) or port.param_shapes(p1) != port.param_shapes(p2):
            continue
        note = "weights match the other sibling's counterpart: swapped in conversion? paired by name"
        state.remove_pair(u1)
        state.remove_pair(u2)
        state.add_pair(u1, p2, "name", CONFIDENCE["name"], note)
        state.add_pair(u2, p1, "name", CONFIDENCE["name"], note)


def _fused(state: _State, index: FingerprintIndex) -> None:
    """Groups for fused modules, either way round (port ``to_qkv`` or upstream ``qkv``)."""
    up, port = state.up, state.port

    def unexplained_up(u: int) -> bool:
        return (
            state.free_up(u)
            and bool(up.identity[u])
            and not any(state.free_port(p) for p in index.candidates.get(u, {}))
        )

    def unexplained_port(p: int) -> bool:
        return (
            state.free_port(p)
            and bool(port.identity[p])
            and not any(state.free_up(u) for u in index.reverse.get(p, {}))
        )

    # Positions and the available parts are computed once per direction and kept up to date as
    # groups form: recomputing them for every candidate is quadratic in the model's size.
    positions = {id(up): _positions(up), id(port): _positions(port)}
    for fused_side, parts_side, fused_free, parts_free, upstream_is_fused in (
        (port, up, unexplained_port, unexplained_up, False),
        (up, port, unexplained_up, unexplained_port, True),
    ):
        order = positions[id(parts_side)]
        available = {m for m in range(len(parts_side.names)) if parts_free(m)}
        shortlist = FusedShortlist(parts_side)
        for fused in range(len(fused_side.names)):
            if not fused_free(fused):
                continue
            parts = find_fused(fused_side, fused, parts_side, shortlist.among(available, fused_side, fused), order,
                               checked=True)
            if parts is None:
                continue
            names = ", ".join(parts_side.names[m] for m in parts)
            note = f"{fused_side.names[fused]} = cat({names}) along dim 0"
            _check_fused_order(state, fused_side, fused, parts_side, parts, order)
            if upstream_is_fused:
                state.add_group([fused], parts, "fingerprint", note)
            else:
                state.add_group(parts, [fused], "fingerprint", note)
            # Only the parts (now grouped) and the modules whose candidates include the fused one
            # (now grouped too) can have changed whether they are available.
            neighbours = index.candidates.get(fused, {}) if upstream_is_fused else index.reverse.get(fused, {})
            for m in {*parts, *neighbours}:
                if parts_free(m):
                    available.add(m)
                else:
                    available.discard(m)


def _check_fused_order(
    state: _State, fused_side: Side, fused: int, parts_side: Side, parts: list[int], order: dict[int, float]
) -> None:
    """A fused tensor stacked in another order than its parts run (``cat(q, v, k)``) is an alignment suspect.

    The values fit either order, so the group stands; but a port computes q, k
    and v by slicing the fused output in its own fixed order, so a stack in
    another order than the parts run upstream is how a k/v swap in conversion looks.
    """
    ran_in = sorted(parts, key=lambda m: (order[m], m))
    if ran_in == parts:
        return
    stacked = ", ".join(local_name(parts_side.names[m]) for m in parts)
    runs = ", ".join(local_name(parts_side.names[m]) for m in ran_in)
    port_is_fused = fused_side is state.port
    up_name = parent(parts_side.names[parts[0]]) if port_is_fused else fused_side.names[fused]
    port_name = fused_side.names[fused] if port_is_fused else parent(parts_side.names[parts[0]])
    reason = (f"{fused_side.names[fused]} holds its parts stacked as cat({stacked}), but they run as ({runs}): "
              "pieces swapped in conversion?")
    ups, ports = ([parts_side.names[m] for m in parts], [fused_side.names[fused]]) if port_is_fused else (
        [fused_side.names[fused]], [parts_side.names[m] for m in parts])
    line = f"[[groups]] upstream = {json.dumps(ups)} port = {json.dumps(ports)}"
    state.suspects.append(Suspect(up_name, port_name, math.inf, reason, map_line=line))


def _ties(state: _State, index: FingerprintIndex) -> None:
    """Modules with identical weights (shared, zero- or one-initialised): split by order or left alone."""
    up, port = state.up, state.port
    graph: dict[tuple[str, int], set[tuple[str, int]]] = defaultdict(set)
    for u, candidates in index.candidates.items():
        if not state.free_up(u):
            continue
        for p in candidates:
            if state.free_port(p):
                graph[("u", u)].add(("p", p))
                graph[("p", p)].add(("u", u))
    component: dict[tuple[str, int], int] = {}
    for start in graph:
        if start in component:
            continue
        stack, component[start] = [start], len(component)
        label = component[start]
        while stack:
            for nxt in graph[stack.pop()]:
                if nxt not in component:
                    component[nxt] = label
                    stack.append(nxt)
    members: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for node, label in component.items():
        members[label].append(node)
    by_exec: list[tuple[str, int]] = []
    by_definition: list[tuple[str, int]] = []
    for nodes in members.values():
        ran = all((up if s == "u" else port).ran(i) for s, i in nodes)
        (by_exec if ran else by_definition).extend(nodes)
    for nodes, use_exec in ((by_exec, True), (by_definition, False)):
        ups = {i: _position(up, i, use_exec) for s, i in nodes if s == "u"}
        ports = {i: _position(port, i, use_exec) for s, i in nodes if s == "p"}
        if not ups or not ports:
            continue
        # Definition order is only trusted inside one aligned parent: a port may
        # declare attn2 before attn1, so anchors across the model would cross.
        if use_exec:
            found = pair_by_order(
                ups, ports, _anchors(state, use_exec), lambda u: component[("u", u)], lambda p: component[("p", p)]
            )
        else:
            found = pair_by_rank(
                ups,
                ports,
                lambda u: (component[("u", u)], _scope(state, u, upstream=True)),
                lambda p: (component[("p", p)], _scope(state, p, upstream=False)),
            )
        for item in found:
            size = len([n for n in members[component[("u", item.upstream)]] if n[0] == "u"])
            if use_exec:
                note = f"{size} upstream modules hold these weights; chosen by execution order between aligned modules"
                confidence = CONFIDENCE["fingerprint_tie"]
            else:
                note = f"{size} upstream modules hold these weights; chosen by definition order within aligned parents"
                confidence = CONFIDENCE["fingerprint_tie"] - 0.1
            state.add_pair(item.upstream, item.port, "fingerprint", confidence, note)


def _scope(state: _State, module: int, *, upstream: bool) -> int | None:
    """The nearest aligned ancestor of a module, named by its upstream index on both sides."""
    side = state.up if upstream else state.port
    name = side.names[module]
    while name != ROOT:
        name = parent(name)
        ancestor = side.index.get(name)
        if ancestor is None:
            continue
        if upstream and ancestor in state.up_partner:
            return ancestor
        if not upstream and ancestor in state.port_partner:
            return state.port_partner[ancestor]
    return None


def _weights_in_root(state: _State, index: FingerprintIndex) -> None:
    """A module whose only weight match is the other side's top-level module becomes a group with it.

    Upstream keeps a head's modulation table in ``head``; a port may keep it
    in the model itself. The root is paired with the root, so this is reported
    as a group rather than lost.
    """
    up, port = state.up, state.port
    root_up, root_port = up.index.get(ROOT), port.index.get(ROOT)
    if root_up is None or root_port is None:
        return
    for u, candidates in index.candidates.items():
        if state.free_up(u) and list(candidates) == [root_port]:
            state.add_group(
                [u], [root_port], "fingerprint", f"{up.names[u]}'s weights live in the port's top-level module"
            )
    for p, candidates in index.reverse.items():
        if state.free_port(p) and list(candidates) == [root_up]:
            state.add_group(
                [root_up], [p], "fingerprint", f"the upstream top-level module's weights live in {port.names[p]}"
            )


def _pair_enclosing(state: _State, up_module: int, port_module: int, source: str) -> bool:
    """Same weights, different outputs: pair the module that does more with the other's parent.

    torchvision's ``nn.MultiheadAttention`` owns the fused in-projection that
    timm keeps in ``attn.qkv``, but returns the attention's output, which timm's
    ``attn`` (the parent of ``qkv``) returns. When the two modules' outputs hold
    different numbers of elements and exactly one of them has a free,
    parameter-free parent whose output has the other's shapes, that parent is
    paired instead; the module inside it has no counterpart. Returns whether a
    pair was made.
    """
    up, port = state.up, state.port
    up_sig, port_sig = up.signature.get(up_module), port.signature.get(port_module)
    if not up_sig or not port_sig or _elements(up_sig) == _elements(port_sig):
        return False
    found = []
    for side, module, target, is_free in (
        (up, up_module, port_sig, state.free_up),
        (port, port_module, up_sig, state.free_port),
    ):
        enclosing = side.index.get(parent(side.names[module]))
        if (
            enclosing is not None
            and side.names[enclosing] != ROOT
            and is_free(enclosing)
            and not side.owns_params(enclosing)
            and side.signature.get(enclosing) == target
        ):
            found.append((enclosing, port_module) if side is up else (up_module, enclosing))
    if len(found) != 1:
        return False
    u, p = found[0]
    names = (up.names[up_module], port.names[port_module])
    holder, inner = (names[1], names[0]) if u != up_module else names
    state.add_pair(u, p, source, CONFIDENCE["enclosing"],
                   f"{holder} holds the weights of {inner}, whose output differs; paired with {inner}'s parent")
    return True


def _elements(signature: tuple[tuple[int, ...], ...]) -> int:
    total = 0
    for shape in signature:
        size = 1
        for dim in shape:
            size *= dim
        total += size
    return total


# -- same name, weights differ ----------------------------------------------------------


def _same_name(state: _State) -> None:
    """Pair a weight owner whose values match nothing with the port module of the same name and shapes.

    Fingerprints fail exactly where the port converted a weight wrong; without
    this the buggy module would drop out of the comparison and its parent would
    take the blame. The same qualified name with the same parameters (names and
    shapes: a ``Linear`` and FastVideo's ``ReplicatedLinear`` are the same kind of
    layer) is strong evidence even when the values differ, and the difference is
    itself the finding (the pre-flight names the parameter).
    """
    up, port = state.up, state.port
    for u, name in enumerate(up.names):
        if name == ROOT or not state.free_up(u) or not up.owns_params(u):
            continue
        p = port.index.get(name)
        if p is None or not state.free_port(p) or not port.owns_params(p):
            continue
        if _own_params(up, u) != _own_params(port, p):  # same parameter names and shapes: the same kind of layer
            continue
        state.add_pair(u, p, "name", CONFIDENCE["name"], "same name, class and parameter shapes; weights differ")


def _own_params(side: Side, module: int) -> list[tuple[str, tuple[int, ...]]]:
    """``(local name, shape)`` of the module's own parameters and buffers, sorted."""
    return sorted((side.table.params[row].name.rsplit(".", 1)[-1], side.table.params[row].shape)
                  for row in side.identity[module])


# -- values ---------------------------------------------------------------------------------


def _values(state: _State) -> bool:
    """Let the traced values confirm, replace or drop the weakest pairs (see :mod:`tracediff.align.values`)."""
    stage = ValueStage(
        up=state.up,
        port=state.port,
        pairs=dict(state.up_partner),
        weak={u for u in state.pairs if state.weak(u)},
        free_up=state.free_up,
        free_port=state.free_port,
        twins_up=state.weight_twins_up,
        twins_port=state.weight_twins_port,
        suspect_ports={state.port.index[s.port] for s in state.suspects},
    )
    outcome = apply_value_evidence(stage)
    for u, _ in outcome.drop:
        if u in state.pairs:
            state.remove_pair(u)
    for suspect in outcome.suspects:  # never paired again by order and shape
        state.explained_up.add(state.up.index[suspect.upstream])
        state.explained_port.add(state.port.index[suspect.port])
    for u, p, note in outcome.add:
        if state.free_up(u) and state.free_port(p):
            state.add_pair(u, p, "values", CONFIDENCE["values"], note)
    for u in outcome.confirmed:
        pair = state.pairs.get(u)
        if pair is not None and not pair.note.endswith(VALUES_AGREE):
            state.pairs[u] = replace(pair, note=f"{pair.note}; {VALUES_AGREE}")  # confidence stays its source's
    known = {(s.upstream, s.port) for s in state.suspects}
    state.suspects += [s for s in outcome.suspects if (s.upstream, s.port) not in known]
    state.explained_up |= outcome.explained_up
    state.explained_port |= outcome.explained_port
    return bool(outcome.add or outcome.drop)


# -- containers -------------------------------------------------------------------


def _containers(state: _State) -> None:
    """Pair parameter-free containers whose paired descendants all land inside one module.

    ``self_attn`` pairs with ``attn1`` when every module under ``self_attn``
    pairs (or groups) with modules under ``attn1`` and vice versa. When all
    descendants land on one module that is itself paired (a wrapper around a
    single layer), its parent is the candidate.
    """
    up, port = state.up, state.port
    changed = True
    while changed:  # one sweep per round, deepest first; a new pair can only help its ancestors
        changed = False
        images_up, images_port = _images(state)
        for u in sorted(range(len(up.names)), key=lambda m: -up.names[m].count(".")):
            if u == up.index.get(ROOT) or not state.free_up(u) or up.identity[u]:
                continue
            p = _container_candidate(up.names[u], up, port, images_up, state.free_port)
            if p is None or port.identity[p]:
                continue
            if _container_candidate(port.names[p], port, up, images_port, state.free_up) != u:
                continue
            relations = images_up.get(up.names[u], [])
            source = max((r[1] for r in relations), key=SOURCES.index)
            confidence = min([CONFIDENCE["container"], *(r[2] for r in relations)])
            state.add_pair(u, p, source, confidence, CONTAINER_NOTE)
            changed = True


def _images(state: _State) -> tuple[dict[str, list[tuple[int, str, float]]], dict[str, list[tuple[int, str, float]]]]:
    """For every module, the other side's partners of the modules below it: ``(module, source, confidence)``."""
    up, port = state.up, state.port
    below_up: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
    below_port: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
    for ups, ports, source, confidence in _relations(state):
        if up.index.get(ROOT) in ups or port.index.get(ROOT) in ports:
            continue
        # one list of (immutable) entries per relation, appended to every ancestor: no copy per ancestor
        to_port = [(p, source, confidence) for p in ports]
        to_up = [(u, source, confidence) for u in ups]
        for u in ups:
            for ancestor in _ancestors(up.names[u]):
                below_up[ancestor].extend(to_port)
        for p in ports:
            for ancestor in _ancestors(port.names[p]):
                below_port[ancestor].extend(to_up)
    return below_up, below_port


def _relations(state: _State) -> list[tuple[list[int], list[int], str, float]]:
    out = [([u], [state.up_partner[u]], pair.source, pair.confidence) for u, pair in state.pairs.items()]
    out += [(ups, ports, group.source, CONFIDENCE["container"]) for ups, ports, group in state.groups]
    return out


def _container_candidate(
    name: str, side: Side, other: Side, images: dict[str, list[tuple[int, str, float]]], is_free: Any
) -> int | None:
    found = images.get(name)
    if not found:
        return None
    targets = sorted({other.names[m] for m, _, _ in found})
    candidate = common_ancestor(targets, other.index)
    container = side.short_class(side.index[name]) in NEVER_CALLED  # a ModuleList may pair with a ModuleList
    while not container and candidate != ROOT and other.short_class(other.index[candidate]) in NEVER_CALLED:
        candidate = parent(candidate)  # a ModuleList is never called: the module that calls its items is
        if candidate not in other.index:
            return None
    if not is_free(other.index[candidate]):
        if candidate == ROOT:
            return None
        candidate = parent(candidate)
        if candidate not in other.index or not is_free(other.index[candidate]):
            return None
    return other.index[candidate]


#: :func:`tracediff.modtree.ancestors`, remembered: every round asks again for the same names.
_ancestors = functools.lru_cache(maxsize=1 << 16)(ancestors)


# -- structure --------------------------------------------------------------------


def _structure(state: _State) -> None:
    """Pair what is left by order and equal outputs (traces) or layer types (models).

    With traces: first across the whole model between anchors; then, for what
    is still left, among the direct children of each aligned pair of modules,
    between the aligned modules inside those two (anchors that the whole-model
    pass had to drop because they cross elsewhere count again). Without traces
    (live models), only look-alikes under the same aligned parent are matched,
    by rank in definition order.
    """
    # Pass-through layers (dropout in eval, Identity placeholders) are look-alikes of
    # the layer before them; held back in a first round they cannot make a stretch
    # ambiguous (timm's act, drop1, norm against one GELU elsewhere), then get their
    # own round between the anchors the first one found.
    if state.up.passthrough or state.port.passthrough:
        _structure_round(state, hold_back=True)
    _structure_round(state, hold_back=False)


def _structure_round(state: _State, *, hold_back: bool) -> None:
    up, port = state.up, state.port
    use_exec = bool(up.exec_order) and bool(port.exec_order)
    what = "execution order and output shapes" if use_exec else "definition order and layer type"

    def eligible(side: Side, module: int, is_free: Any) -> bool:
        twins = state.weight_twins_up if side is up else state.weight_twins_port
        explained = state.explained_up if side is up else state.explained_port
        return (
            side.names[module] != ROOT
            and is_free(module)
            and module not in twins
            and module not in explained
            and (side.ran(module) or not use_exec)
            and not (hold_back and module in side.passthrough)
        )

    # A side without weights (a FastVideo JSONL trace) cannot say which modules own parameters.
    weights_known = bool(up.table.params) and bool(port.table.params)

    def key(side: Side) -> Any:
        def of(module: int) -> Any:
            shape = side.signature.get(module) if use_exec else side.kinds[module]
            if use_exec and not shape:
                return None
            if not weights_known or not side.owns_params(module):
                return (shape, ())
            return (shape, tuple(sorted(_numel(side, row) for row in side.identity[module])))

        return of

    def accept(found: list[OrderedPair], where: str, penalty: float) -> int:
        for item in found:
            u, p = item.upstream, item.port
            if up.owns_params(u) and weights_known:
                state.add_pair(u, p, "structure", 0.4 - penalty, f"by {what}{where}; their weights differ")
                continue
            confidence = (0.6 if item.class_size == 1 else 0.5) - penalty
            if up.short_class(u) != port.short_class(p):
                confidence -= 0.1
            state.add_pair(u, p, "structure", confidence, f"by {what}{where}")
        return len(found)

    ups = {m: _position(up, m, use_exec) for m in range(len(up.names)) if eligible(up, m, state.free_up)}
    ports = {m: _position(port, m, use_exec) for m in range(len(port.names)) if eligible(port, m, state.free_port)}
    if not use_exec:
        # Definition order says little across the model (declaration order is a
        # style choice), so only look-alikes under one aligned parent are matched.
        found = pair_by_rank(
            ups,
            ports,
            lambda u: (key(up)(u), _scope(state, u, upstream=True)),
            lambda p: (key(port)(p), _scope(state, p, upstream=False)),
        )
        accept(found, " within aligned parents", 0.1)
        return
    accept(pair_by_order(ups, ports, _anchors(state, use_exec), key(up), key(port)), "", 0.0)

    children_up, children_port = _children(up), _children(port)
    changed = True
    while changed:
        changed = False
        for u, p in sorted(state.up_partner.items()):
            kids_up = {m: _position(up, m, use_exec) for m in children_up[u] if eligible(up, m, state.free_up)}
            kids_port = {
                m: _position(port, m, use_exec) for m in children_port[p] if eligible(port, m, state.free_port)
            }
            if not kids_up or not kids_port:
                continue
            anchors = _anchors(state, use_exec, within=(up.names[u], port.names[p]))
            found = pair_by_order(kids_up, kids_port, anchors, key(up), key(port))
            changed |= accept(found, " among aligned siblings", 0.0) > 0


def _children(side: Side) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in side.names]
    for module, name in enumerate(side.names):
        if name != ROOT and parent(name) in side.index:
            children[side.index[parent(name)]].append(module)
    return children


def _anchors(state: _State, use_exec: bool, *, within: tuple[str, str] | None = None) -> list[tuple[float, float]]:
    """Positions of paired modules (and of each group's first members) in the chosen order.

    Args:
        within: ``(upstream module, port module)``: only anchors inside these two subtrees.
    """
    up, port = state.up, state.port

    def inside(ups: list[int], ports: list[int]) -> bool:
        if within is None:
            return True
        return all(is_within(up.names[u], within[0], strict=False) for u in ups) and all(
            is_within(port.names[p], within[1], strict=False) for p in ports
        )

    points = []
    for u, p in state.up_partner.items():
        if (use_exec and not (up.ran(u) and port.ran(p))) or not inside([u], [p]):
            continue
        points.append((_position(up, u, use_exec), _position(port, p, use_exec)))
    for ups, ports, _ in state.groups:
        if up.index.get(ROOT) in ups or port.index.get(ROOT) in ports or not inside(ups, ports):
            continue
        if use_exec and not (all(up.ran(u) for u in ups) and all(port.ran(p) for p in ports)):
            continue
        points.append((min(_position(up, u, use_exec) for u in ups), min(_position(port, p, use_exec) for p in ports)))
    return points


def _position(side: Side, module: int, use_exec: bool) -> float:
    return float(side.exec_order[module]) if use_exec else float(module)


def _positions(side: Side) -> dict[int, float]:
    return {m: float(side.exec_order.get(m, len(side.names) + m)) for m in range(len(side.names))}


def _numel(side: Side, row: int) -> int:
    size = 1
    for dim in side.table.params[row].shape:
        size *= dim
    return size


# -- reporting helpers ------------------------------------------------------------


def coverage(alignment: Alignment, upstream: Trace | Side, port: Trace | Side) -> dict[str, dict[str, int]]:
    """Aligned / total modules on each side, overall and among modules that own parameters.

    A module counts as aligned when it is in a pair or a group; modules an
    ``[ignore]`` list left out are counted separately and not in the totals.
    """
    out = {}
    for label, side, mine in (
        ("upstream", upstream, lambda a: [p.upstream for p in a.pairs] + [n for g in a.groups for n in g.upstream]),
        ("port", port, lambda a: [p.port for p in a.pairs] + [n for g in a.groups for n in g.port]),
    ):
        table = side.table if isinstance(side, Side) else side.modules  # the module table is all it needs
        aligned = set(mine(alignment))
        unmatched = set(alignment.unmatched_upstream if label == "upstream" else alignment.unmatched_port)
        counted = aligned | unmatched
        owners = _param_owners(table)
        out[label] = {
            "aligned": len(aligned),
            "total": len(counted),
            "ignored": len(table.names) - len(counted),
            "params_aligned": len(owners & aligned),
            "params_total": len(owners & counted),
        }
    return out


def _param_owners(table: ModuleTable) -> set[str]:
    """Names of the modules that own at least one parameter (buffers do not count): :meth:`Side.owns_params`
    for every module, read straight from the table (building a whole side for it cost a tenth of ``align``)."""
    return {
        table.names[entry.module_index]
        for entry in table.params
        if entry.kind == "parameter" and 0 <= entry.module_index < len(table.names)
    }


def alignment_to_dict(alignment: Alignment, coverage_figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plain data for ``--json`` and reports."""
    return {
        "pairs": [
            {"upstream": p.upstream, "port": p.port, "source": p.source, "confidence": p.confidence, "note": p.note}
            for p in alignment.pairs
        ],
        "groups": [
            {"upstream": list(g.upstream), "port": list(g.port), "source": g.source, "note": g.note}
            for g in alignment.groups
        ],
        "unmatched_upstream": list(alignment.unmatched_upstream),
        "unmatched_port": list(alignment.unmatched_port),
        "coverage": coverage_figures or {},
        "notes": list(alignment.notes),
        "suspects": [s.to_dict() for s in alignment.suspects],
    }
