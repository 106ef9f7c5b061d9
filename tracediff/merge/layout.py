"""Sharded or replicated: the dimension each merged record was split along, and its merged shape and moments.

Strongest evidence first: a declaration (``--shard-dim``); shapes that differ across ranks in one dimension; the
shape of the same record on the unsharded side (``reference``). An equal-shaped record with none of these is
taken as replicated, and counted as an assumption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracediff.errors import MergeError
from tracediff.merge.grouping import Groups, Vocabulary
from tracediff.merge.rules import NameMap, ShardRule, name_mapper
from tracediff.store.format import MAX_DIMS
from tracediff.store.trace import Trace

_UNDECLARED = -(10**9)
_DECLARED_REPLICATED = -(10**9) + 1


@dataclass
class ShardLayout:
    """Per group: the rank shapes, the shard dimension (-1: replicated) and the merged shape."""

    shapes: np.ndarray  # (G, C, MAX_DIMS), -1 where absent
    ndim: np.ndarray  # (G, C), -1 where absent
    dim: np.ndarray  # (G,)
    bad_shape: np.ndarray  # (G,): no valid sharding, a rank mismatch of kind "shape"
    assumed: np.ndarray  # (G,): equal shapes taken as replicated without evidence
    sizes: np.ndarray  # (G, C): each rank's extent along ``dim``
    merged_shape: np.ndarray  # (G, MAX_DIMS)
    merged_ndim: np.ndarray  # (G,)

    def shape_differs(self, c: int, base: np.ndarray) -> np.ndarray:
        """Per group: whether rank column ``c``'s shape differs from the base column's."""
        rows = np.arange(len(base))
        return (self.ndim[:, c] != self.ndim[rows, base]) | np.any(self.shapes[:, c] != self.shapes[rows, base],
                                                                   axis=1)


def infer_layout(groups: Groups, vocabulary: Vocabulary, *, reference: Trace | None, name_map: NameMap | None,
                 rules: list[ShardRule], world: int) -> ShardLayout:
    """Decide every group's shard dimension.

    Raises:
        MergeError: a declared dimension does not exist in a record's shape.
    """
    n, n_cols = groups.idx.shape
    shapes = np.full((n, n_cols, MAX_DIMS), -1, dtype=np.int64)
    for c, trace in enumerate(groups.traces):
        sel = groups.present[:, c]
        shapes[sel, c] = trace.records.shape[groups.idx[sel, c]]
    ndim = groups.column("ndim", -1, np.int64)
    rows = np.arange(n)
    base_shape = shapes[rows, groups.base_col]
    base_ndim = ndim[rows, groups.base_col]
    dims = np.arange(MAX_DIMS)[None, :] < base_ndim[:, None]
    differ = np.zeros((n, MAX_DIMS), dtype=bool)
    same_ndim = np.ones(n, dtype=bool)
    for c in range(n_cols):
        here = groups.present[:, c]
        differ |= here[:, None] & (shapes[:, c] != base_shape) & dims
        same_ndim &= ~here | (ndim[:, c] == base_ndim)
    n_differ = differ.sum(axis=1)
    n_present = groups.present.sum(axis=1)

    dim = np.full(n, -1, dtype=np.int64)  # -1 replicated
    bad_shape = np.zeros(n, dtype=bool)
    # 1. shapes that differ across ranks in exactly one dimension
    by_ranks = same_ndim & (n_differ == 1)
    dim[by_ranks] = np.argmax(differ[by_ranks], axis=1)
    bad_shape |= ~same_ndim | (n_differ > 1)
    # 2. equal shapes: against the unsharded side
    equal = same_ndim & (n_differ == 0) & (n_present > 1)
    ref_shape, ref_known = _reference_shapes(groups, vocabulary, ndim, reference, name_map)
    with_ref = equal & ref_known
    ref_dims = (ref_shape != base_shape) & dims
    one = with_ref & (ref_dims.sum(axis=1) == 1)
    d = np.argmax(ref_dims, axis=1)
    size = base_shape[rows, d]
    bigger = ref_shape[rows, d]
    sharded_by_ref = one & ((bigger == size * n_present) | (bigger == size * world))
    dim[sharded_by_ref] = d[sharded_by_ref]
    assumed = equal & ~ref_known
    # 3. declarations win
    declared, rule_text = _declared(groups, vocabulary, rules)
    for g in np.flatnonzero(declared != _UNDECLARED):
        want = int(declared[g])
        bad_shape[g] = False
        assumed[g] = False
        if want == _DECLARED_REPLICATED:
            dim[g] = -1
            bad_shape[g] = not same_ndim[g] or n_differ[g] > 0
            continue
        nd = int(base_ndim[g])
        real = want + nd if want < 0 else want
        if not 0 <= real < nd:
            shape = tuple(int(x) for x in base_shape[g, :nd])
            raise MergeError(
                f"--shard-dim {rule_text[int(g)]!r}: dimension {want} does not exist in "
                f"{vocabulary.names[groups.keys[g, 0]]!r} {vocabulary.labels[groups.keys[g, 3]]} of shape {shape}"
            )
        others = differ[g].copy()
        others[real] = False
        if not same_ndim[g] or others.any():
            bad_shape[g] = True
            dim[g] = -1
        else:
            dim[g] = real
    dim[bad_shape] = -1
    dim[n_present < 2] = -1
    sizes = np.zeros((n, n_cols), dtype=np.int64)
    sharded = np.flatnonzero(dim >= 0)
    for c in range(n_cols):
        sizes[sharded, c] = np.where(groups.present[sharded, c], shapes[sharded, c, dim[sharded]], 0)
    merged_shape = base_shape.copy()
    merged_shape[sharded, dim[sharded]] = sizes[sharded].sum(axis=1)
    return ShardLayout(shapes=shapes, ndim=ndim, dim=dim, bad_shape=bad_shape & (n_present > 1), assumed=assumed,
                       sizes=sizes, merged_shape=merged_shape, merged_ndim=base_ndim)


def merge_moments(groups: Groups, dim: np.ndarray) -> dict[str, np.ndarray]:
    """The merged records' moment columns: sums and counts add over shards, min and max combine."""
    n = groups.n
    rows = np.arange(n)
    base = groups.base_col
    cols: dict[str, np.ndarray] = {}
    sharded = dim >= 0
    numel = groups.column("numel", 0, np.int64)
    for name in ("sum", "abs_sum", "sumsq"):
        values = groups.column(name)
        total = np.where(groups.present, values, 0.0).sum(axis=1)
        cols[name] = np.where(sharded, total, values[rows, base])
    for name in ("nan_count", "inf_count", "numel"):
        values = numel if name == "numel" else groups.column(name, 0, np.int64)
        total = np.where(groups.present, values, 0).sum(axis=1)
        cols[name] = np.where(sharded, total, values[rows, base])
    nonempty = groups.present & (numel > 0)
    for name, reduce, fill in (("min", np.min, np.inf), ("max", np.max, -np.inf)):
        values = groups.column(name)
        combined = reduce(np.where(nonempty, values, fill), axis=1) if n else np.zeros(0)
        combined = np.where(nonempty.any(axis=1), combined, np.nan)
        cols[name] = np.where(sharded, combined, values[rows, base])
    return cols


