"""Which upstream parameter is compared with which port parameter, and the verdict on each.

Evidence is used strongest first; each stage only sees what earlier ones left:

1. the parameter map (``param_names_mapping``), when given: exact full names,
   fused ``(template, merge_index, num_merges)`` rules compared piece by slice;
2. module pairs of the alignment: the same local name (``weight``/``bias``),
   then equal values (a ``modulation`` that the port calls ``scale_shift_table``);
3. module groups of the alignment: fused projections (``to_qkv`` = ``cat(q, k, v)``)
   piece by slice, anything else by equal values;
4. equal values anywhere (a module the aligner could not pair), then a table
   padded with zero rows anywhere;
5. what is left, inside modules known to correspond: by local name, then by shape
   (so a scaled or re-initialised weight is still compared, not called missing).

Everything left after that exists on one side only, unless it is tied: the same
tensor (live models) or identical non-constant values (fingerprints) as a
parameter of its own side that was paired, e.g. an embedding table that
upstream holds under ``shared`` and ``encoder.embed_tokens``; or computed: a
buffer that is not in its model's ``state_dict()`` (``persistent=False``, e.g.
rotary tables built at construction), which no conversion carries. Persistence
is known from live models only; the module table does not record it. A pair whose shapes
differ only in the number of rows is compared as a padded table: the first rows
against the other side, the extra rows against zero.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tracediff import modtree
from tracediff.align.alignment import Alignment
from tracediff.moments import MAX, MIN, SUMSQ
from tracediff.preflight.compare import (
    Fingerprint,
    Verdict,
    compare_fingerprints,
    compare_fused,
    compare_padded_fingerprints,
    compare_padded_tensors,
    compare_tensors,
    holds_padded_values,
    holds_same_values,
    is_permutation,
    padded_rows,
    pair_rtol,
    tensors_close,
)
from tracediff.preflight.result import ParamCheck
from tracediff.store.trace import ModuleTable

#: Relative window of sum of squares searched for a tensor holding the same values (fp8 casts included).
_VALUE_WINDOW = 0.6
#: Largest number of parts tried for a fused tensor the aligner left unpaired,
#: among at most this many unpaired siblings.
MAX_FUSED_PARTS = 4
MAX_FUSED_CANDIDATES = 8
#: Roles of fused pieces by their modules' local names, in the order fused tensors stack them
#: (``cat(q, k, v)``, ``cat(gate, up)``), whatever order the modules are defined in: HF's CLIP
#: defines ``k_proj, v_proj, q_proj``, and its fused ports still stack q first.
_ROLES = (re.compile(r"^(?:to_|w_?)?(q|k|v|query|key|value)(?:_?proj|_lin|_linear)?$"),
          re.compile(r"^(?:w_?)?(gate|up)(?:_?proj)?$"))
_ROLE_RANK = {"q": 0, "query": 0, "k": 1, "key": 1, "v": 2, "value": 2, "gate": 0, "up": 1}


@dataclass
class ParamSide:
    """One model's parameters and buffers, by row of its module table.

    Attributes:
        label: ``upstream`` or ``port``.
        table: the module table (names, fingerprints).
        tensors: the live tensors row by row, or None when only a trace is at hand.
        persistent: row by row, whether the tensor is in its model's ``state_dict()``
            (False for a non-persistent buffer); None when only a trace is at hand.
    """

    label: str
    table: ModuleTable
    tensors: list[Any] | None = None
    persistent: list[bool] | None = None
    full: list[str] = field(init=False)
    by_name: dict[str, int] = field(init=False)
    rows_of: dict[int, list[int]] = field(init=False)
    module_index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        names = self.table.names
        self.module_index = {}
        for index, name in enumerate(names):
            self.module_index.setdefault(name, index)
        self.full = [modtree.join_name(names[p.module_index], p.name) for p in self.table.params]
        self.by_name = {}
        self.rows_of = defaultdict(list)
        for row, name in enumerate(self.full):
            self.by_name.setdefault(name, row)
            self.rows_of[self.table.params[row].module_index].append(row)

    def fingerprint(self, row: int) -> Fingerprint:
        entry = self.table.params[row]
        return Fingerprint(
            shape=tuple(entry.shape),
            dtype=entry.dtype,
            moments=self.table.param_moments[row],
            sample=self.table.param_samples[row],
            sample_t=self.table.param_samples_t[row],
        )

    def tensor(self, row: int) -> Any:
        """The live tensor of ``row`` (only asked for when both models are at hand)."""
        assert self.tensors is not None
        return self.tensors[row]

    def module_of(self, row: int) -> str:
        return self.table.names[self.table.params[row].module_index]

    def local(self, row: int) -> str:
        return self.table.params[row].name

    def shape(self, row: int) -> tuple[int, ...]:
        return tuple(self.table.params[row].shape)

    def computed(self, row: int) -> bool:
        """A buffer known not to be in the state dict (computed at construction, never converted)."""
        return self.persistent is not None and self.table.params[row].kind == "buffer" and not self.persistent[row]


@dataclass
class _Link:
    """One comparison to make (or a one-sided parameter)."""

    up: int | None
    port: int | None
    port_rows: tuple[int, int] | None = None
    up_rows: tuple[int, int] | None = None
    #: fused comparison from fingerprints: the pieces' rows (on the pieces' side) and this one's index
    pieces: list[int] | None = None
    piece: int = 0
    fused_side: str = ""
    verdict: Verdict | None = None
    note: str = ""
    #: a one-sided tensor tied to this row of its own side (paired elsewhere), and how that is known
    tied: int | None = None
    tie: str = ""
    #: a one-sided buffer that is not in its model's state dict
    computed: bool = False
    #: fused comparison: what says the pieces belong in this order (a swap's message names it)
    expected: str = ""


class _Pairing:
    """Bookkeeping: which rows are taken, which modules correspond."""

    def __init__(self, up: ParamSide, port: ParamSide) -> None:
        self.up = up
        self.port = port
        self.links: list[_Link] = []
        self.used_up: set[int] = set()
        self.used_port: set[int] = set()
        self.partner_up: dict[int, int] = {}  # upstream module -> port module
        self.partner_port: dict[int, int] = {}
        self.fused_verdicts: dict[tuple[str, int], list[Verdict]] = {}
        #: fused tensor -> per slot, the piece whose values it holds (exact comparisons)
        self.holdings: dict[tuple[str, int], list[int | None]] = {}
        self.notes: list[str] = []

    def free_up(self, module: int) -> list[int]:
        return [r for r in self.up.rows_of.get(module, []) if r not in self.used_up]

    def free_port(self, module: int) -> list[int]:
        return [r for r in self.port.rows_of.get(module, []) if r not in self.used_port]

    def link(self, up: int | None, port: int | None, **kwargs: Any) -> None:
        self.links.append(_Link(up, port, **kwargs))
        if up is not None:
            self.used_up.add(up)
        if port is not None:
            self.used_port.add(port)

    def same_values(self, u: int, p: int) -> bool:
        return holds_same_values(self.up.fingerprint(u), self.port.fingerprint(p))


def pair_params(
    up: ParamSide,
    port: ParamSide,
    alignment: Alignment | None,
    param_map: Mapping[str, Any] | None = None,
    *,
    rtol: float | None = None,
) -> tuple[list[ParamCheck], list[str]]:
    """Pair every parameter and buffer of two models and judge each pair.

    Args:
        up, port: the two sides (module tables, and live tensors when available).
        alignment: module pairs and groups; None pairs modules by name only.
        param_map: a validated ``param_names_mapping`` (regex -> template or
            ``(template, merge_index, num_merges)``).
        rtol: tolerance of "equal within tolerance"; default from the dtypes.

    Returns:
        ``(checks, notes)``: one :class:`ParamCheck` per upstream tensor (per fused
        piece), then the port's tensors that have no upstream counterpart, in model
        order; and remarks on what the pairing had to infer.
    """
    state = _Pairing(up, port)
    if param_map:
        _by_param_map(state, param_map)
    pairs = _module_pairs(up, port, alignment)
    for u, p in pairs:
        state.partner_up.setdefault(u, p)
        state.partner_port.setdefault(p, u)
    for u, p in pairs:
        _by_local_name(state, state.free_up(u), state.free_port(p))
        _by_value(state, state.free_up(u), state.free_port(p))
    for ups, ports in _module_groups(up, port, alignment):
        _fused_group(state, ups, ports)
        _by_value(state, [r for m in ups for r in state.free_up(m)], [r for m in ports for r in state.free_port(m)])
    left_up = [r for r in range(len(up.full)) if r not in state.used_up]
    left_port = [r for r in range(len(port.full)) if r not in state.used_port]
    _by_value(state, left_up, left_port)
    _by_padded_value(state, [r for r in left_up if r not in state.used_up],
                     [r for r in left_port if r not in state.used_port])
    _learn_partners(state)
    _fused_leftovers(state, fused_on="port")
    _fused_leftovers(state, fused_on="upstream")
    _padded_leftovers(state)
    _by_partner(state)
    _one_sided(state)
    checks = [_judge(state, link, rtol) for link in _ordered(state)]
    return checks, state.notes


# -- stage 1: the parameter map ------------------------------------------------------------


def _by_param_map(state: _Pairing, param_map: Mapping[str, Any]) -> None:
    up, port = state.up, state.port
    compiled = [(re.compile(pattern), value) for pattern, value in param_map.items()]
    fused: dict[str, dict[int, int]] = defaultdict(dict)
    fused_total: dict[str, int] = {}
    for row, name in enumerate(up.full):
        for regex, value in compiled:
            match = regex.match(name)
            if match is None:
                continue
            template = value if isinstance(value, str) else value[0]
            try:
                target = match.expand(template)
            except (re.error, IndexError):
                break
            if target not in port.by_name:
                state.link(row, None, note=f"the param map sends it to {target!r}, which the port does not have")
            elif isinstance(value, str):
                if port.by_name[target] not in state.used_port:
                    state.link(row, port.by_name[target])
            else:
                fused[target][int(value[1])] = row
                fused_total[target] = int(value[2])
            break
    for target, parts in fused.items():
        target_row = port.by_name[target]
        order = [parts[i] for i in sorted(parts)]
        if sorted(parts) != list(range(fused_total[target])):
            for row in order:
                state.link(row, target_row, verdict=Verdict(
                    "unverified", detail=f"fused into {target} with {len(parts)} of {fused_total[target]} parts "
                    "present in the upstream model; slices unknown"))
            continue
        _link_fused(state, order, target_row, fused_on="port", expected="the param map's merge order")


# -- stages 2 and 3: the alignment -------------------------------------------------------


def _module_pairs(up: ParamSide, port: ParamSide, alignment: Alignment | None) -> list[tuple[int, int]]:
    if alignment is None:
        return [(up.module_index[n], port.module_index[n]) for n in up.module_index if n in port.module_index]
    out = []
    for pair in alignment.pairs:
        u, p = up.module_index.get(pair.upstream), port.module_index.get(pair.port)
        if u is not None and p is not None:
            out.append((u, p))
    return out


def _module_groups(up: ParamSide, port: ParamSide, alignment: Alignment | None) -> list[tuple[list[int], list[int]]]:
    if alignment is None:
        return []
    out = []
    for group in alignment.groups:
        ups = [up.module_index[n] for n in group.upstream if n in up.module_index]
        ports = [port.module_index[n] for n in group.port if n in port.module_index]
        if ups and ports:
            out.append((ups, ports))
    return out


def _by_local_name(state: _Pairing, up_rows: list[int], port_rows: list[int]) -> None:
    by_name = {state.port.local(r): r for r in port_rows}
    for row in up_rows:
        other = by_name.get(state.up.local(row))
        if other is not None and other not in state.used_port:
            state.link(row, other)


def _by_value(state: _Pairing, up_rows: list[int], port_rows: list[int]) -> None:
    """Pair rows holding the same values; ties go by order (first free candidate).

    Candidates are screened by element count, sum of squares and first element
    (which a transpose, a reshape or a dtype cast barely move), so a large model
    costs a few comparisons per tensor, not one per pair of tensors.
    """
    free_port = [r for r in port_rows if r not in state.used_port]
    groups: dict[int, list[int]] = defaultdict(list)
    for r in free_port:
        groups[math.prod(state.port.shape(r))].append(r)
    index = {}
    for numel, rows in groups.items():
        table = state.port.table
        index[numel] = (np.asarray(rows, dtype=np.int64), np.nan_to_num(table.param_moments[rows, SUMSQ], nan=-1.0),
                        np.nan_to_num(table.param_samples[rows, 0], nan=0.0))
    for row in up_rows:
        if row in state.used_up:
            continue
        found = index.get(math.prod(state.up.shape(row)))
        if found is None:
            continue
        same_numel, sumsq, first = found
        key = float(np.nan_to_num(state.up.table.param_moments[row, SUMSQ], nan=-1.0))
        head = float(np.nan_to_num(state.up.table.param_samples[row, 0], nan=0.0))
        # Element 0 is element 0 of the transpose and of any reshape too.
        near = (np.abs(sumsq - key) <= _VALUE_WINDOW * abs(key) + 1e-30) & (
            np.abs(first - head) <= _VALUE_WINDOW * abs(head) + 1e-30)
        for other in same_numel[near].tolist():
            if other not in state.used_port and state.same_values(row, other):
                state.link(row, other)
                break


def _by_padded_value(state: _Pairing, up_rows: list[int], port_rows: list[int]) -> None:
    """Pair a table with its counterpart padded with zero rows (either side), by fingerprint."""
    for row in up_rows:
        if row in state.used_up:
            continue
        shape = state.up.shape(row)
        for other in port_rows:
            if other in state.used_port or padded_rows(shape, state.port.shape(other)) is None:
                continue
            if holds_padded_values(state.up.fingerprint(row), state.port.fingerprint(other)):
                state.link(row, other)
                break


def _fused_group(state: _Pairing, ups: list[int], ports: list[int]) -> None:
    """A fused module on one side and its parts, in concatenation order, on the other."""
    if len(ups) > 1 and len(ports) == 1:
        fused_module, parts, fused_on = ports[0], ups, "port"
    elif len(ports) > 1 and len(ups) == 1:
        fused_module, parts, fused_on = ups[0], ports, "upstream"
    else:
        return
    fused_side = state.port if fused_on == "port" else state.up
    parts_side = state.up if fused_on == "port" else state.port
    # The aligner stacks the parts in the order their values fit; judged in their natural
    # order instead, pieces the conversion swapped show up as swapped.
    parts, expected = natural_order(parts_side, parts)
    fused_free = state.free_port if fused_on == "port" else state.free_up
    parts_free = state.free_up if fused_on == "port" else state.free_port
    for row in fused_free(fused_module):
        name = fused_side.local(row)
        pieces = []
        for module in parts:
            found = [r for r in parts_free(module) if parts_side.local(r) == name]
            if len(found) != 1:
                break
            pieces.append(found[0])
        else:
            shapes = [parts_side.shape(r) for r in pieces]
            whole = fused_side.shape(row)
            if shapes and all(len(s) == len(whole) and len(s) > 0 and s[1:] == whole[1:] for s in shapes) \
                    and sum(s[0] for s in shapes) == whole[0]:
                _link_fused(state, pieces, row, fused_on=fused_on, expected=expected)


def natural_order(side: ParamSide, modules: list[int]) -> tuple[list[int], str]:
    """The order a fused tensor should stack ``modules`` (parts of one fused module) in, and what says so.

    The values fit whatever order the conversion used, so they cannot tell a
    ``cat(q, v, k)`` from a deliberate layout; the parts' role names can (``q``,
    ``k``, ``v``; ``query``, ``key``, ``value``; ``gate``, ``up``, with ``to_``,
    ``w`` and ``_proj`` affixes), else their definition order. A port that stacks
    its pieces in another order on purpose says so with its parameter map.
    """
    locals_ = [modtree.local_name(side.table.names[m]).lower() for m in modules]
    for regex in _ROLES:
        found = [regex.match(name) for name in locals_]
        ranks = [_ROLE_RANK[m.group(1)] for m in found if m is not None]
        if len(ranks) == len(modules) and len(set(ranks)) == len(ranks):
            order = [m for _, m in sorted(zip(ranks, modules, strict=True))]
            names = ", ".join(modtree.local_name(side.table.names[m]) for m in order)
            return order, f"by the {side.label}'s module names {names}"
    return sorted(modules), f"the {side.label}'s definition order"


def _link_fused(state: _Pairing, pieces: list[int], fused_row: int, *, fused_on: str, expected: str = "") -> None:
    """One link per piece; each piece is compared with its rows of the fused tensor (``expected``: why this order)."""
    parts_side = state.up if fused_on == "port" else state.port
    fused_side = state.port if fused_on == "port" else state.up
    shapes = [parts_side.shape(r) for r in pieces]
    whole = fused_side.shape(fused_row)
    stacks = all(len(s) == len(whole) and len(s) > 0 and s[1:] == whole[1:] for s in shapes) and \
        sum(s[0] for s in shapes) == whole[0]
    start = 0
    for k, row in enumerate(pieces):
        if not stacks:
            verdict = Verdict("shape_mismatch", detail=f"fused from {len(pieces)} pieces, but they do not stack along "
                              f"dim 0 into {fused_side.full[fused_row]} ({_shape(whole)})")
            rows = None
        else:
            verdict = None
            rows = (start, start + shapes[k][0])
            start += shapes[k][0]
        if fused_on == "port":
            state.link(row, fused_row, port_rows=rows, pieces=pieces, piece=k, fused_side="port", verdict=verdict,
                       expected=expected)
        else:
            state.link(fused_row, row, up_rows=rows, pieces=pieces, piece=k, fused_side="upstream", verdict=verdict,
                       expected=expected)
    # A fused row is shared by its pieces; mark it taken once all are linked.
    (state.used_port if fused_on == "port" else state.used_up).add(fused_row)


# -- stages 4 and 5: what is left --------------------------------------------------------


def _fused_leftovers(state: _Pairing, *, fused_on: str) -> None:
    """A fused module the aligner left alone because a piece differs: find its parts by shape.

    Candidates are the unpaired children of the other side's counterpart of the
    fused module's parent (``self_attn.q``/``k``/``v`` for ``attn1.to_qkv``). A
    unique set whose tensors stack along dim 0 into the fused ones is taken, in
    its natural order (:func:`natural_order`), so swapped pieces are judged as such.
    """
    fused_side = state.port if fused_on == "port" else state.up
    parts_side = state.up if fused_on == "port" else state.port
    used_fused = state.used_port if fused_on == "port" else state.used_up
    used_parts = state.used_up if fused_on == "port" else state.used_port
    partner = state.partner_port if fused_on == "port" else state.partner_up
    children: dict[str, list[int]] = defaultdict(list)
    for index, name in enumerate(parts_side.table.names):
        if name:
            children[modtree.parent(name)].append(index)
    for module, rows in list(fused_side.rows_of.items()):
        if not rows or any(r in used_fused for r in rows):
            continue
        parent = fused_side.module_index.get(modtree.parent(fused_side.table.names[module]))
        if parent is None or parent not in partner:
            continue
        counterpart = parts_side.table.names[partner[parent]]
        candidates = [m for m in children.get(counterpart, []) if parts_side.rows_of.get(m)
                      and not any(r in used_parts for r in parts_side.rows_of[m])]
        if len(candidates) > MAX_FUSED_CANDIDATES:
            continue  # a list of blocks, not the few projections of one layer
        fits = []
        for size in range(2, min(MAX_FUSED_PARTS, len(candidates)) + 1):
            for combo in itertools.combinations(candidates, size):
                pieces = _stacking_pieces(fused_side, rows, parts_side, list(combo))
                if pieces is not None:
                    fits.append((list(combo), pieces))
        if len(fits) != 1:
            continue
        parts, parts_pieces = fits[0]
        order, expected = natural_order(parts_side, parts)
        for row in rows:
            by_module = dict(zip(parts, parts_pieces[row], strict=True))
            _link_fused(state, [by_module[m] for m in order], row, fused_on=fused_on, expected=expected)


def _stacking_pieces(fused_side: ParamSide, rows: list[int], parts_side: ParamSide,
                     combo: list[int]) -> dict[int, list[int]] | None:
    """For each fused row, the parts' rows of the same local name, if their shapes stack into it."""
    out: dict[int, list[int]] = {}
    for row in rows:
        name, whole = fused_side.local(row), fused_side.shape(row)
        pieces = []
        for module in combo:
            found = [r for r in parts_side.rows_of[module] if parts_side.local(r) == name]
            if len(found) != 1:
                return None
            pieces.append(found[0])
        shapes = [parts_side.shape(r) for r in pieces]
        if not whole or not all(len(s) == len(whole) and s[1:] == whole[1:] for s in shapes) \
                or sum(s[0] for s in shapes) != whole[0]:
            return None
        out[row] = pieces
    if sum(len(parts_side.rows_of[m]) for m in combo) != len(rows) * len(combo):
        return None
    return out


