"""Merge the per-rank traces of a tensor-/sequence-parallel run into one trace of the whole model.

Under ``torch.distributed`` every rank writes its own trace. A record of one
``(module, step, call, tensor)`` then exists once per rank, and is either

* **sharded**: each rank holds a slice of the tensor along one dimension (the
  output of a column-parallel linear, a sequence-parallel activation). The
  merged record is the concatenation, in rank order. Its moments combine
  exactly from the mergeable ones: sums, absolute sums, sums of squares and
  counts add, min and max combine. ``full`` tensors are concatenated and the
  ``sample`` is recomputed from them; without full tensors a sharded record's
  sample is dropped (the positions of the unsharded sample are not in any
  shard's sample) and the merged trace says how many were.
* **replicated**: every rank holds the same tensor (after an all-reduce, a
  replicated norm). The merged record carries the lowest rank's values, and
  every other rank's copy is checked against it; a copy that differs is a
  *rank mismatch*, itself a finding (``first-drift`` reports it with the rank).

Which one a record is comes from, strongest first: a declaration per module
regex (``--shard-dim REGEX=DIM``, or ``REGEX=replicated``); shapes that differ
across ranks (the one dimension that differs); the shape of the same record on
the unsharded side (``reference``): equal means replicated, one dimension
``world_size`` times larger means sharded along it. With none of these an
equal-shaped record is taken as replicated. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tracediff.errors import MergeError
from tracediff.store.format import FULL_F32, FULL_F64, FULL_NONE, MAX_DIMS, RECORD_COLUMNS
from tracediff.store.trace import MISMATCH_CHECKS, ModuleTable, ParamEntry, RankLayout, Records, Trace

__all__ = [
    "DEFAULT_REPLICA_RTOL",
    "ShardRule",
    "merge_files",
    "merge_traces",
    "parse_shard_dims",
    "write_trace",
]

#: Relative difference above which two copies of a replicated tensor count as different.
#: Copies computed from the same inputs by the same kernels are bitwise equal; this only
#: forgives the last bits of a reduction done in another order.
DEFAULT_REPLICA_RTOL = 1e-6
REPLICATED = "replicated"
_REPLICATED_WORDS = frozenset({"replicated", "r", "none"})
_TINY = 1e-300
_CHECK = {name: i for i, name in enumerate(MISMATCH_CHECKS)}
_MOMENT_CHECKS = ("sum", "abs_sum", "sumsq", "min", "max")

NameMap = Mapping[str, str] | Callable[[str], "str | None"]
ShardDims = Mapping[str, "int | str"] | Iterable["str | tuple[str, int | str]"] | None


@dataclass(frozen=True)
class ShardRule:
    """A declaration: modules whose name matches ``pattern`` are sharded along ``dim`` (None: replicated)."""

    pattern: re.Pattern[str]
    dim: int | None
    text: str


def parse_shard_dims(spec: ShardDims, *, source: str = "--shard-dim") -> list[ShardRule]:
    """Turn every accepted declaration form into rules, first match wins.

    Args:
        spec: ``{"regex": dim}``, a list of ``"REGEX=DIM"`` strings or ``(regex, dim)``
            pairs; ``dim`` is an integer (negative counts from the end) or ``replicated``.
        source: what to call the value in error messages.

    Raises:
        MergeError: a regex does not compile or a dimension is not an integer.
    """
    if spec is None:
        return []
    items: list[tuple[str, int | str]] = []
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        for item in spec:
            if isinstance(item, str):
                regex, sep, dim = item.rpartition("=")
                if not sep or not regex:
                    raise MergeError(f"{source}={item!r} is not REGEX=DIM; use e.g. 'fc_in$=2' or 'norm=replicated'")
                items.append((regex, dim))
            else:
                regex, dim = item
                items.append((regex, dim))
    rules = []
    for regex, dim in items:
        text = f"{regex}={dim}"
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise MergeError(f"{source}={text!r}: {regex!r} is not a valid Python regex ({exc})") from None
        rules.append(ShardRule(pattern, _parse_dim(dim, text, source), text))
    return rules


def _parse_dim(dim: int | str, text: str, source: str) -> int | None:
    if isinstance(dim, str) and dim.strip().lower() in _REPLICATED_WORDS:
        return None
    try:
        if isinstance(dim, bool):
            raise ValueError
        return int(dim)
    except (TypeError, ValueError):
        raise MergeError(
            f"{source}={text!r}: {dim!r} is not a dimension; use an integer (negative counts from the end) "
            "or 'replicated'"
        ) from None


# -- merging ------------------------------------------------------------------------------


def merge_traces(
    traces: Sequence[Trace],
    *,
    reference: Trace | None = None,
    name_map: NameMap | None = None,
    shard_dims: ShardDims | Sequence[ShardRule] = None,
    replica_rtol: float = DEFAULT_REPLICA_RTOL,
    path: str | None = None,
) -> Trace:
    """Merge one run's per-rank traces into an in-memory trace of the unsharded model.

    Args:
        traces: the ranks' traces (any order; each carries ``rank``/``world_size`` metadata).
        reference: the unsharded side's trace, used to tell sharded from replicated
            records whose shapes are equal on every rank.
        name_map: this run's module name -> the reference's (default: the same name).
        shard_dims: declarations that win over inference, see :func:`parse_shard_dims`.
        replica_rtol: relative difference above which replicated copies mismatch.
        path: what the merged trace calls its source (default: the ranks' paths).

    Returns:
        A :class:`~tracediff.store.trace.Trace` whose ``ranks`` describes the merge; nothing to close.

    Raises:
        MergeError: the traces are not one run's per-rank traces of one side, or a
            declaration does not fit a record's shape.
    """
    if not (isinstance(replica_rtol, (int, float)) and 0 <= replica_rtol < float("inf")):
        raise MergeError(f"replica_rtol={replica_rtol!r} must be a number >= 0 (default {DEFAULT_REPLICA_RTOL:g})")
    traces = _check_traces(traces)
    rules = list(shard_dims) if _is_rules(shard_dims) else parse_shard_dims(shard_dims)  # type: ignore[arg-type]
    merger = _Merger(traces, reference, name_map, rules, replica_rtol)
    return merger.run(path or " + ".join(t.path for t in traces))


def merge_files(
    paths: Sequence[str | Path],
    output: str | Path,
    *,
    reference: str | Path | None = None,
    shard_dims: ShardDims = None,
    replica_rtol: float = DEFAULT_REPLICA_RTOL,
) -> Trace:
    """Merge per-rank trace files into one trace file (the normal format plus ``/ranks``).

    Returns:
        The merged in-memory trace (its ``meta["merge"]`` summarises what was done).
    """
    from tracediff.store.reader import open_trace

    opened: list[Trace] = []
    try:
        for item in paths:
            opened.append(open_trace(item))
        ref = open_trace(reference) if reference is not None else None
        try:
            merged = merge_traces(opened, reference=ref, shard_dims=shard_dims, replica_rtol=replica_rtol)
        finally:
            if ref is not None:
                ref.close()
    finally:
        for trace in opened:
            trace.close()
    write_trace(merged, output)
    merged.path = str(output)
    return merged


def _is_rules(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, ShardRule) for v in value)


def _check_traces(traces: Sequence[Trace]) -> list[Trace]:
    if not traces:
        raise MergeError("nothing to merge: no per-rank trace given")
    for trace in traces:
        if trace.records.direct:
            raise MergeError(
                f"{trace.path}: a FastVideo JSONL trace holds derived stats, not the mergeable moments a merge "
                "needs; trace each rank with tracediff.attach"
            )
        if trace.ranks is not None or "merged_ranks" in trace.meta:
            raise MergeError(f"{trace.path}: already a merged trace; merge the per-rank traces it came from")
        if not isinstance(trace.meta.get("rank"), int) or not isinstance(trace.meta.get("world_size"), int):
            raise MergeError(f"{trace.path}: no rank/world_size metadata, not a per-rank trace")
    ordered = sorted(traces, key=lambda t: t.meta["rank"])
    worlds = sorted({int(t.meta["world_size"]) for t in ordered})
    if len(worlds) > 1:
        raise MergeError(f"the traces come from runs of different world sizes ({', '.join(map(str, worlds))})")
    sides = sorted({t.side for t in ordered})
    if len(sides) > 1:
        raise MergeError(f"the traces are of different sides ({', '.join(sides)}); merge one side at a time")
    by_rank: dict[int, list[str]] = {}
    for trace in ordered:
        by_rank.setdefault(int(trace.meta["rank"]), []).append(trace.path)
    twice = {rank: paths for rank, paths in by_rank.items() if len(paths) > 1}
    if twice:
        rank, paths = next(iter(twice.items()))
        raise MergeError(
            f"two traces of rank {rank} ({', '.join(paths)}): traces of several runs are mixed; "
            "pass the files (or a glob) of one run"
        )
    outside = [int(t.meta["rank"]) for t in ordered if not 0 <= int(t.meta["rank"]) < worlds[0]]
    if outside:
        raise MergeError(f"rank {outside[0]} is outside world size {worlds[0]}")
    return ordered


class _Merger:
    """One merge: builds the merged columns group by group, vectorised over records."""

    def __init__(
        self,
        traces: list[Trace],
        reference: Trace | None,
        name_map: NameMap | None,
        rules: list[ShardRule],
        replica_rtol: float,
    ) -> None:
        self.traces = traces
        self.reference = reference
        self.name_map = name_map
        self.rules = rules
        self.replica_rtol = replica_rtol
        self.ranks = [int(t.meta["rank"]) for t in traces]
        self.world = int(traces[0].meta["world_size"])

    # -- tables ----------------------------------------------------------------------
    def run(self, path: str) -> Trace:
        self._tables()
        self._group()
        self._layout()
        self._moments()
        mismatch = self._replica_check()
        samples, full_values, value_cols, dropped = self._values()
        return self._trace(path, mismatch, samples, full_values, value_cols, dropped)

    def _tables(self) -> None:
        base = self.traces[0].modules
        names, classes = list(base.names), list(base.classes)
        index = {name: i for i, name in enumerate(names)}
        self.module_maps = []
        for trace in self.traces:
            table = np.empty(len(trace.modules.names) + 1, dtype=np.int64)
            for i, (name, cls) in enumerate(zip(trace.modules.names, trace.modules.classes, strict=False)):
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
                    classes.append(cls)
                table[i] = index[name]
            table[-1] = -1  # records of an unknown module (-1) stay unknown
            self.module_maps.append(table)
        self.modules = self._params(names, classes)
        self.labels: list[str] = []
        self.dtypes: list[str] = []
        self.label_maps = [_vocab(t.records.labels, self.labels) for t in self.traces]
        self.dtype_maps = [_vocab(t.records.dtypes, self.dtypes) for t in self.traces]

    def _params(self, names: list[str], classes: list[str]) -> ModuleTable:
        """The module table's parameters, with sharded ones merged like sharded records.

        Shapes and moments of a sharded parameter combine exactly; its fingerprint
        sample (values at positions of the *whole* tensor) cannot, so it is NaN and
        the aligner pairs such modules by structure instead of by weights.
        """
        base = self.traces[0].modules
        found: list[dict[tuple[str, str], int]] = [
            {(t.modules.names[e.module_index], e.name): row for row, e in enumerate(t.modules.params)}
            for t in self.traces
        ]
        ref_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        if self.reference is not None:
            ref_names = self.reference.modules.names
            ref_shapes = {(ref_names[e.module_index], e.name): e.shape for e in self.reference.modules.params}
        mapper = _mapper(self.name_map)
        params = list(base.params)
        moments = base.param_moments.copy()
        samples, samples_t = base.param_samples.copy(), base.param_samples_t.copy()
        self.params_sharded = self.params_unresolved = 0
        for row, entry in enumerate(base.params):
            key = (base.names[entry.module_index], entry.name)
            copies = [(t.modules.params[f[key]], t.modules.param_moments[f[key]])
                      for t, f in zip(self.traces, found, strict=True) if key in f]
            if len(copies) < 2:
                continue
            shapes = [c[0].shape for c in copies]
            dim = _param_shard_dim(shapes, [c[1] for c in copies], ref_shapes.get((mapper(key[0]) or "", key[1])),
                                   self.world, self.replica_rtol)
            if dim is None:
                continue
            if dim < 0:
                self.params_unresolved += 1
                continue
            shape = list(shapes[0])
            shape[dim] = sum(s[dim] for s in shapes)
            params[row] = ParamEntry(entry.module_index, entry.name, entry.kind, tuple(shape), entry.dtype)
            stacked = np.stack([c[1] for c in copies])
            moments[row] = _combine_moments(stacked)
            samples[row] = np.nan
            samples_t[row] = np.nan
            self.params_sharded += 1
        return ModuleTable(names=names, classes=classes, params=params, param_moments=moments,
                           param_samples=samples, param_samples_t=samples_t)

    def _group(self) -> None:
        """``idx[g, c]``: the record of group ``g`` (one module, step, call, tensor) in rank column ``c``."""
        parts = []
        for c, trace in enumerate(self.traces):
            cols = trace.records.columns
            parts.append(
                np.stack(
                    [
                        self.module_maps[c][cols["module"]] if len(trace.records) else np.zeros(0, np.int64),
                        cols["step"].astype(np.int64),
                        cols["call"].astype(np.int64),
                        self.label_maps[c][cols["label"]] if len(trace.records) else np.zeros(0, np.int64),
                        np.full(len(trace.records), c, dtype=np.int64),
                        np.arange(len(trace.records), dtype=np.int64),
                    ],
                    axis=1,
                )
            )
        rows = np.concatenate(parts) if parts else np.zeros((0, 6), np.int64)
        keys, inverse = np.unique(rows[:, :4], axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        n_groups, n_cols = len(keys), len(self.traces)
        idx = np.full((n_groups, n_cols), -1, dtype=np.int64)
        # Assign in reverse so that a key repeated within one rank keeps its first record.
        idx[inverse[::-1], rows[::-1, 4]] = rows[::-1, 5]
        present = idx >= 0
        first_col = np.argmax(present, axis=1)
        first_seq = np.zeros(n_groups, dtype=np.int64)
        for c, trace in enumerate(self.traces):
            sel = first_col == c
            first_seq[sel] = trace.records.columns["seq"][idx[sel, c]]
        # Execution order: step-major, then the lowest rank's sequence number.
        order = np.lexsort((np.arange(n_groups), first_col, first_seq, keys[:, 1]))
        self.keys = keys[order]
        self.idx = idx[order]
        self.present = present[order]
        self.base_col = first_col[order]
        self.n = n_groups

    def _col(self, name: str, fill: float = np.nan, dtype: Any = np.float64) -> np.ndarray:
        """``(G, C)`` array of one record column, ``fill`` where a rank lacks the record."""
        out = np.full(self.idx.shape, fill, dtype=dtype)
        for c, trace in enumerate(self.traces):
            sel = self.present[:, c]
            out[sel, c] = trace.records.columns[name][self.idx[sel, c]]
        return out

    # -- sharded or replicated ------------------------------------------------------------
    def _layout(self) -> None:
        n, n_cols = self.idx.shape
        shapes = np.full((n, n_cols, MAX_DIMS), -1, dtype=np.int64)
        for c, trace in enumerate(self.traces):
            sel = self.present[:, c]
            shapes[sel, c] = trace.records.shape[self.idx[sel, c]]
        self.shapes = shapes
        ndim = self._col("ndim", -1, np.int64)
        self.ndim = ndim
        rows = np.arange(n)
        base_shape = shapes[rows, self.base_col]
        base_ndim = ndim[rows, self.base_col]
        dims = np.arange(MAX_DIMS)[None, :] < base_ndim[:, None]
        differ = np.zeros((n, MAX_DIMS), dtype=bool)
        same_ndim = np.ones(n, dtype=bool)
        for c in range(n_cols):
            here = self.present[:, c]
            differ |= here[:, None] & (shapes[:, c] != base_shape) & dims
            same_ndim &= ~here | (ndim[:, c] == base_ndim)
        n_differ = differ.sum(axis=1)
        n_present = self.present.sum(axis=1)

        dim = np.full(n, -1, dtype=np.int64)  # -1 replicated
        bad_shape = np.zeros(n, dtype=bool)  # not one valid sharding: a rank mismatch of kind "shape"
        # 1. shapes that differ across ranks in exactly one dimension
        by_ranks = same_ndim & (n_differ == 1)
        dim[by_ranks] = np.argmax(differ[by_ranks], axis=1)
        bad_shape |= ~same_ndim | (n_differ > 1)
        # 2. equal shapes: against the unsharded side
        self.assumed = np.zeros(n, dtype=bool)
        equal = same_ndim & (n_differ == 0) & (n_present > 1)
        ref_shape, ref_known = self._reference_shapes()
        with_ref = equal & ref_known
        ref_dims = (ref_shape != base_shape) & dims
        one = with_ref & (ref_dims.sum(axis=1) == 1)
        d = np.argmax(ref_dims, axis=1)
        size = base_shape[rows, d]
        bigger = ref_shape[rows, d]
        sharded_by_ref = one & ((bigger == size * n_present) | (bigger == size * self.world))
        dim[sharded_by_ref] = d[sharded_by_ref]
        self.assumed = equal & ~ref_known
        # 3. declarations win
        declared = self._declared()
        for g in np.flatnonzero(declared != _UNDECLARED):
            want = int(declared[g])
            bad_shape[g] = False
            self.assumed[g] = False
            if want == _DECLARED_REPLICATED:
                dim[g] = -1
                bad_shape[g] = not same_ndim[g] or n_differ[g] > 0
                continue
            nd = int(base_ndim[g])
            real = want + nd if want < 0 else want
            if not 0 <= real < nd:
                shape = tuple(int(x) for x in base_shape[g, :nd])
                raise MergeError(
                    f"--shard-dim {self._rule_text[g]!r}: dimension {want} does not exist in "
                    f"{self.modules.names[self.keys[g, 0]]!r} {self.labels[self.keys[g, 3]]} of shape {shape}"
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
        self.dim = dim
        self.bad_shape = bad_shape & (n_present > 1)
        sizes = np.zeros((n, n_cols), dtype=np.int64)
        sharded = np.flatnonzero(dim >= 0)
        for c in range(n_cols):
            sizes[sharded, c] = np.where(self.present[sharded, c], shapes[sharded, c, dim[sharded]], 0)
        self.sizes = sizes
        merged_shape = base_shape.copy()
        merged_shape[sharded, dim[sharded]] = sizes[sharded].sum(axis=1)
        self.merged_shape = merged_shape
        self.merged_ndim = base_ndim

    def _declared(self) -> np.ndarray:
        out = np.full(self.n, _UNDECLARED, dtype=np.int64)
        self._rule_text: dict[int, str] = {}
        if not self.rules:
            return out
        decisions: dict[int, tuple[int, str] | None] = {}
        for module in np.unique(self.keys[:, 0]).tolist():
            name = self.modules.names[module] if module >= 0 else ""
            rule = next((r for r in self.rules if r.pattern.search(name)), None)
            decisions[module] = None if rule is None else (
                _DECLARED_REPLICATED if rule.dim is None else rule.dim, rule.text
            )
        for g, module in enumerate(self.keys[:, 0].tolist()):
            decision = decisions[module]
            if decision is not None:
                out[g], self._rule_text[g] = decision
        return out

    def _reference_shapes(self) -> tuple[np.ndarray, np.ndarray]:
        """The unsharded side's shape of each group's record, matched by name, tensor and call."""
        shape = np.full((self.n, MAX_DIMS), -1, dtype=np.int64)
        known = np.zeros(self.n, dtype=bool)
        ref = self.reference
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
        mapper = _mapper(self.name_map)
        combos, inverse = np.unique(self.keys[:, [0, 3, 2]], axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        rows = np.full(len(combos), -1, dtype=np.int64)
        for k, (module, label, call) in enumerate(combos.tolist()):
            if module < 0:
                continue
            name = mapper(self.modules.names[module])
            if name is None:
                continue
            key = (name, self.labels[label])
            rows[k] = by_key.get((*key, call), by_name.get(key, -1))
        hit = rows[inverse]
        known = hit >= 0
        shape[known] = ref.records.shape[hit[known]]
        ref_ndim = np.where(known, cols["ndim"][np.maximum(hit, 0)], -1) if len(hit) else np.zeros(0, np.int64)
        same_ndim = ref_ndim == self.ndim[np.arange(self.n), self.base_col]
        return shape, known & same_ndim

    # -- moments ----------------------------------------------------------------------------
    def _moments(self) -> None:
        n = self.n
        rows = np.arange(n)
        self.cols: dict[str, np.ndarray] = {}
        sharded = self.dim >= 0
        numel = self._col("numel", 0, np.int64)
        for name in ("sum", "abs_sum", "sumsq"):
            values = self._col(name)
            total = np.where(self.present, values, 0.0).sum(axis=1)
            self.cols[name] = np.where(sharded, total, values[rows, self.base_col])
        for name in ("nan_count", "inf_count", "numel"):
            values = numel if name == "numel" else self._col(name, 0, np.int64)
            total = np.where(self.present, values, 0).sum(axis=1)
            self.cols[name] = np.where(sharded, total, values[rows, self.base_col])
        nonempty = self.present & (numel > 0)
        for name, reduce, fill in (("min", np.min, np.inf), ("max", np.max, -np.inf)):
            values = self._col(name)
            combined = reduce(np.where(nonempty, values, fill), axis=1) if n else np.zeros(0)
            combined = np.where(nonempty.any(axis=1), combined, np.nan)
            self.cols[name] = np.where(sharded, combined, values[rows, self.base_col])
        self.numel = numel

    # -- replicated copies ------------------------------------------------------------------
    def _replica_check(self) -> dict[str, np.ndarray]:
        """Compare every rank's copy of a replicated record with the lowest rank's."""
        n, n_cols = self.idx.shape
        rows = np.arange(n)
        base = self.base_col
        replicated = self.dim < 0
        dtype = self._col("dtype", -1, np.int64)
        dtype = np.where(self.present, self._dtype_global(dtype), -1)
        scores = np.full((n, n_cols, len(MISMATCH_CHECKS)), 0.0)
        moments = {name: self._col(name) for name in _MOMENT_CHECKS}
        counts = {name: self._col(name, 0, np.int64) for name in ("nan_count", "inf_count")}
        abs_sum_b = moments["abs_sum"][rows, base]
        sumsq_b = moments["sumsq"][rows, base]
        amax_b = np.fmax(np.abs(moments["min"][rows, base]), np.abs(moments["max"][rows, base]))
        scale = {"sum": abs_sum_b, "abs_sum": abs_sum_b, "sumsq": sumsq_b, "min": amax_b, "max": amax_b}
        samples = self._segments("sample")
        fulls = self._segments("full")
        for c in range(n_cols):
            other = self.present[:, c] & (base != c) & (replicated | self.bad_shape)
            if not other.any():
                continue
            s = scores[:, c]
            s[:, _CHECK["shape"]] = np.where(other & self.bad_shape & self._shape_differs(c), np.inf, 0.0)
            s[:, _CHECK["dtype"]] = np.where(other & (dtype[:, c] != dtype[rows, base]), np.inf, 0.0)
            nonfinite = (counts["nan_count"][:, c] != counts["nan_count"][rows, base]) | (
                counts["inf_count"][:, c] != counts["inf_count"][rows, base]
            )
            s[:, _CHECK["nonfinite"]] = np.where(other & nonfinite, np.inf, 0.0)
            comparable = other & ~self.bad_shape
            for name in _MOMENT_CHECKS:
                a, b = moments[name][:, c], moments[name][rows, base]
                s[:, _CHECK[name]] = np.where(comparable, _rel(a, b, scale[name]), 0.0)
            for kind, segs in (("sample", samples), ("full", fulls)):
                s[:, _CHECK[kind]] = np.where(comparable, segs.max_rel_diff(c, base, comparable), 0.0)
        worst = np.argmax(scores, axis=2)
        value = np.take_along_axis(scores, worst[..., None], axis=2)[..., 0]
        hit = value > self.replica_rtol
        g, c = np.nonzero(hit)
        return {
            "record": g.astype(np.int64),
            "rank": np.asarray(self.ranks, dtype=np.int64)[c] if len(c) else np.zeros(0, np.int64),
            "check": worst[g, c].astype(np.int64),
            "value": value[g, c],
        }

    def _shape_differs(self, c: int) -> np.ndarray:
        rows = np.arange(self.n)
        base = self.base_col
        return (self.ndim[:, c] != self.ndim[rows, base]) | np.any(
            self.shapes[:, c] != self.shapes[rows, base], axis=1
        )

    def _dtype_global(self, local: np.ndarray) -> np.ndarray:
        out = local.copy()
        for c in range(len(self.traces)):
            sel = self.present[:, c]
            out[sel, c] = self.dtype_maps[c][local[sel, c]]
        return out

    def _segments(self, kind: str) -> _Segments:
        return _Segments.build(self, kind)

    # -- element values -------------------------------------------------------------------
    def _values(self) -> tuple[np.ndarray, dict[int, np.ndarray], dict[str, np.ndarray], int]:
        """Samples and full tensors of the merged records, laid out in record order."""
        n = self.n
        rows = np.arange(n)
        base = self.base_col
        sharded = self.dim >= 0
        full_kind = self._col("full_kind", FULL_NONE, np.int64)
        full_len = self._col("full_len", 0, np.int64)
        sample_len = self._col("sample_len", 0, np.int64)
        all_full = np.all(~self.present | (full_kind != FULL_NONE), axis=1) & sharded
        any_sample = np.any(self.present & (sample_len > 0), axis=1)
        out_kind = np.where(sharded, FULL_NONE, full_kind[rows, base])
        shard_kind = np.where(np.any(self.present & (full_kind == FULL_F64), axis=1), FULL_F64, FULL_F32)
        out_kind[all_full] = shard_kind[all_full]
        out_full_len = np.where(sharded, np.where(all_full, self.cols["numel"], 0), full_len[rows, base])
        out_sample_len = np.where(sharded, 0, sample_len[rows, base])
        size = self._sample_size()
        recompute = sharded & all_full & any_sample
        out_sample_len[recompute] = np.minimum(self.cols["numel"][recompute], size)
        dropped = int(np.count_nonzero(sharded & any_sample & ~all_full))

        cache = [_ValueCache(trace) for trace in self.traces]
        full_values: dict[int, np.ndarray] = {}
        full_offset = np.full(n, -1, dtype=np.int64)
        merged_full: dict[int, np.ndarray] = {}
        for kind, dtype in ((FULL_F32, np.float32), (FULL_F64, np.float64)):
            mine = out_kind == kind
            lens = np.where(mine, out_full_len, 0)
            offsets = np.concatenate(([0], np.cumsum(lens)[:-1])) if n else np.zeros(0, np.int64)
            full_offset[mine] = offsets[mine]
            values = np.zeros(int(lens.sum()), dtype=dtype)
            copy = mine & ~sharded
            for c in range(len(self.traces)):
                sel = np.flatnonzero(copy & (base == c))
                if len(sel):
                    src_rows = self.idx[sel, c]
                    src = cache[c].full(kind)
                    _scatter(values, offsets[sel], src, self.traces[c].records.columns["full_offset"][src_rows],
                             lens[sel])
            for g in np.flatnonzero(mine & sharded):
                tensor = self._concat_full(int(g), cache)
                values[offsets[g] : offsets[g] + tensor.size] = tensor.reshape(-1)
                merged_full[int(g)] = tensor
            full_values[kind] = values

        sample_offset = np.full(n, -1, dtype=np.int64)
        lens = out_sample_len
        offsets = np.concatenate(([0], np.cumsum(lens)[:-1])) if n else np.zeros(0, np.int64)
        sample_offset[lens > 0] = offsets[lens > 0]
        samples = np.zeros(int(lens.sum()), dtype=np.float64)
        for c in range(len(self.traces)):
            sel = np.flatnonzero(~sharded & (base == c) & (lens > 0))
            if len(sel):
                src_rows = self.idx[sel, c]
                _scatter(samples, offsets[sel], cache[c].samples(),
                         self.traces[c].records.columns["sample_offset"][src_rows], lens[sel])
        for g in np.flatnonzero(recompute):
            flat = merged_full[int(g)].reshape(-1).astype(np.float64)
            positions = _sample_positions(flat.size, size)
            samples[offsets[g] : offsets[g] + len(positions)] = flat[positions]
        value_cols = {
            "full_kind": out_kind,
            "full_len": out_full_len,
            "full_offset": full_offset,
            "sample_len": out_sample_len,
            "sample_offset": sample_offset,
        }
        return samples, full_values, value_cols, dropped

    def _concat_full(self, g: int, cache: list[_ValueCache]) -> np.ndarray:
        parts = []
        for c, trace in enumerate(self.traces):
            if not self.present[g, c]:
                continue
            row = int(self.idx[g, c])
            cols = trace.records.columns
            kind, offset = int(cols["full_kind"][row]), int(cols["full_offset"][row])
            length = int(cols["full_len"][row])
            flat = cache[c].full(kind)[offset : offset + length]
            parts.append(np.asarray(flat).reshape(trace.records.shape_of(row)))
        wide = np.float64 if any(p.dtype == np.float64 for p in parts) else np.float32
        return np.concatenate([p.astype(wide, copy=False) for p in parts], axis=int(self.dim[g]))

    def _sample_size(self) -> int:
        size = self.traces[0].config.get("sample_size")
        return int(size) if isinstance(size, int) and size > 0 else 256

    # -- the merged trace -----------------------------------------------------------------
    def _trace(
        self,
        path: str,
        mismatch: dict[str, np.ndarray],
        samples: np.ndarray,
        full_values: dict[int, np.ndarray],
        value_cols: dict[str, np.ndarray],
        dropped: int,
    ) -> Trace:
        n = self.n
        rows = np.arange(n)
        base = self.base_col
        columns: dict[str, np.ndarray] = {}
        columns["seq"] = np.arange(n, dtype=np.int64)
        columns["module"] = self.keys[:, 0]
        columns["step"] = self.keys[:, 1]
        columns["call"] = self.keys[:, 2]
        columns["label"] = self.keys[:, 3]
        columns["dtype"] = self._dtype_global(self._col("dtype", -1, np.int64))[rows, base] if n else np.zeros(0)
        columns["ndim"] = self.merged_ndim
        columns.update(self.cols)
        columns.update(value_cols)
        columns = {name: np.asarray(columns[name]).astype(dtype) for name, dtype in RECORD_COLUMNS.items()}
        layout = RankLayout(
            ranks=list(self.ranks),
            world_size=self.world,
            shard_dim=self.dim.astype(np.int8),
            shard_sizes=self.sizes,
            base_rank=np.asarray(self.ranks, dtype=np.int32)[base] if n else np.zeros(0, np.int32),
            mismatch_record=mismatch["record"],
            mismatch_rank=mismatch["rank"].astype(np.int32),
            mismatch_check=mismatch["check"].astype(np.int8),
            mismatch_value=mismatch["value"],
        )
        meta = self._meta(layout, dropped)
        base_trace = self.traces[0]
        return Trace(
            path=path,
            meta=meta,
            config=dict(base_trace.config),
            modules=self.modules,
            records=Records(columns=columns, shape=self.merged_shape, labels=self.labels, dtypes=self.dtypes),
            complete=all(t.complete for t in self.traces),
            samples=samples,
            full_values=full_values,
            ranks=layout,
        )

    def _meta(self, layout: RankLayout, dropped: int) -> dict[str, Any]:
        meta = {k: v for k, v in self.traces[0].meta.items() if k not in _PER_RANK_KEYS}
        sharded = self.dim >= 0
        failures: dict[str, str] = {}
        for trace in self.traces:
            for module, error in dict(trace.meta.get("failures") or {}).items():
                failures.setdefault(module, f"rank {trace.meta['rank']}: {error}")
        missing = sorted(set(range(self.world)) - set(self.ranks))
        meta.update(
            {
                "world_size": self.world,
                "merged_ranks": list(self.ranks),
                "merged_from": [
                    {"rank": int(t.meta["rank"]), "path": t.path, "pid": t.meta.get("pid")} for t in self.traces
                ],
                "merged_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "has_moments": all(bool(t.meta.get("has_moments", False)) for t in self.traces),
                "failures": failures,
                "merge": {
                    "records": int(self.n),
                    "sharded": int(np.count_nonzero(sharded)),
                    "replicated": int(np.count_nonzero(~sharded & (self.present.sum(axis=1) > 1))),
                    "single_rank": int(np.count_nonzero(self.present.sum(axis=1) == 1)),
                    "assumed_replicated": int(np.count_nonzero(self.assumed & ~sharded)),
                    "rank_mismatches": int(len(np.unique(layout.mismatch_record))),
                    "samples_dropped": dropped,
                    "missing_ranks": missing,
                    "declared": [rule.text for rule in self.rules],
                    "replica_rtol": self.replica_rtol,
                    "params_sharded": self.params_sharded,
                    "params_unresolved": self.params_unresolved,
                },
            }
        )
        return meta


_UNDECLARED = -(10**9)
_DECLARED_REPLICATED = -(10**9) + 1
#: Metadata of one rank that says nothing about the merged trace.
_PER_RANK_KEYS = frozenset({"rank", "pid", "local_rank", "hostname"})


def _param_shard_dim(
    shapes: list[tuple[int, ...]],
    moments: list[np.ndarray],
    reference: tuple[int, ...] | None,
    world: int,
    rtol: float,
) -> int | None:
    """The dimension a parameter is sharded along; None when replicated, -1 when it cannot be told."""
    if len({len(s) for s in shapes}) != 1:
        return -1
    differ = [d for d in range(len(shapes[0])) if len({s[d] for s in shapes}) > 1]
    if len(differ) == 1:
        return differ[0]
    if differ:
        return -1
    first = moments[0]
    scale = max(abs(float(first[1])), 1e-300)
    extent = max(abs(float(first[3])), abs(float(first[4])), 1e-300)
    same = all(
        abs(m[0] - first[0]) <= rtol * scale and abs(m[1] - first[1]) <= rtol * scale
        and abs(m[2] - first[2]) <= rtol * max(abs(float(first[2])), 1e-300)
        and abs(m[3] - first[3]) <= rtol * extent and abs(m[4] - first[4]) <= rtol * extent
        for m in moments[1:]
    )
    if same or any(np.isnan(m[:5]).any() for m in moments):
        return None
    if reference is not None and len(reference) == len(shapes[0]):
        bigger = [d for d in range(len(reference)) if reference[d] != shapes[0][d]]
        if len(bigger) == 1 and reference[bigger[0]] in (shapes[0][bigger[0]] * len(shapes),
                                                         shapes[0][bigger[0]] * world):
            return bigger[0]
    return -1


def _combine_moments(stacked: np.ndarray) -> np.ndarray:
    """``sum, abs_sum, sumsq, min, max, nan_count, inf_count`` of a tensor from those of its shards."""
    out = stacked.sum(axis=0)
    out[3] = np.min(stacked[:, 3])
    out[4] = np.max(stacked[:, 4])
    return out


def _vocab(local: list[str], merged: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(merged)}
    out = []
    for name in local:
        if name not in index:
            index[name] = len(merged)
            merged.append(name)
        out.append(index[name])
    return np.asarray(out or [0], dtype=np.int64)


def _mapper(name_map: NameMap | None) -> Callable[[str], str | None]:
    if name_map is None:
        return lambda name: name
    if isinstance(name_map, Mapping):
        return lambda name: name_map.get(name, name)  # type: ignore[union-attr]
    return lambda name: name_map(name)  # type: ignore[operator]


def _rel(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``|a - b| / scale``; equal NaNs and equal infinities agree, a lone NaN never does."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = np.abs(a - b) / np.maximum(np.nan_to_num(scale, nan=0.0, posinf=0.0), _TINY)
    agree = (np.isnan(a) & np.isnan(b)) | (a == b)
    return np.where(agree, 0.0, np.where(np.isnan(d), np.inf, d))


def _scatter(dest: np.ndarray, dest_off: np.ndarray, src: Any, src_off: np.ndarray, lens: np.ndarray) -> None:
    """Copy many segments at once: ``dest[dest_off[i]:+lens[i]] = src[src_off[i]:+lens[i]]``."""
    lens = lens.astype(np.int64)
    total = int(lens.sum())
    if not total:
        return
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    within = np.arange(total) - np.repeat(starts, lens)
    dest[np.repeat(dest_off, lens) + within] = np.asarray(src)[np.repeat(src_off, lens) + within]


def _sample_positions(numel: int, size: int) -> np.ndarray:
    """The recorder's sample positions (:func:`tracediff.hooks.stats.sample_positions`) without torch."""
    if numel <= size:
        return np.arange(numel, dtype=np.int64)
    return np.arange(size, dtype=np.int64) * numel // size


class _ValueCache:
    """A rank's sample and full-tensor tables, read from the file once."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self._full: dict[int, np.ndarray] = {}
        self._samples: np.ndarray | None = None

    def samples(self) -> np.ndarray:
        if self._samples is None:
            raw = self.trace.samples
            self._samples = np.asarray(raw[:] if raw is not None else np.zeros(0), dtype=np.float64)
        return self._samples

    def full(self, kind: int) -> np.ndarray:
        if kind not in self._full:
            raw = self.trace.full_values.get(kind)
            self._full[kind] = np.asarray(raw[:]) if raw is not None else np.zeros(0)
        return self._full[kind]


@dataclass(eq=False)
class _Segments:
    """One element table (samples or full tensors) of every rank, for the replica check."""

    values: list[np.ndarray]  # per rank column, flattened to float64
    offset: np.ndarray  # (G, C)
    length: np.ndarray  # (G, C), 0 where absent

    @classmethod
    def build(cls, merger: _Merger, kind: str) -> _Segments:
        n, n_cols = merger.idx.shape
        offset = np.zeros((n, n_cols), dtype=np.int64)
        length = np.zeros((n, n_cols), dtype=np.int64)
        values = []
        for c, trace in enumerate(merger.traces):
            cols = trace.records.columns
            sel = merger.present[:, c]
            rows = merger.idx[sel, c]
            if kind == "sample":
                values.append(_ValueCache(trace).samples())
                offset[sel, c] = cols["sample_offset"][rows]
                length[sel, c] = cols["sample_len"][rows]
                continue
            # full tensors live in two tables; index both through one concatenation
            cache = _ValueCache(trace)
            f32, f64 = cache.full(FULL_F32), cache.full(FULL_F64)
            values.append(np.concatenate([f32.astype(np.float64), f64.astype(np.float64)]) if len(f32) + len(f64)
                          else np.zeros(0))
            kinds = cols["full_kind"][rows]
            offset[sel, c] = cols["full_offset"][rows] + np.where(kinds == FULL_F64, len(f32), 0)
            length[sel, c] = np.where(kinds == FULL_NONE, 0, cols["full_len"][rows])
        return cls(values, offset, length)

    def max_rel_diff(self, c: int, base: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Per group: ``max |a - b| / max |b|`` between column ``c`` and each group's base column."""
        n = len(base)
        rows = np.arange(n)
        out = np.zeros(n)
        b_len = self.length[rows, base]
        usable = mask & (self.length[:, c] > 0) & (self.length[:, c] == b_len)
        out[mask & (self.length[:, c] > 0) & (b_len > 0) & (self.length[:, c] != b_len)] = np.inf
        for b_col in np.unique(base[usable]).tolist():
            sel = np.flatnonzero(usable & (base == b_col))
            lens = self.length[sel, c]
            starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
            total = int(lens.sum())
            within = np.arange(total) - np.repeat(starts, lens)
            a = self.values[c][np.repeat(self.offset[sel, c], lens) + within]
            b = self.values[b_col][np.repeat(self.offset[sel, b_col], lens) + within]
            scale = np.maximum.reduceat(np.where(np.isfinite(b), np.abs(b), 0.0), starts)
            out[sel] = np.maximum.reduceat(_rel(a, b, np.repeat(scale, lens)), starts)
        return out


# -- writing ------------------------------------------------------------------------------


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write an in-memory trace (a merged one) in the normal trace format, plus ``/ranks``.

    The file is written next to ``path`` under a temporary name and renamed
    into place once complete, so a reader never sees a half-written merge.

    Raises:
        MergeError: the output cannot be written.
    """
    from tracediff.store.ranks import write_rank_layout
    from tracediff.store.writer import StepBatch, TraceWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    attrs = {k: v for k, v in trace.meta.items() if k not in _ROOT_KEYS}
    attrs["config"] = trace.config
    try:
        writer = TraceWriter(tmp, attrs=attrs, module_table=trace.modules)
        try:
            for step, rows in _step_runs(trace):
                writer.write_step(step, _batch(trace, rows, StepBatch))
        finally:
            writer.close()
        with h5py.File(tmp, "a") as handle:
            handle.attrs["complete"] = bool(trace.complete)
        if trace.ranks is not None:
            write_rank_layout(tmp, trace.ranks)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise MergeError(f"{path}: cannot write the merged trace ({exc.strerror or exc})") from None
    return path


_ROOT_KEYS = frozenset({"encoding-type", "encoding-version", "format_version", "complete", "config"})


def _step_runs(trace: Trace) -> list[tuple[int, np.ndarray]]:
    """Contiguous runs of records of one step, in record order (the writer commits step by step)."""
    steps = trace.records.columns["step"]
    if not len(steps):
        return []
    cuts = np.flatnonzero(np.diff(steps)) + 1
    return [(int(steps[run[0]]), run) for run in np.split(np.arange(len(steps)), cuts)]


def _batch(trace: Trace, rows: np.ndarray, batch_type: Any) -> Any:
    cols = trace.records.columns
    columns = {name: np.asarray(cols[name][rows]) for name in RECORD_COLUMNS}
    samples = None
    lens = columns["sample_len"].astype(np.int64)
    if lens.sum():
        samples = np.zeros(int(lens.sum()))
        offsets = np.concatenate(([0], np.cumsum(lens)[:-1]))
        _scatter(samples, offsets, np.asarray(trace.samples), columns["sample_offset"], lens)
        columns["sample_offset"] = np.where(lens > 0, offsets, -1)
    full: dict[int, np.ndarray | None] = {FULL_F32: None, FULL_F64: None}
    new_offset = np.where(columns["full_kind"] == FULL_NONE, -1, 0).astype(np.int64)
    for kind, dtype in ((FULL_F32, np.float32), (FULL_F64, np.float64)):
        mine = columns["full_kind"] == kind
        flens = np.where(mine, columns["full_len"], 0).astype(np.int64)
        if not flens.sum():
            continue
        values = np.zeros(int(flens.sum()), dtype=dtype)
        offsets = np.concatenate(([0], np.cumsum(flens)[:-1]))
        _scatter(values, offsets[mine], np.asarray(trace.full_values[kind]), columns["full_offset"][mine], flens[mine])
        new_offset[mine] = offsets[mine]
        full[kind] = values
    columns["full_offset"] = new_offset
    return batch_type(
        columns=columns,
        shape=trace.records.shape[rows],
        labels=[trace.records.labels[i] for i in columns["label"]],
        dtypes=[trace.records.dtypes[i] for i in columns["dtype"]],
        samples=samples,
        full_f32=full[FULL_F32],
        full_f64=full[FULL_F64],
    )
