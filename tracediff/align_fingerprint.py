"""Weight fingerprints: which modules own the same values on both sides.

A module's identity is the multiset of fingerprints of its own parameters
(names ignored): moments ``[sum, |sum|, sum of squares, min, max, NaN count,
inf count]`` plus 32 values at fixed flat positions, also read from the
transposed tensor. Converted weights keep their values, so equal fingerprints
pair modules across any renaming; the tolerance loosens when the dtypes differ
(a bf16 port of an fp32 reference) and the transposed samples catch weights
that a converter stored transposed.

Fused projections are found from the same numbers: concatenating tensors along
dim 0 adds their sums, |sums| and sums of squares and combines their extrema,
so a port ``to_qkv`` is recognised as upstream ``q``, ``k``, ``v`` (or the other
way round) without ever seeing the tensors.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracediff.align_side import Side, parent_name
from tracediff.trace import FINGERPRINT_SAMPLE

#: Relative tolerance when both tensors have the same dtype (reduction order only).
SAME_DTYPE_RTOL = 1e-6
#: Relative tolerance across a dtype change: bf16 keeps 8 significant bits (~4e-3).
CROSS_DTYPE_RTOL = 1e-2
#: Largest number of parts tried for a fused module (q/k/v, gate/up, ...).
MAX_FUSED_PARTS = 4

_SUM, _ABS, _SQ, _MIN, _MAX, _NAN, _INF = range(7)


@dataclass(frozen=True)
class ModuleMatch:
    """How one module's weights matched another's.

    Attributes:
        exact: same dtypes and shapes: values equal up to reduction order.
        detail: what was converted on the way ("transposed", "reshaped", a dtype change).
    """

    exact: bool
    detail: str


class FingerprintIndex:
    """Module-level weight matches between two sides, computed once.

    ``candidates[u]`` maps each upstream module index ``u`` to the port modules
    whose identity tensors match all of ``u``'s, with how they matched.
    """

    def __init__(self, upstream: Side, port: Side, *, skip_upstream: set[int], skip_port: set[int]) -> None:
        self.upstream = upstream
        self.port = port
        self.candidates: dict[int, dict[int, ModuleMatch]] = {}
        self.reverse: dict[int, dict[int, ModuleMatch]] = defaultdict(dict)
        by_numel = _index_by_numel(port, skip_port)
        for module, rows in enumerate(upstream.identity):
            if not rows or module in skip_upstream:
                continue
            found = self._match_module(module, rows, by_numel)
            if found:
                self.candidates[module] = found
                for other, how in found.items():
                    self.reverse[other][module] = how

    def _match_module(
        self, module: int, rows: list[int], by_numel: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> dict[int, ModuleMatch]:
        first = _param_candidates(self.upstream, rows[0], self.port, by_numel)
        owners = {self.port.table.params[row].module_index for row in first}
        found: dict[int, ModuleMatch] = {}
        for owner in sorted(owners):
            other_rows = self.port.identity[owner]
            if len(other_rows) != len(rows):
                continue
            how = _match_multiset(self.upstream, rows, self.port, other_rows)
            if how is not None:
                found[owner] = how
        return found


def find_fused(
    fused_side: Side,
    fused: int,
    parts_side: Side,
    available: set[int],
    order: dict[int, float],
    *,
    checked: bool = False,
) -> list[int] | None:
    """Find the modules of ``parts_side`` whose weights, stacked on dim 0, are ``fused``'s.

    Parts are searched among siblings (modules with one parent) in ``available``,
    because fused projections replace sibling layers (``q``/``k``/``v`` of one
    attention, ``gate``/``up`` of one MLP). A unique fit is required: two
    different sets of siblings that both add up leave the module unmatched.

    Args:
        order: module index of ``parts_side`` -> position, to order parts whose
            samples cannot tell their concatenation order.
        checked: ``available`` already passed the per-module tests (:meth:`FusedShortlist.among`).

    Returns:
        The parts in concatenation order, or None.
    """
    rows = _ordered_rows(fused_side, fused)
    if not rows:
        return None
    target = [_moments(fused_side, row) for row in rows]
    shapes = [fused_side.table.params[row].shape for row in rows]
    if any(len(shape) == 0 for shape in shapes):
        return None
    by_parent: dict[str, list[int]] = defaultdict(list)
    for module in sorted(available):
        if checked:
            by_parent[parent_name(parts_side.names[module])].append(module)
            continue
        part_rows = _ordered_rows(parts_side, module)
        if len(part_rows) != len(rows):
            continue
        part_shapes = [parts_side.table.params[row].shape for row in part_rows]
        if not all(_could_be_part(s, t) for s, t in zip(part_shapes, shapes, strict=True)):
            continue
        if not all(_within(_moments(parts_side, r), m) for r, m in zip(part_rows, target, strict=True)):
            continue
        by_parent[parent_name(parts_side.names[module])].append(module)
    fits: list[tuple[int, ...]] = []
    for siblings in by_parent.values():
        for size in range(2, min(MAX_FUSED_PARTS, len(siblings)) + 1):
            for combo in itertools.combinations(siblings, size):
                if _stacks_to(parts_side, combo, fused_side, rows):
                    fits.append(combo)
    if len(fits) != 1:
        return None
    return _concat_order(parts_side, list(fits[0]), fused_side, rows, order)


class FusedShortlist:
    """The modules of one side that may be parts of a given fused module, found without visiting them all.

    :func:`find_fused` tests every available module (row count, shapes, moments);
    at 5 000 modules that loop, once per fused module, was quadratic. The modules
    are indexed once by their shape signature, and :func:`_could_be_part` and
    :func:`_within` are evaluated as arrays, with the same float64 operations, so
    the shortlist is exactly the modules that pass them (``find_fused(checked=True)``).
    """

    def __init__(self, side: Side) -> None:
        groups: dict[tuple[Any, ...], list[tuple[int, list[int], list[int]]]] = defaultdict(list)
        for module in range(len(side.names)):
            rows = _ordered_rows(side, module)
            shapes = [side.table.params[row].shape for row in rows]
            if rows and all(len(shape) for shape in shapes):
                groups[_signature(shapes)].append((module, [shape[0] for shape in shapes], rows))
        self._index = {
            key: (
                np.asarray([m for m, _, _ in items], dtype=np.int64),
                np.asarray([firsts for _, firsts, _ in items], dtype=np.int64),
                side.table.param_moments[np.asarray([rows for _, _, rows in items], dtype=np.int64)],
            )
            for key, items in groups.items()
        }

    def among(self, available: set[int], fused_side: Side, fused: int) -> set[int]:
        """The modules of ``available`` that pass :func:`find_fused`'s per-module tests for ``fused``."""
        rows = _ordered_rows(fused_side, fused)
        shapes = [fused_side.table.params[row].shape for row in rows]
        if not rows or not all(len(shape) for shape in shapes):
            return set()
        entry = self._index.get(_signature(shapes))
        if entry is None:
            return set()
        modules, firsts, moments = entry
        whole = np.asarray([shape[0] for shape in shapes], dtype=np.int64)
        target = fused_side.table.param_moments[np.asarray(rows, dtype=np.int64)]
        slack = CROSS_DTYPE_RTOL * (np.abs(target[:, _ABS]) + 1e-30)
        extent = CROSS_DTYPE_RTOL * np.asarray([float(np.nanmax(np.abs([w[_MIN], w[_MAX], 0.0]))) for w in target])

        with np.errstate(invalid="ignore", over="ignore"):
            ok = np.all((firsts > 0) & (firsts < whole), axis=1)
            ok &= np.all(moments[:, :, _ABS] <= target[:, _ABS] + slack, axis=1)
            ok &= np.all(moments[:, :, _SQ] <= target[:, _SQ] * (1 + 2 * CROSS_DTYPE_RTOL) + 1e-30, axis=1)
            ok &= np.all(moments[:, :, _MIN] >= target[:, _MIN] - extent, axis=1)
            ok &= np.all(moments[:, :, _MAX] <= target[:, _MAX] + extent, axis=1)
        return {int(m) for m in modules[ok]} & available