def _padded_leftovers(state: _Pairing) -> None:
    """A table and its padded counterpart that nothing paired because their values differ.

    Candidates are unpaired tensors of the same local name whose shapes differ
    only in the number of rows, in children of corresponding parents (the
    upstream ``embed`` and the port's ``tokens``, both under the root). A pair
    is taken when it is the only one either way, counting tied copies (one
    tensor under two names) once; it is then judged as a padded table, so a
    shifted row is named on the table rather than as two one-sided tensors.
    """
    up, port = state.up, state.port

    def candidates(side: ParamSide, used: set[int], parent: str, local: str, shape: tuple[int, ...]) -> list[int]:
        found: list[int] = []
        for row, entry in enumerate(side.table.params):
            name = side.table.names[entry.module_index]
            if row in used or not name or modtree.parent(name) != parent or entry.name != local:
                continue
            if padded_rows(shape, side.shape(row)) is not None and not any(_tie(side, row, kept) for kept in found):
                found.append(row)
        return found

    for row, entry in enumerate(port.table.params):
        name = port.table.names[entry.module_index]
        if row in state.used_port or not name:
            continue
        parent = port.module_index.get(modtree.parent(name))
        partner = state.partner_port.get(parent) if parent is not None else None
        if partner is None:
            continue
        ups = candidates(up, state.used_up, up.table.names[partner], entry.name, port.shape(row))
        if len(ups) != 1:
            continue
        back = candidates(port, state.used_port, modtree.parent(name), entry.name, up.shape(ups[0]))
        if back == [row]:
            state.link(ups[0], row)


