"""Batched calls (classifier-free guidance): one side's split calls combined into the record the other side batched.

A pipeline with CFG runs the DiT twice per step (conditional, unconditional) or once on both concatenated on
dim 0; :class:`BatchPlan` finds such calls and :func:`with_combined` appends the combined records, so the
matcher (:mod:`tracediff.diff.match`) compares them against the batched ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tracediff.store.format import FULL_F32, FULL_F64, FULL_NONE, RECORD_COLUMNS
from tracediff.store.trace import Trace


@dataclass
class BatchPlan:
    """Which records of one side to combine: a module's calls that the other side made as one batched call.

    A pipeline with classifier-free guidance runs the DiT twice per step (conditional,
    unconditional, batch 1 each) or once on both concatenated on dim 0 (batch 2). Per
    module pair, step and tensor label, when one side has a single call with leading
    dimension ``N*B`` and the other ``N`` calls (0..N-1) with leading dimension ``B``
    and otherwise the same shape and dtype, the ``N`` split records are combined into
    one (:func:`with_combined`) and compared against the batched record.
    """

    u_groups: list[np.ndarray]  # upstream records to combine, each group in call order
    p_groups: list[np.ndarray]
    hints: dict[tuple[int, int], tuple[str, int]]  # (pair, step) -> (batching side, N calls), matched or not

    @classmethod
    def build(
        cls,
        upstream: Trace,
        port: Trace,
        u_rows: np.ndarray,
        p_rows: np.ndarray,
        u_pair: np.ndarray,
        p_pair: np.ndarray,
        u_s: np.ndarray,
        p_s: np.ndarray,
        u_label: np.ndarray,
        p_label: np.ndarray,
        steps: list[int],
    ) -> BatchPlan:
        plan = cls([], [], {})
        n_step = max(len(steps), 1)
        size = (int(max(u_pair.max(initial=0), p_pair.max(initial=0))) + 1) * n_step
        u_call = upstream.records.columns["call"][u_rows].astype(np.int64)
        p_call = port.records.columns["call"][p_rows].astype(np.int64)
        u_ps, p_ps = u_pair * n_step + u_s, p_pair * n_step + p_s
        u_max, p_max = np.full(size, -1, dtype=np.int64), np.full(size, -1, dtype=np.int64)
        np.maximum.at(u_max, u_ps, u_call)
        np.maximum.at(p_max, p_ps, p_call)
        sides = (
            ("port", port, p_rows, p_ps, p_label, upstream, u_rows, u_ps, u_label, u_call, u_max, plan.u_groups),
            ("upstream", upstream, u_rows, u_ps, u_label, port, p_rows, p_ps, p_label, p_call, p_max, plan.p_groups),
        )
        for name, b_trace, b_rows, b_ps, b_label, s_trace, s_rows, s_ps, s_label, s_call, s_max, groups in sides:
            b_max = p_max if name == "port" else u_max
            candidate = (b_max == 0) & (s_max >= 1)
            if not candidate.any():
                continue
            for ps in np.flatnonzero(candidate).tolist():
                plan.hints[(ps // n_step, steps[ps % n_step])] = (name, int(s_max[ps]) + 1)
            split: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for i in np.flatnonzero(candidate[s_ps]).tolist():
                split.setdefault((int(s_ps[i]), int(s_label[i])), []).append((int(s_call[i]), int(s_rows[i])))
            for i in np.flatnonzero(candidate[b_ps]).tolist():
                parts = split.get((int(b_ps[i]), int(b_label[i])))
                if not parts:
                    continue
                parts.sort()
                n = int(s_max[b_ps[i]]) + 1
                rows = np.asarray([row for _, row in parts], dtype=np.int64)
                if [call for call, _ in parts] == list(range(n)) and _splits(b_trace, int(b_rows[i]), s_trace, rows):
                    groups.append(rows)
        return plan


def _splits(b_trace: Trace, b_row: int, s_trace: Trace, rows: np.ndarray) -> bool:
    """Records ``rows`` of ``s_trace`` are record ``b_row`` of ``b_trace`` cut along dim 0 (by shape and dtype)."""
    bc, sc = b_trace.records.columns, s_trace.records.columns
    if bc["numel"][b_row] < 0 or (sc["numel"][rows] < 0).any():
        return False
    ndim = int(bc["ndim"][b_row])
    if ndim < 1 or (sc["ndim"][rows] != ndim).any() or len(set(sc["dtype"][rows].tolist())) != 1:
        return False
    shapes = s_trace.records.shape[rows, :ndim]
    b_shape = b_trace.records.shape[b_row, :ndim]
    return bool((shapes[:, 1:] == b_shape[1:]).all() and shapes[:, 0].sum() == b_shape[0])


class _Appended:
    """A flat store (an HDF5 dataset, an array) with values appended, sliced like one array."""

    def __init__(self, base: object, extra: np.ndarray) -> None:
        self.base, self.extra = base, extra
        self.n = len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n + len(self.extra)

    def __getitem__(self, item: slice) -> np.ndarray:
        start, stop, _ = item.indices(len(self))
        parts = []
        if start < min(stop, self.n):
            parts.append(np.asarray(self.base[start : min(stop, self.n)]))  # type: ignore[index]
        if stop > self.n:
            parts.append(self.extra[max(start - self.n, 0) : stop - self.n])
        return np.concatenate(parts) if parts else self.extra[:0]


def with_combined(trace: Trace, groups: list[np.ndarray]) -> tuple[Trace, np.ndarray]:
    """``trace`` with one record appended per group, the group's tensors concatenated on dim 0; and the groups' mask.

    Moments combine exactly (sums and counts add, min/max combine); recorded stats
    (FastVideo JSONL) too: means weighted by element count, ``std`` pooled, ``l2``
    from its squares. A full tensor is the parts' full tensors concatenated; the
    sample is taken at the batched tensor's own sample positions, which map to
    positions the parts sampled (exactly, for parts of the same sample size), else
    left out (stats only). A combined record sits where the last part was recorded
    (its ``seq``) and carries call 0, the batched call.
    """
    n0 = len(trace.records)
    hidden = np.zeros(n0 + len(groups), dtype=bool)
    if not groups:
        return trace, hidden
    rec = trace.records
    cols = rec.columns
    parts = np.concatenate(groups)
    hidden[parts] = True
    lens = np.asarray([len(g) for g in groups])
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    last = parts[starts + lens - 1]
    numel = np.add.reduceat(cols["numel"][parts], starts)
    new: dict[str, np.ndarray] = {name: cols[name][last].copy() for name in RECORD_COLUMNS}
    new["call"][:] = 0
    new["numel"] = numel
    for name in ("sum", "abs_sum", "sumsq"):
        new[name] = np.add.reduceat(cols[name][parts], starts)
    new["min"] = np.minimum.reduceat(cols["min"][parts], starts)
    new["max"] = np.maximum.reduceat(cols["max"][parts], starts)
    for name in ("nan_count", "inf_count"):
        counted = np.minimum.reduceat(cols[name][parts], starts) >= 0
        new[name] = np.where(counted, np.add.reduceat(cols[name][parts], starts), -1)
    shape = rec.shape[last].copy()
    shape[:, 0] = np.add.reduceat(rec.shape[parts, 0], starts)
    direct = {name: np.concatenate([values, _combine_direct(rec.direct, name, parts, starts, cols["numel"])])
              for name, values in rec.direct.items()}

    samples, full_values = trace.samples, dict(trace.full_values)
    new["sample_offset"][:], new["sample_len"][:] = -1, 0
    new["full_offset"][:], new["full_len"][:], new["full_kind"][:] = -1, 0, FULL_NONE
    extra_full: dict[int, list[np.ndarray]] = {FULL_F32: [], FULL_F64: []}
    extra_len = dict.fromkeys(extra_full, 0)
    extra_samples: list[np.ndarray] = []
    n_samples = len(samples) if samples is not None else 0  # type: ignore[arg-type]
    size = trace.config.get("sample_size")
    for g, group in enumerate(groups):
        kinds = set(cols["full_kind"][group].tolist())
        whole = None
        if len(kinds) == 1 and (kind := kinds.pop()) != FULL_NONE and kind in trace.full_values:
            whole = np.concatenate([np.asarray(trace.full_values[kind][int(o) : int(o) + int(n)])
                                    for o, n in zip(cols["full_offset"][group], cols["full_len"][group], strict=True)])
            new["full_kind"][g], new["full_offset"][g] = kind, len(trace.full_values[kind])  # type: ignore[arg-type]
            new["full_offset"][g] += extra_len[kind]
            new["full_len"][g] = len(whole)
            extra_full[kind].append(whole)
            extra_len[kind] += len(whole)
        sample = _combined_sample(trace, group, whole, size)
        if sample is not None:
            new["sample_offset"][g], new["sample_len"][g] = n_samples, len(sample)
            extra_samples.append(sample)
            n_samples += len(sample)
    for kind, chunks in extra_full.items():
        if chunks:
            full_values[kind] = _Appended(trace.full_values[kind], np.concatenate(chunks))
    if extra_samples:
        base = np.asarray(samples, dtype=np.float64) if samples is not None else np.zeros(0)
        samples = np.concatenate([base, *extra_samples])

    columns = {name: np.concatenate([cols[name], new[name].astype(cols[name].dtype)]) for name in cols}
    records = replace(rec, columns=columns, shape=np.concatenate([rec.shape, shape]), direct=direct)
    ranks = trace.ranks
    if ranks is not None:  # a combined record differs across ranks where one of its parts does
        group_of = np.repeat(np.arange(len(groups)), lens)
        order = np.argsort(parts, kind="stable")
        at = np.flatnonzero(np.isin(ranks.mismatch_record, parts))
        owner = group_of[order[np.searchsorted(parts[order], ranks.mismatch_record[at])]]
        ranks = replace(
            ranks,
            shard_dim=np.concatenate([ranks.shard_dim, np.full(len(groups), -1, dtype=ranks.shard_dim.dtype)]),
            shard_sizes=np.concatenate(
                [ranks.shard_sizes, np.zeros((len(groups), ranks.shard_sizes.shape[1]), dtype=ranks.shard_sizes.dtype)]
            ),
            base_rank=np.concatenate([ranks.base_rank, ranks.base_rank[last]]),
            mismatch_record=np.concatenate([ranks.mismatch_record, n0 + owner]),
            mismatch_rank=np.concatenate([ranks.mismatch_rank, ranks.mismatch_rank[at]]),
            mismatch_check=np.concatenate([ranks.mismatch_check, ranks.mismatch_check[at]]),
            mismatch_value=np.concatenate([ranks.mismatch_value, ranks.mismatch_value[at]]),
        )
    return replace(trace, records=records, samples=samples, full_values=full_values, ranks=ranks), hidden


def _combine_direct(
    direct: dict[str, np.ndarray], name: str, parts: np.ndarray, starts: np.ndarray, numel: np.ndarray
) -> np.ndarray:
    """A recorded stat (FastVideo JSONL) of each group's concatenation, from its parts' (NaN where it cannot be)."""
    v = direct[name][parts]
    w = numel[parts].astype(np.float64)
    w = np.where(w > 0, w, np.nan)
    total = np.add.reduceat(w, starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        if name in ("abs_mean", "mean"):
            return np.add.reduceat(v * w, starts) / total
        if name in ("sum", "nan_count", "inf_count"):
            return np.add.reduceat(v, starts)
        if name == "min":
            return np.minimum.reduceat(v, starts)
        if name == "max":
            return np.maximum.reduceat(v, starts)
        if name == "l2":
            return np.sqrt(np.add.reduceat(v * v, starts))
        if name == "std":  # pooled: within-part variance plus the spread of the part means
            means = direct["mean"][parts] if "mean" in direct else (
                direct["sum"][parts] / w if "sum" in direct else np.full(len(parts), np.nan))
            mean = np.add.reduceat(means * w, starts) / total
            spread = (w - 1.0) * v * v + w * (means - np.repeat(mean, np.diff(np.append(starts, len(parts))))) ** 2
            return np.sqrt(np.add.reduceat(spread, starts) / (total - 1.0))
    return np.full(len(starts), np.nan)


def _sample_positions(numel: int, size: int) -> np.ndarray:
    """The flat positions the ``sample`` stat keeps (tracediff.hooks.stats.sample_positions, in numpy)."""
    if numel <= size:
        return np.arange(numel, dtype=np.int64)
    return np.arange(size, dtype=np.int64) * numel // size


def _combined_sample(trace: Trace, group: np.ndarray, whole: np.ndarray | None, size: object) -> np.ndarray | None:
    """The ``sample`` of the parts' concatenation, at its own positions, or None when the parts do not hold them.

    Each batched sample position falls in one part; for parts sampled with the same
    size it is always one of that part's sample positions (``floor(i*N*m/K) - j*m``
    is ``floor(k*m/K)`` with ``k = i*N - j*K``), and is checked to be.
    """
    cols = trace.records.columns
    numel = cols["numel"][group].astype(np.int64)
    lens = cols["sample_len"][group].astype(np.int64)
    if not isinstance(size, int) or size <= 0:
        short = lens[(lens > 0) & (lens < numel)]
        if not len(short):
            return None
        size = int(short[0])
    positions = _sample_positions(int(numel.sum()), size)
    if whole is not None:
        return np.asarray(whole[positions], dtype=np.float64)
    if trace.samples is None or (lens <= 0).any():
        return None
    bounds = np.cumsum(numel)
    part = np.searchsorted(bounds, positions, side="right")
    out = np.empty(len(positions))
    for k, row in enumerate(group.tolist()):
        sel = part == k
        local = positions[sel] - (bounds[k] - numel[k])
        stored = _sample_positions(int(numel[k]), size)
        if len(stored) != lens[k]:
            return None
        at = np.minimum(np.searchsorted(stored, local), max(len(stored) - 1, 0))
        if len(local) and not (stored[at] == local).all():
            return None
        offset = int(cols["sample_offset"][row])
        out[sel] = np.asarray(trace.samples[offset : offset + int(lens[k])], dtype=np.float64)[at]
    return out