def _signature(shapes: list[tuple[int, ...]]) -> tuple[Any, ...]:
    """What a part must share with its fused module, row by row: rank and every dimension but the first."""
    return tuple((len(shape), tuple(shape[1:])) for shape in shapes)


# -- parameter level ------------------------------------------------------------


def _index_by_numel(side: Side, skip: set[int]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Identity rows grouped by element count, sorted by sum of squares for window lookups."""
    groups: dict[int, list[int]] = defaultdict(list)
    for module, rows in enumerate(side.identity):
        if module in skip:
            continue
        for row in rows:
            groups[math.prod(side.table.params[row].shape)].append(row)
    index = {}
    for numel, rows in groups.items():
        moments = side.table.param_moments[np.asarray(rows, dtype=np.int64)]
        order = np.argsort(moments[:, _SQ], kind="stable")
        index[numel] = (moments[order, _SQ].copy(), np.asarray(rows, dtype=np.int64)[order], moments[order])
    return index


def _param_candidates(
    side: Side, row: int, other: Side, by_numel: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> list[int]:
    numel = math.prod(side.table.params[row].shape)
    if numel not in by_numel:
        return []
    keys, rows, moments = by_numel[numel]
    mine = side.table.param_moments[row]
    sumsq = float(mine[_SQ])
    if math.isnan(sumsq):
        window = np.flatnonzero(np.isnan(keys))
    else:
        slack = 2 * CROSS_DTYPE_RTOL * abs(sumsq) + 1e-30
        low = int(np.searchsorted(keys, sumsq - slack, side="left"))
        high = int(np.searchsorted(keys, sumsq + slack, side="right"))
        # Cheap vectorised screen on |sum| and sum before the exact per-pair check.
        near = moments[low:high]
        scale = 2 * CROSS_DTYPE_RTOL * np.maximum(np.abs(near[:, _ABS]), abs(mine[_ABS])) + 1e-30
        extent = 2 * CROSS_DTYPE_RTOL * np.maximum(np.abs(near[:, [_MIN, _MAX]]).max(axis=1), abs(mine[_MAX])) + 1e-30
        with np.errstate(invalid="ignore"):
            keep = (
                (np.abs(near[:, _ABS] - mine[_ABS]) <= scale)
                & (np.abs(near[:, _SUM] - mine[_SUM]) <= scale)
                & ((np.abs(near[:, _MIN] - mine[_MIN]) <= extent) | (np.isnan(near[:, _MIN]) & np.isnan(mine[_MIN])))
                & ((np.abs(near[:, _MAX] - mine[_MAX]) <= extent) | (np.isnan(near[:, _MAX]) & np.isnan(mine[_MAX])))
            )
        window = low + np.flatnonzero(keep)
    return [int(rows[k]) for k in window if _param_match(side, row, other, int(rows[k])) is not None]


def _param_match(a: Side, i: int, b: Side, j: int) -> tuple[bool, str] | None:
    """Whether param row ``i`` of ``a`` holds the values of row ``j`` of ``b``.

    Returns:
        ``(exact, detail)`` or None when they differ.
    """
    pa, pb = a.table.params[i], b.table.params[j]
    if math.prod(pa.shape) != math.prod(pb.shape):
        return None
    same_dtype = pa.dtype == pb.dtype
    rtol = SAME_DTYPE_RTOL if same_dtype else CROSS_DTYPE_RTOL
    if not _moments_close(a.table.param_moments[i], b.table.param_moments[j], rtol):
        return None
    detail = "" if same_dtype else f"{pa.dtype}->{pb.dtype}"
    plain_a, plain_b = a.table.param_samples[i], b.table.param_samples[j]
    if pa.shape == pb.shape and _samples_close(plain_a, plain_b, rtol):
        return same_dtype, detail
    if len(pa.shape) == 2 and pb.shape == pa.shape[::-1] and _samples_close(a.table.param_samples_t[i], plain_b, rtol):
        return False, _join(detail, "transposed")
    if pa.shape != pb.shape and _samples_close(plain_a, plain_b, rtol):
        return False, _join(detail, f"reshaped {_shape(pa.shape)}->{_shape(pb.shape)}")
    return None


def _match_multiset(a: Side, rows_a: list[int], b: Side, rows_b: list[int]) -> ModuleMatch | None:
    """Pair every identity tensor of one module with a distinct one of the other (names ignored)."""
    options = []
    for i in rows_a:
        found = {j: how for j in rows_b if (how := _param_match(a, i, b, j)) is not None}
        if not found:
            return None
        options.append(found)
    chosen = _assign(options, 0, set())
    if chosen is None:
        return None
    details = sorted({how[1] for how in chosen if how[1]})
    return ModuleMatch(exact=all(how[0] for how in chosen), detail=", ".join(details))


def _assign(options: list[dict[int, tuple[bool, str]]], k: int, used: set[int]) -> list[tuple[bool, str]] | None:
    if k == len(options):
        return []
    for j, how in options[k].items():
        if j in used:
            continue
        rest = _assign(options, k + 1, used | {j})
        if rest is not None:
            return [how, *rest]
    return None


def _moments_close(ma: np.ndarray, mb: np.ndarray, rtol: float) -> bool:
    if ma[_NAN] != mb[_NAN] or ma[_INF] != mb[_INF]:
        return False
    scale = max(abs(ma[_ABS]), abs(mb[_ABS]))
    if not _close(ma[_SUM], mb[_SUM], rtol * scale):
        return False
    if not _close(ma[_ABS], mb[_ABS], rtol * scale):
        return False
    if not _close(ma[_SQ], mb[_SQ], 2 * rtol * max(abs(ma[_SQ]), abs(mb[_SQ]))):
        return False
    extent = np.nanmax(np.abs([ma[_MIN], ma[_MAX], mb[_MIN], mb[_MAX], 0.0]))
    return _close(ma[_MIN], mb[_MIN], rtol * extent) and _close(ma[_MAX], mb[_MAX], rtol * extent)


def _samples_close(sa: np.ndarray, sb: np.ndarray, rtol: float) -> bool:
    nan_a, nan_b = np.isnan(sa), np.isnan(sb)
    if not np.array_equal(nan_a, nan_b):
        return False
    va, vb = sa[~nan_a], sb[~nan_b]
    if va.size == 0:
        return True
    floor = rtol * 1e-3 * float(np.max(np.abs(vb)))
    return bool(np.all(np.abs(va - vb) <= rtol * np.abs(vb) + floor + 1e-300))


def _close(x: float, y: float, atol: float) -> bool:
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    if math.isinf(x) or math.isinf(y):
        return x == y
    return abs(x - y) <= atol + 1e-300


# -- fused modules ----------------------------------------------------------------


def _ordered_rows(side: Side, module: int) -> list[int]:
    """Identity rows in a canonical order so parts and fused tensor line up by role."""
    rows = side.identity[module]
    return sorted(rows, key=lambda r: (len(side.table.params[r].shape), side.table.params[r].name))


def _moments(side: Side, row: int) -> np.ndarray:
    return side.table.param_moments[row]


def _could_be_part(part: tuple[int, ...], whole: tuple[int, ...]) -> bool:
    return len(part) == len(whole) and len(part) > 0 and part[1:] == whole[1:] and 0 < part[0] < whole[0]


def _within(part: np.ndarray, whole: np.ndarray) -> bool:
    """Cheap necessary conditions for ``part`` being a slice of ``whole``."""
    slack = CROSS_DTYPE_RTOL * (abs(whole[_ABS]) + 1e-30)
    extent = CROSS_DTYPE_RTOL * float(np.nanmax(np.abs([whole[_MIN], whole[_MAX], 0.0])))
    return (
        part[_ABS] <= whole[_ABS] + slack
        and part[_SQ] <= whole[_SQ] * (1 + 2 * CROSS_DTYPE_RTOL) + 1e-30
        and part[_MIN] >= whole[_MIN] - extent
        and part[_MAX] <= whole[_MAX] + extent
    )


def _stacks_to(parts_side: Side, combo: tuple[int, ...], fused_side: Side, rows: list[int]) -> bool:
    """Do the parts' tensors, stacked on dim 0, have the fused tensors' shapes and moments?"""
    part_rows = [_ordered_rows(parts_side, module) for module in combo]
    for k, row in enumerate(rows):
        whole = fused_side.table.params[row]
        pieces = [parts_side.table.params[r[k]] for r in part_rows]
        if sum(p.shape[0] for p in pieces) != whole.shape[0]:
            return False
        same_dtype = all(p.dtype == whole.dtype for p in pieces)
        rtol = SAME_DTYPE_RTOL if same_dtype else CROSS_DTYPE_RTOL
        stacked = _stack_moments(np.stack([parts_side.table.param_moments[r[k]] for r in part_rows]))
        if not _moments_close(stacked, fused_side.table.param_moments[row], rtol):
            return False
    return True


def _stack_moments(parts: np.ndarray) -> np.ndarray:
    out = parts.sum(axis=0)
    out[_MIN] = np.nanmin(parts[:, _MIN])
    out[_MAX] = np.nanmax(parts[:, _MAX])
    return out


def _concat_order(
    parts_side: Side, parts: list[int], fused_side: Side, rows: list[int], order: dict[int, float]
) -> list[int]:
    """The order the parts were concatenated in, read from samples where positions coincide.

    The fused tensor's sample positions fall into the parts' flat ranges; where
    one lands on a position the part sampled too, the values must agree. The
    permutation with the most agreeing and no disagreeing values wins; if no
    position coincides, execution (or definition) order decides.
    """
    default = sorted(parts, key=lambda m: (order.get(m, math.inf), m))
    best, best_hits = default, 0
    for perm in itertools.permutations(default):
        hits = _sample_agreement(parts_side, list(perm), fused_side, rows)
        if hits is not None and hits > best_hits:
            best, best_hits = list(perm), hits
    return best


def _sample_agreement(parts_side: Side, perm: list[int], fused_side: Side, rows: list[int]) -> int | None:
    hits = 0
    for k, row in enumerate(rows):
        whole = fused_side.table.params[row]
        part_rows = [_ordered_rows(parts_side, module)[k] for module in perm]
        numels = [math.prod(parts_side.table.params[r].shape) for r in part_rows]
        starts = np.cumsum([0, *numels])
        positions = _sample_positions(math.prod(whole.shape), FINGERPRINT_SAMPLE)
        values = fused_side.table.param_samples[row]
        rtol = SAME_DTYPE_RTOL if parts_side.table.params[part_rows[0]].dtype == whole.dtype else CROSS_DTYPE_RTOL
        for slot, flat in enumerate(positions):
            which = int(np.searchsorted(starts, flat, side="right")) - 1
            local = flat - int(starts[which])
            part_positions = _sample_positions(numels[which], FINGERPRINT_SAMPLE)
            if local not in part_positions:
                continue
            expected = parts_side.table.param_samples[part_rows[which]][part_positions.index(local)]
            if not _samples_close(np.array([values[slot]]), np.array([expected]), rtol):
                return None
            hits += 1
    return hits


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "()"


def _sample_positions(numel: int, size: int) -> list[int]:
    """:func:`tracediff.hooks.stats.sample_positions` without torch (reading traces never imports it)."""
    if numel <= size:
        return list(range(numel))
    return [i * numel // size for i in range(size)]