def _learn_partners(state: _Pairing) -> None:
    """Modules whose parameters were all paired with one module of the other side correspond."""
    seen: dict[int, set[int]] = defaultdict(set)
    for link in state.links:
        if link.up is not None and link.port is not None and link.pieces is None:
            seen[state.up.table.params[link.up].module_index].add(state.port.table.params[link.port].module_index)
    for u, ports in seen.items():
        if len(ports) == 1:
            p = next(iter(ports))
            state.partner_up.setdefault(u, p)
            state.partner_port.setdefault(p, u)


def _by_partner(state: _Pairing) -> None:
    """Inside corresponding modules: the same local name, then the same shape in order."""
    for u, p in list(state.partner_up.items()):
        _by_local_name(state, state.free_up(u), state.free_port(p))
        ports = state.free_port(p)
        for row in state.free_up(u):
            shape = state.up.shape(row)
            for other in ports:
                if other not in state.used_port and state.port.shape(other) in (shape, shape[::-1]):
                    state.link(row, other)
                    break
        ups, ports = state.free_up(u), state.free_port(p)
        if len(ups) == 1 and len(ports) == 1 and math.prod(state.up.shape(ups[0])) == math.prod(
                state.port.shape(ports[0])):
            state.link(ups[0], ports[0])


def _one_sided(state: _Pairing) -> None:
    """Link every tensor left unpaired on either side: tied to a paired one of its side, or missing."""
    paired = [(link.up, link.port) for link in state.links if link.up is not None and link.port is not None]
    for on_port in (False, True):
        side, other = (state.port, state.up) if on_port else (state.up, state.port)
        used = state.used_port if on_port else state.used_up
        partners = state.partner_port if on_port else state.partner_up
        paired_rows = sorted({pair[on_port] for pair in paired})
        for row in range(len(side.full)):
            if row in used:
                continue
            ends: tuple[int | None, int | None] = (None, row) if on_port else (row, None)
            twin = _tied_to(side, row, paired_rows)
            if twin is not None:
                state.link(*ends, tied=twin[0], tie=twin[1])
                continue
            partner = partners.get(side.table.params[row].module_index)
            if partner is not None:
                note = f"its counterpart {modtree.display_name(other.table.names[partner])} has no {side.local(row)!r}"
            else:
                note = f"no {other.label} module holds its values"
            state.link(*ends, note=note, computed=side.computed(row))


