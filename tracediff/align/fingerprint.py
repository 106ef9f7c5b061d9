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

import bisect
import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracediff.align.side import Side
from tracediff.modtree import parent
from tracediff.moments import (
    ABS_SUM,
    MAX,
    MIN,
    SUM,
    SUMSQ,
    moments_close,
    moments_may_be_close,
    sample_positions,
    stack_moments,
)
from tracediff.store.trace import FINGERPRINT_SAMPLE

#: Relative tolerance when both tensors have the same dtype (reduction order only).
SAME_DTYPE_RTOL = 1e-6
#: Relative tolerance across a dtype change: bf16 keeps 8 significant bits (~4e-3).
CROSS_DTYPE_RTOL = 1e-2
#: Largest number of parts tried for a fused module (q/k/v, gate/up, ...).
MAX_FUSED_PARTS = 4


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
        # The first identity row of a module is matched twice (window, then multiset): computed once.
        self._matches: dict[tuple[int, int], tuple[bool, str] | None] = {}
        by_numel = _index_by_numel(port, skip_port)
        modules = [m for m, rows in enumerate(upstream.identity) if rows and m not in skip_upstream]
        screened = _screened_candidates(upstream, [upstream.identity[m][0] for m in modules], by_numel)
        for module, window in zip(modules, screened, strict=True):
            rows = upstream.identity[module]
            found = self._match_module(rows, window)
            if found:
                self.candidates[module] = found
                for other, how in found.items():
                    self.reverse[other][module] = how

    def _match(self, i: int, j: int) -> tuple[bool, str] | None:
        """:func:`_param_match` of upstream row ``i`` and port row ``j``, remembered."""
        key = (i, j)
        if key not in self._matches:
            self._matches[key] = _param_match(self.upstream, i, self.port, j)
        return self._matches[key]

    def _match_module(self, rows: list[int], window: np.ndarray) -> dict[int, ModuleMatch]:
        """Port modules whose identity tensors all match ``rows`` (``window``: screened rows for ``rows[0]``)."""
        first = [int(r) for r in window if self._match(rows[0], int(r)) is not None]
        owners = {self.port.table.params[row].module_index for row in first}
        found: dict[int, ModuleMatch] = {}
        for owner in sorted(owners):
            other_rows = self.port.identity[owner]
            if len(other_rows) != len(rows):
                continue
            how = _match_multiset(rows, other_rows, self._match)
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
    target = [fused_side.table.param_moments[row] for row in rows]
    shapes = [fused_side.table.params[row].shape for row in rows]
    if any(len(shape) == 0 for shape in shapes):
        return None
    by_parent: dict[str, list[int]] = defaultdict(list)
    for module in sorted(available):
        if checked:
            by_parent[parent(parts_side.names[module])].append(module)
            continue
        part_rows = _ordered_rows(parts_side, module)
        if len(part_rows) != len(rows):
            continue
        part_shapes = [parts_side.table.params[row].shape for row in part_rows]
        if not all(_could_be_part(s, t) for s, t in zip(part_shapes, shapes, strict=True)):
            continue
        if not all(_within(parts_side.table.param_moments[r], m) for r, m in zip(part_rows, target, strict=True)):
            continue
        by_parent[parent(parts_side.names[module])].append(module)
    fits: list[tuple[int, ...]] = []
    whole = tuple(shape[0] for shape in shapes)
    for siblings in by_parent.values():
        # Most combinations fail on their first dimensions alone: add those up before _stacks_to's full test.
        for size in range(2, min(MAX_FUSED_PARTS, len(siblings)) + 1):
            for combo in itertools.combinations(siblings, size):
                if tuple(map(sum, zip(*(_first_dims(parts_side, m) for m in combo), strict=True))) != whole:
                    continue
                if _abs_sums_may_stack(parts_side, combo, fused_side, rows) and _stacks_to(
                    parts_side, combo, fused_side, rows
                ):
                    fits.append(combo)
    if len(fits) != 1:
        return None
    return _concat_order(parts_side, list(fits[0]), fused_side, rows, order)