def _declared(groups: Groups, vocabulary: Vocabulary, rules: list[ShardRule]) -> tuple[np.ndarray, dict[int, str]]:
    """Per group: the declared dimension (or a marker for none / replicated), and the rule text that said so."""
    out = np.full(groups.n, _UNDECLARED, dtype=np.int64)
    rule_text: dict[int, str] = {}
    if not rules:
        return out, rule_text
    decisions: dict[int, tuple[int, str] | None] = {}
    for module in np.unique(groups.keys[:, 0]).tolist():
        name = vocabulary.names[module] if module >= 0 else ""
        rule = next((r for r in rules if r.pattern.search(name)), None)
        decisions[module] = None if rule is None else (
            _DECLARED_REPLICATED if rule.dim is None else rule.dim, rule.text
        )
    for g, module in enumerate(groups.keys[:, 0].tolist()):
        decision = decisions[module]
        if decision is not None:
            out[g], rule_text[g] = decision
    return out, rule_text


def _reference_shapes(groups: Groups, vocabulary: Vocabulary, ndim: np.ndarray, ref: Trace | None,
                      name_map: NameMap | None) -> tuple[np.ndarray, np.ndarray]:
    """The unsharded side's shape of each group's record, matched by name, tensor and call."""
    n = groups.n
    shape = np.full((n, MAX_DIMS), -1, dtype=np.int64)
    known = np.zeros(n, dtype=bool)
    if ref is None or not len(ref.records):
        return shape, known
    cols = ref.records.columns
    by_key: dict[tuple[str, str, int], int] = {}
    by_name: dict[tuple[str, str], int] = {}
    names = ref.modules.names
    r_keys = np.stack([cols["module"].astype(np.int64), cols["label"].astype(np.int64),
                       cols["call"].astype(np.int64)], axis=1)
    uniq, first = np.unique(r_keys, axis=0, return_index=True)
    for (module, label, call), row in zip(uniq.tolist(), first.tolist(), strict=True):
        if module < 0 or cols["numel"][row] < 0:
            continue
        key = (names[module], ref.records.labels[label])
        by_key.setdefault((*key, call), row)
        by_name.setdefault(key, row)
    mapper = name_mapper(name_map)
    combos, inverse = np.unique(groups.keys[:, [0, 3, 2]], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    rows = np.full(len(combos), -1, dtype=np.int64)
    for k, (module, label, call) in enumerate(combos.tolist()):
        if module < 0:
            continue
        name = mapper(vocabulary.names[module])
        if name is None:
            continue
        key = (name, vocabulary.labels[label])
        rows[k] = by_key.get((*key, call), by_name.get(key, -1))
    hit = rows[inverse]
    known = hit >= 0
    shape[known] = ref.records.shape[hit[known]]
    ref_ndim = np.where(known, cols["ndim"][np.maximum(hit, 0)], -1) if len(hit) else np.zeros(0, np.int64)
    same_ndim = ref_ndim == ndim[np.arange(n), groups.base_col]
    return shape, known & same_ndim