def _tied_to(side: ParamSide, row: int, paired: list[int]) -> tuple[int, str] | None:
    """A paired row of the same side that ``row`` is tied to, and how that is known (see :func:`_tie`)."""
    entry = side.table.params[row]
    for other in paired:
        if other != row and side.shape(other) == tuple(entry.shape) and side.table.params[other].dtype == entry.dtype:
            how = _tie(side, row, other)
            if how is not None:
                return other, how
    return None


def _tie(side: ParamSide, row: int, other: int) -> str | None:
    """Whether two rows of one side are one tensor under two names: ``one tensor``, ``identical values`` or None.

    Live models: the same tensor (one storage, same shape and strides), else
    identical values. Fingerprints: identical shape, dtype, moments and samples.
    A constant tensor (all zeros, all ones) is never called tied by its values:
    a zero bias that the port lacks is missing, not tied to another zero bias.
    """
    if side.shape(row) != side.shape(other) or side.table.params[row].dtype != side.table.params[other].dtype:
        return None
    if side.tensors is not None:
        import torch

        mine, theirs = side.tensors[row], side.tensors[other]
        if _same_tensor(mine, theirs):
            return "one tensor"
        flat = mine.reshape(-1)
        if flat.numel() < 2 or bool((flat == flat[0]).all()):
            return None
        return "identical values" if torch.equal(mine, theirs) else None
    mine_fp, theirs_fp = side.fingerprint(row), side.fingerprint(other)
    if not mine_fp.moments[MIN] < mine_fp.moments[MAX]:
        return None
    same = all(np.array_equal(x, y, equal_nan=True) for x, y in (
        (mine_fp.moments, theirs_fp.moments), (mine_fp.sample, theirs_fp.sample),
        (mine_fp.sample_t, theirs_fp.sample_t)))
    return "identical values" if same else None