class FusedShortlist:
    """The modules of one side that may be parts of a given fused module, found without visiting them all.

    :func:`find_fused` tests every available module (row count, shapes, moments);
    that loop, once per fused module, is quadratic in the model's size. The modules
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
        slack = CROSS_DTYPE_RTOL * (np.abs(target[:, ABS_SUM]) + 1e-30)
        extent = CROSS_DTYPE_RTOL * np.asarray([float(np.nanmax(np.abs([w[MIN], w[MAX], 0.0]))) for w in target])

        with np.errstate(invalid="ignore", over="ignore"):
            ok = np.all((firsts > 0) & (firsts < whole), axis=1)
            ok &= np.all(moments[:, :, ABS_SUM] <= target[:, ABS_SUM] + slack, axis=1)
            ok &= np.all(moments[:, :, SUMSQ] <= target[:, SUMSQ] * (1 + 2 * CROSS_DTYPE_RTOL) + 1e-30, axis=1)
            ok &= np.all(moments[:, :, MIN] >= target[:, MIN] - extent, axis=1)
            ok &= np.all(moments[:, :, MAX] <= target[:, MAX] + extent, axis=1)
        return set(modules[ok].tolist()) & available


def _signature(shapes: list[tuple[int, ...]]) -> tuple[Any, ...]:
    """What a part must share with its fused module, row by row: rank and every dimension but the first."""
    return tuple((len(shape), tuple(shape[1:])) for shape in shapes)


# -- parameter level ------------------------------------------------------------


#: Identity rows of one side of one element count and dtype: sums of squares (sorted), rows, their moments.
_Bucket = tuple[np.ndarray, np.ndarray, np.ndarray]


def _index_by_numel(side: Side, skip: set[int]) -> dict[int, dict[str, _Bucket]]:
    """Identity rows grouped by element count, then dtype, sorted by sum of squares for window lookups.

    Split by dtype because a tensor of the same dtype must match to 1e-6, which
    narrows the window on the sum of squares to almost nothing (see :func:`_windows`).
    """
    groups: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for module, rows in enumerate(side.identity):
        if module in skip:
            continue
        for row in rows:
            entry = side.table.params[row]
            groups[math.prod(entry.shape)][entry.dtype].append(row)
    index: dict[int, dict[str, _Bucket]] = {}
    for numel, by_dtype in groups.items():
        index[numel] = {}
        for dtype, rows in by_dtype.items():
            moments = side.table.param_moments[np.asarray(rows, dtype=np.int64)]
            order = np.argsort(moments[:, SUMSQ], kind="stable")
            ordered_rows = np.asarray(rows, dtype=np.int64)[order]
            index[numel][dtype] = (moments[order, SUMSQ].copy(), ordered_rows, moments[order])
    return index


def _screened_candidates(side: Side, rows: list[int], by_numel: dict[int, dict[str, _Bucket]]) -> list[np.ndarray]:
    """For each of ``rows``, the other side's rows that may hold its values, all rows of a size at once.

    Same-sized rows whose sum of squares lies within the window, that pass the
    screen on |sum|, sum and extrema, and may pass :func:`~tracediff.moments.moments_close`; the
    caller runs the exact :func:`_param_match` on these few. Done row by row,
    the array operations' fixed cost would dominate the fingerprint stage on large models.
    """
    found: list[list[np.ndarray]] = [[] for _ in rows]
    by_size: dict[tuple[int, str], list[int]] = defaultdict(list)
    for k, row in enumerate(rows):
        entry = side.table.params[row]
        by_size[(math.prod(entry.shape), entry.dtype)].append(k)
    for (numel, dtype), ks in by_size.items():
        mine = side.table.param_moments[np.asarray([rows[k] for k in ks], dtype=np.int64)]
        for other_dtype, (keys, others, moments) in by_numel.get(numel, {}).items():
            rtol = SAME_DTYPE_RTOL if other_dtype == dtype else CROSS_DTYPE_RTOL
            owner, window = _windows(mine, keys, moments, rtol)
            kept = moments_may_be_close(mine[owner], moments[window], np.full(len(window), rtol))
            owner, window = owner[kept], window[kept]
            bounds = np.searchsorted(owner, np.arange(len(ks) + 1))
            for i, k in enumerate(ks):
                found[k].append(others[window[bounds[i]:bounds[i + 1]]])
    return [np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64) for parts in found]


def _windows(mine: np.ndarray, keys: np.ndarray, moments: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """``(which of mine, index into keys)`` of every pair in a row's sum-of-squares window passing the screen.

    Row by row: a NaN sum of squares takes every NaN key; otherwise the window
    ``sumsq ± 2 % (+1e-30)`` of the sorted keys, screened on |sum|, sum and extrema.
    Pairs come sorted by row of ``mine``, then by key.

    Only pairs that may pass :func:`~tracediff.moments.moments_close` at ``rtol`` matter, and it bounds
    the sums of squares too: ``|a - b| <= 2 rtol max(|a|, |b|)`` implies
    ``|a - b| <= 2 rtol |a| / (1 - 2 rtol)``; a finite sum of squares' window is cut to
    that (widened by 3 %), which at 1e-6 (same dtype) leaves a handful of rows, not all of them.
    """
    sumsq = mine[:, SUMSQ]
    nan = np.isnan(sumsq)
    slack = 2 * CROSS_DTYPE_RTOL * np.abs(sumsq) + 1e-30
    low = np.searchsorted(keys, sumsq - slack, side="left")
    high = np.searchsorted(keys, sumsq + slack, side="right")
    bound = 2.06 * rtol / (1 - 2 * rtol) * np.abs(sumsq) + 1e-290
    finite = np.isfinite(sumsq) & np.isfinite(bound)
    low[finite] = np.maximum(low, np.searchsorted(keys, sumsq - bound, side="left"))[finite]
    high[finite] = np.minimum(high, np.searchsorted(keys, sumsq + bound, side="right"))[finite]
    low[nan], high[nan] = 0, 0
    counts = np.maximum(high - low, 0)
    owner = np.repeat(np.arange(len(mine)), counts)
    starts = np.cumsum(counts) - counts
    index = np.repeat(low, counts) + (np.arange(int(counts.sum())) - np.repeat(starts, counts))
    near, m = moments[index], mine[owner]
    scale = 2 * CROSS_DTYPE_RTOL * np.maximum(np.abs(near[:, ABS_SUM]), np.abs(m[:, ABS_SUM])) + 1e-30
    extent = 2 * CROSS_DTYPE_RTOL * np.maximum(np.abs(near[:, [MIN, MAX]]).max(axis=1), np.abs(m[:, MAX])) + 1e-30
    with np.errstate(invalid="ignore"):
        keep = (
            (np.abs(near[:, ABS_SUM] - m[:, ABS_SUM]) <= scale)
            & (np.abs(near[:, SUM] - m[:, SUM]) <= scale)
            & ((np.abs(near[:, MIN] - m[:, MIN]) <= extent) | (np.isnan(near[:, MIN]) & np.isnan(m[:, MIN])))
            & ((np.abs(near[:, MAX] - m[:, MAX]) <= extent) | (np.isnan(near[:, MAX]) & np.isnan(m[:, MAX])))
        )
    owner, index = owner[keep], index[keep]
    if nan.any():  # rare: a tensor whose sum of squares is NaN matches only such tensors, unscreened
        nan_keys = np.flatnonzero(np.isnan(keys))
        extra_owner = np.repeat(np.flatnonzero(nan), len(nan_keys))
        extra_index = np.tile(nan_keys, int(nan.sum()))
        owner, index = np.concatenate([owner, extra_owner]), np.concatenate([index, extra_index])
        order = np.argsort(owner, kind="stable")
        owner, index = owner[order], index[order]
    return owner, index


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
    if not moments_close(a.table.param_moments[i], b.table.param_moments[j], rtol):
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


def _match_multiset(
    rows_a: list[int], rows_b: list[int], match: Callable[[int, int], tuple[bool, str] | None]
) -> ModuleMatch | None:
    """Pair every identity tensor of one module with a distinct one of the other (names ignored).

    ``match(i, j)`` is :func:`_param_match` of row ``i`` of one side and row ``j`` of the other.
    """
    options = []
    for i in rows_a:
        found = {j: how for j in rows_b if (how := match(i, j)) is not None}
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


def _samples_close(sa: np.ndarray, sb: np.ndarray, rtol: float) -> bool:
    nan_a, nan_b = np.isnan(sa), np.isnan(sb)
    if not np.array_equal(nan_a, nan_b):
        return False
    va, vb = sa[~nan_a], sb[~nan_b]
    if va.size == 0:
        return True
    with np.errstate(invalid="ignore"):  # inf - inf is nan: not close, and not a warning for the user
        floor = rtol * 1e-3 * float(np.max(np.abs(vb)))
        return bool(np.all(np.abs(va - vb) <= rtol * np.abs(vb) + floor + 1e-300))


# -- fused modules ----------------------------------------------------------------


def _ordered_rows(side: Side, module: int) -> list[int]:
    """Identity rows in a canonical order so parts and fused tensor line up by role.

    Asked for again and again (every combination of siblings, every permutation),
    so each module's order is sorted once and kept on the side; do not modify the list.
    """
    cache = side.ordered_rows
    if module not in cache:
        rows = side.identity[module]
        cache[module] = sorted(rows, key=lambda r: (len(side.table.params[r].shape), side.table.params[r].name))
    return cache[module]


def _first_dims(side: Side, module: int) -> tuple[int, ...]:
    """First dimension of each identity tensor in :func:`_ordered_rows` order (kept on the side, like it)."""
    cache = side.first_dims
    if module not in cache:
        cache[module] = tuple(side.table.params[r].shape[0] for r in _ordered_rows(side, module))
    return cache[module]


def _could_be_part(part: tuple[int, ...], whole: tuple[int, ...]) -> bool:
    return len(part) == len(whole) and len(part) > 0 and part[1:] == whole[1:] and 0 < part[0] < whole[0]


def _within(part: np.ndarray, whole: np.ndarray) -> bool:
    """Cheap necessary conditions for ``part`` being a slice of ``whole``."""
    slack = CROSS_DTYPE_RTOL * (abs(whole[ABS_SUM]) + 1e-30)
    extent = CROSS_DTYPE_RTOL * float(np.nanmax(np.abs([whole[MIN], whole[MAX], 0.0])))
    return (
        part[ABS_SUM] <= whole[ABS_SUM] + slack
        and part[SUMSQ] <= whole[SUMSQ] * (1 + 2 * CROSS_DTYPE_RTOL) + 1e-30
        and part[MIN] >= whole[MIN] - extent
        and part[MAX] <= whole[MAX] + extent
    )


def _stacks_to(parts_side: Side, combo: tuple[int, ...], fused_side: Side, rows: list[int]) -> bool:
    """Do the parts' tensors, stacked on dim 0, have the fused tensors' shapes and moments?"""
    part_rows = [_ordered_rows(parts_side, module) for module in combo]
    params = parts_side.table.params
    # The shapes rule most combinations out: test them all before any moment (the answer is the same).
    for k, row in enumerate(rows):
        if sum(params[r[k]].shape[0] for r in part_rows) != fused_side.table.params[row].shape[0]:
            return False
    for k, row in enumerate(rows):
        whole = fused_side.table.params[row]
        pieces = [params[r[k]] for r in part_rows]
        same_dtype = all(p.dtype == whole.dtype for p in pieces)
        rtol = SAME_DTYPE_RTOL if same_dtype else CROSS_DTYPE_RTOL
        stacked = stack_moments(np.stack([parts_side.table.param_moments[r[k]] for r in part_rows]))
        if not moments_close(stacked, fused_side.table.param_moments[row], rtol):
            return False
    return True


def _abs_sums_may_stack(parts_side: Side, combo: tuple[int, ...], fused_side: Side, rows: list[int]) -> bool:
    """Whether the parts' |sums| may add up to the fused tensors' as :func:`_stacks_to` requires (plain floats).

    Siblings of the right sizes in every other block reach :func:`_stacks_to`
    and fail there on their moments, each through several array operations. The
    |sum| test alone (tolerance widened by 1e-6 of itself, non-finite values left
    to the full test) turns them away first; what passes still gets the full test.
    """
    part_rows = [_ordered_rows(parts_side, module) for module in combo]
    params, moments = parts_side.table.params, parts_side.table.param_moments
    for k, row in enumerate(rows):
        whole = fused_side.table.params[row]
        same_dtype = all(params[r[k]].dtype == whole.dtype for r in part_rows)
        rtol = SAME_DTYPE_RTOL if same_dtype else CROSS_DTYPE_RTOL
        total = sum(float(moments[r[k], ABS_SUM]) for r in part_rows)
        target = float(fused_side.table.param_moments[row, ABS_SUM])
        if not (math.isfinite(total) and math.isfinite(target)):
            continue
        if abs(total - target) > rtol * (1 + 1e-6) * max(abs(total), abs(target)) + 1e-290:
            return False
    return True


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
    """How many fused sample values agree with a part's sample at the same position (None: one disagrees).

    The parts are taken as stacked in the order ``perm``. Called for every
    permutation of every fused module, so positions are looked up in dicts and
    single values compared as floats (:func:`_value_close`), not as arrays.
    """
    hits = 0
    ordered = [_ordered_rows(parts_side, module) for module in perm]
    for k, row in enumerate(rows):
        whole = fused_side.table.params[row]
        part_rows = [r[k] for r in ordered]
        numels = [math.prod(parts_side.table.params[r].shape) for r in part_rows]
        starts = [0, *itertools.accumulate(numels)]
        positions = sample_positions(math.prod(whole.shape), FINGERPRINT_SAMPLE).tolist()
        values = fused_side.table.param_samples[row].tolist()
        rtol = SAME_DTYPE_RTOL if parts_side.table.params[part_rows[0]].dtype == whole.dtype else CROSS_DTYPE_RTOL
        slots = [_position_slots(numel) for numel in numels]
        for slot, flat in enumerate(positions):
            which = bisect.bisect_right(starts, flat) - 1
            local = flat - starts[which]
            where = slots[which].get(local)
            if where is None:
                continue
            expected = float(parts_side.table.param_samples[part_rows[which]][where])
            if not _value_close(values[slot], expected, rtol):
                return None
            hits += 1
    return hits


@functools.lru_cache(maxsize=4096)
def _position_slots(numel: int) -> dict[int, int]:
    """Flat position -> its slot in a tensor's fingerprint sample (the first slot where positions repeat).

    Remembered per size (every permutation of every fused module asks); do not modify the dict.
    """
    slots: dict[int, int] = {}
    for slot, flat in enumerate(sample_positions(numel, FINGERPRINT_SAMPLE).tolist()):
        slots.setdefault(flat, slot)
    return slots


def _value_close(x: float, y: float, rtol: float) -> bool:
    """:func:`_samples_close` of one value each, without building arrays (the same float64 operations)."""
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    floor = rtol * 1e-3 * abs(y)
    return abs(x - y) <= rtol * abs(y) + floor + 1e-300


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "()"
