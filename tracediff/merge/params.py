"""The merged module table: every rank's modules, with sharded parameters merged like sharded records.

Shapes and moments of a sharded parameter combine exactly; its fingerprint sample (values at positions of the
*whole* tensor) cannot, so it is NaN and the aligner pairs such modules by structure instead of by weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracediff.merge.grouping import Vocabulary
from tracediff.merge.rules import NameMap, name_mapper
from tracediff.store.trace import ModuleTable, ParamEntry, Trace


@dataclass
class MergedParams:
    """The merged module table, and how many parameters were sharded or could not be told apart."""

    modules: ModuleTable
    sharded: int
    unresolved: int


def merge_params(traces: list[Trace], vocabulary: Vocabulary, *, reference: Trace | None,
                 name_map: NameMap | None, world: int, rtol: float) -> MergedParams:
    """The lowest rank's parameter table, each sharded parameter replaced by its merged shape and moments."""
    base = traces[0].modules
    found: list[dict[tuple[str, str], int]] = [
        {(t.modules.names[e.module_index], e.name): row for row, e in enumerate(t.modules.params)} for t in traces
    ]
    ref_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    if reference is not None:
        ref_names = reference.modules.names
        ref_shapes = {(ref_names[e.module_index], e.name): e.shape for e in reference.modules.params}
    mapper = name_mapper(name_map)
    params = list(base.params)
    moments = base.param_moments.copy()
    samples, samples_t = base.param_samples.copy(), base.param_samples_t.copy()
    sharded = unresolved = 0
    for row, entry in enumerate(base.params):
        key = (base.names[entry.module_index], entry.name)
        copies = [(t.modules.params[f[key]], t.modules.param_moments[f[key]])
                  for t, f in zip(traces, found, strict=True) if key in f]
        if len(copies) < 2:
            continue
        shapes = [c[0].shape for c in copies]
        dim = param_shard_dim(shapes, [c[1] for c in copies], ref_shapes.get((mapper(key[0]) or "", key[1])),
                              world, rtol)
        if dim is None:
            continue
        if dim < 0:
            unresolved += 1
            continue
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes)
        params[row] = ParamEntry(entry.module_index, entry.name, entry.kind, tuple(shape), entry.dtype)
        moments[row] = combine_moments(np.stack([c[1] for c in copies]))
        samples[row] = np.nan
        samples_t[row] = np.nan
        sharded += 1
    table = ModuleTable(names=vocabulary.names, classes=vocabulary.classes, params=params, param_moments=moments,
                        param_samples=samples, param_samples_t=samples_t)
    return MergedParams(table, sharded, unresolved)


def param_shard_dim(
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


def combine_moments(stacked: np.ndarray) -> np.ndarray:
    """``sum, abs_sum, sumsq, min, max, nan_count, inf_count`` of a tensor from those of its shards."""
    out = stacked.sum(axis=0)
    out[3] = np.min(stacked[:, 3])
    out[4] = np.max(stacked[:, 4])
    return out