def _same_tensor(a: Any, b: Any) -> bool:
    """One tensor under two names (a tied parameter): same storage, offset, shape, strides and dtype."""
    if a.is_meta or b.is_meta or a.data_ptr() == 0:
        return False
    return (a.data_ptr() == b.data_ptr() and a.device == b.device and a.dtype == b.dtype
            and a.shape == b.shape and a.stride() == b.stride())


def _ordered(state: _Pairing) -> list[_Link]:
    """Upstream model order, port-only tensors last in port order."""
    def key(link: _Link) -> tuple[int, int, int]:
        if link.up is not None:
            return (0, link.up, link.piece)
        return (1, link.port if link.port is not None else 0, 0)

    return sorted(state.links, key=key)


# -- verdicts ----------------------------------------------------------------------------


def _judge(state: _Pairing, link: _Link, rtol: float | None) -> ParamCheck:
    up, port = state.up, state.port
    u, p = link.up, link.port
    own, row, other = (up, u, port) if u is not None else (port, p, up)  # a one-sided tensor's side first
    assert row is not None
    base: dict[str, Any] = {
        "upstream": up.full[u] if u is not None else None,
        "port": port.full[p] if p is not None else None,
        "upstream_module": up.module_of(u) if u is not None else None,
        "port_module": port.module_of(p) if p is not None else None,
        "kind": own.table.params[row].kind,
        "upstream_shape": up.shape(u) if u is not None else None,
        "port_shape": port.shape(p) if p is not None else None,
        "upstream_dtype": up.table.params[u].dtype if u is not None else None,
        "port_dtype": port.table.params[p].dtype if p is not None else None,
        "port_rows": link.port_rows,
        "upstream_rows": link.up_rows,
    }
    if link.tied is not None:
        twin = next((t.up, t.port) for t in state.links if (t.up if own is up else t.port) == link.tied
                    and t.up is not None and t.port is not None)
        twin_row = twin[1] if own is up else twin[0]
        assert twin_row is not None
        return ParamCheck(status="tied", detail=f"{own.full[link.tied]} ({link.tie}), which is compared with "
                          f"{other.label} {other.full[twin_row]}", **base)
    if u is None or p is None:
        partners = state.partner_up if own is up else state.partner_port
        partner = partners.get(own.table.params[row].module_index)
        base["port_module" if own is up else "upstream_module"] = (
            other.table.names[partner] if partner is not None else None)
        missing = "missing_in_port" if own is up else "missing_in_upstream"
        return ParamCheck(status="computed" if link.computed else missing, detail=link.note, **base)
    exact = up.tensors is not None and port.tensors is not None
    padded = padded_rows(up.shape(u), port.shape(p)) if link.verdict is None and link.pieces is None else None
    if padded is not None:
        verdict = _padded_verdict(state, link, rtol, exact=exact)
        if verdict.status not in ("padded", "shape_mismatch"):
            # The first rows were compared and differ: name that slice of the padded side.
            side, n, _ = padded
            key = "port" if side == "port" else "upstream"
            base[f"{key}_rows"] = (0, n)
            base[f"{key}_shape"] = _slice_shape(base[f"{key}_shape"], (0, n))
    else:
        verdict = link.verdict or _verdict(state, link, rtol, exact=exact)
    if link.pieces is not None and base["port_rows"] is not None:
        # The slice, not the whole fused tensor, is what was compared.
        base["port_shape"] = _slice_shape(base["port_shape"], link.port_rows)
    if link.pieces is not None and base["upstream_rows"] is not None:
        base["upstream_shape"] = _slice_shape(base["upstream_shape"], link.up_rows)
    return ParamCheck(status=verdict.status, max_abs=verdict.max_abs, rel=verdict.rel, scale=verdict.scale,
                      exact=exact and link.verdict is None, detail=verdict.detail, **base)


def _verdict(state: _Pairing, link: _Link, rtol: float | None, *, exact: bool) -> Verdict:
    up, port = state.up, state.port
    u, p = link.up, link.port
    assert u is not None and p is not None
    if exact:
        a, b = up.tensor(u), port.tensor(p)
        if link.port_rows is not None:
            b = b[link.port_rows[0]:link.port_rows[1]]
        if link.up_rows is not None:
            a = a[link.up_rows[0]:link.up_rows[1]]
        holds = None
        if link.pieces is not None and not tensors_close(a, b, rtol=rtol):
            holds = _holdings(state, link, rtol)
            if _traded(holds, link.piece):
                return Verdict("swapped", detail=_swap_detail(state, link, holds))
        verdict = compare_tensors(a, b, rtol=rtol)
        if link.pieces is not None:
            fused = port.full[p] if link.fused_side == "port" else up.full[u]
            other = holds[link.piece] if holds is not None and verdict.status == "different" else None
            pieces_side = up if link.fused_side == "port" else port
            swapped = pieces_side.full[link.pieces[other]] if other is not None and other != link.piece else ""
            verdict = Verdict(verdict.status, verdict.max_abs, verdict.rel, verdict.scale,
                              _join(f"slice of fused {fused}", verdict.detail,
                                    f"it holds {swapped}'s values (pieces swapped?)" if swapped else ""))
        return verdict
    if link.pieces is not None:
        fused_row = p if link.fused_side == "port" else u
        key = (link.fused_side, fused_row)
        if key not in state.fused_verdicts:
            pieces_side, fused_side = (up, port) if link.fused_side == "port" else (port, up)
            state.fused_verdicts[key] = compare_fused(
                [pieces_side.fingerprint(r) for r in link.pieces], fused_side.fingerprint(fused_row), rtol=rtol,
                fused_name=fused_side.full[fused_row], piece_names=[pieces_side.full[r] for r in link.pieces])
        found = state.fused_verdicts[key][link.piece]
        if found.status == "swapped":
            holds = [v.holds if v.status == "swapped" else k for k, v in enumerate(state.fused_verdicts[key])]
            return Verdict("swapped", detail=_swap_detail(state, link, holds))
        if link.fused_side == "upstream" and found.scale:
            # Judged as port piece against the upstream slice; read it the other way round.
            return Verdict(found.status, found.max_abs, found.rel, 1.0 / found.scale, found.detail)
        return found
    return compare_fingerprints(up.fingerprint(u), port.fingerprint(p),
                                rtol=rtol if rtol is not None else pair_rtol(up.table.params[u].dtype,
                                                                              port.table.params[p].dtype))


def _padded_verdict(state: _Pairing, link: _Link, rtol: float | None, *, exact: bool) -> Verdict:
    """A pair whose shapes differ only along dim 0: the first rows compared, the extra rows against zero."""
    u, p = link.up, link.port
    assert u is not None and p is not None
    if exact:
        return compare_padded_tensors(state.up.tensor(u), state.port.tensor(p), rtol=rtol)
    return compare_padded_fingerprints(state.up.fingerprint(u), state.port.fingerprint(p), rtol=rtol)


def _slots(side: ParamSide, pieces: list[int]) -> list[tuple[int, int]]:
    """Rows of the fused tensor each piece occupies, in concatenation order."""
    out, start = [], 0
    for row in pieces:
        out.append((start, start + side.shape(row)[0]))
        start = out[-1][1]
    return out


def _holdings(state: _Pairing, link: _Link, rtol: float | None) -> list[int | None]:
    """Per slot of a fused tensor, the piece whose values it holds, from the tensors (once per fused tensor).

    Its own piece when equal to it (within tolerance), else the piece of the same
    shape it equals, else None (a scaled or re-initialised slice).
    """
    assert link.pieces is not None
    on_port = link.fused_side == "port"
    fused_row = link.port if on_port else link.up
    assert fused_row is not None
    key = (link.fused_side, fused_row)
    if key in state.holdings:
        return state.holdings[key]
    pieces_side, fused_side = (state.up, state.port) if on_port else (state.port, state.up)
    whole = fused_side.tensor(fused_row)
    tensors = [pieces_side.tensor(r) for r in link.pieces]

    def same(piece: Any, part: Any) -> bool:  # upstream first: tolerances are relative to the reference
        return tensors_close(piece, part, rtol=rtol) if on_port else tensors_close(part, piece, rtol=rtol)

    holds: list[int | None] = []
    for k, (start, stop) in enumerate(_slots(pieces_side, link.pieces)):
        part = whole[start:stop]
        order = [k] + [j for j in range(len(tensors)) if j != k]
        holds.append(next((j for j in order if same(tensors[j], part)), None))
    state.holdings[key] = holds
    return holds


def _traded(holds: list[int | None], piece: int) -> bool:
    """Whether slot ``piece`` holds another piece, and the misplaced slots hold each other's pieces."""
    return holds[piece] not in (None, piece) and is_permutation(dict(enumerate(holds)))


def _swap_detail(state: _Pairing, link: _Link, holds: list[int | None]) -> str:
    """What a swapped slice holds, where its own piece went, and both stacking orders.

    ``holds[k]`` is the piece whose values slot ``k`` of the fused tensor holds.
    """
    assert link.pieces is not None
    on_port = link.fused_side == "port"
    pieces_side, fused_side = (state.up, state.port) if on_port else (state.port, state.up)
    fused_row = link.port if on_port else link.up
    assert fused_row is not None
    slots = _slots(pieces_side, link.pieces)
    roles = [modtree.local_name(pieces_side.module_of(r)) for r in link.pieces]
    k = link.piece
    stacked = ", ".join(roles[i if j is None else j] for i, j in enumerate(holds))  # a changed slice stays put
    basis = f" ({link.expected})" if link.expected else ""
    rows = lambda i: f"rows {slots[i][0]}:{slots[i][1]}"  # noqa: E731
    if on_port:
        # Port slot k holds upstream piece holds[k]; upstream piece k's values sit in the slot that holds k.
        j, home = holds[k], holds.index(k)
        assert j is not None
        return (f"holds upstream {pieces_side.full[link.pieces[j]]} where upstream "
                f"{pieces_side.full[link.pieces[k]]} belongs ({roles[k]} is in {rows(home)}); the conversion "
                f"concatenated {stacked}, not {', '.join(roles)}{basis}")
    # Upstream slot i went to port piece holds[i]: port piece k holds the slot whose holder is k.
    source = holds.index(k)
    fused = fused_side.full[fused_row]
    return (f"holds upstream {fused}[{slots[source][0]}:{slots[source][1]}] ({roles[source]}) where upstream "
            f"{fused}[{slots[k][0]}:{slots[k][1]}] belongs; the conversion split it into {stacked}, not "
            f"{', '.join(roles)}{basis}")


def _slice_shape(shape: tuple[int, ...] | None, rows: tuple[int, int] | None) -> tuple[int, ...] | None:
    if shape is None or rows is None or not shape:
        return shape
    return (rows[1] - rows[0], *shape[1:])


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "()"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
