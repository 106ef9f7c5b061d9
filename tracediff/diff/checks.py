"""The checks a matched record pair is held to, and the deciding one.

* **stats** (records without elements, e.g. FastVideo JSONL): relative drift
  ``|port - ref| / max(scale, atol)`` of abs-mean, L2 norm, max, min, mean, std
  and sum, failing above ``stat_rtol``;
* ``abs_mean_limit``, when the tolerance sets one, bounds abs-mean drift on
  every record, elements or not;
* the element check (:mod:`tracediff.diff.elements`), authoritative when present.

Each record's ``ratio`` is the largest ``value / limit`` over the checks that applied (:class:`Verdict`), so
``ratio > 1`` means it breaks tolerance whatever the check and whatever per-module override applied. Shape,
dtype, rank and NaN/Inf mismatches are flagged here too; they become findings of their own kinds.
"""

from __future__ import annotations

import numpy as np

from tracediff.align.values import broadcast_equivalent
from tracediff.store.trace import Trace
from tracediff.tolerance import Tolerance

#: Stats compared on records without elements, in reporting order.
STAT_CHECKS: tuple[str, ...] = ("abs_mean", "l2", "max", "min", "mean", "std", "sum")
#: Compared only when both traces recorded them as values: ``std`` derived from moments
#: (``sumsq - sum**2 / n``) cancels catastrophically when ``|mean| >> std``.
_RECORDED_ONLY = frozenset({"std"})
#: The checks by code (:class:`Verdict`): the element check, the abs-mean limit, then each stat.
CHECK_NAMES = ("elements", "abs_mean_limit", *STAT_CHECKS)
ELEMENTS_CHECK, ABS_MEAN_LIMIT_CHECK, FIRST_STAT_CHECK = 0, 1, 2


class Verdict:
    """The deciding check per record: the one with the largest ``value / limit``."""

    def __init__(self, n: int) -> None:
        self.ratio = np.full(n, -1.0)
        self.check = np.full(n, -1, dtype=np.int64)
        self.value = np.full(n, np.nan)
        self.limit = np.full(n, np.nan)

    def consider(self, code: int, ratio: np.ndarray, value: np.ndarray, limit: np.ndarray) -> None:
        """Take check ``code`` where it applies (ratio not NaN) and beats the current one."""
        better = ratio > self.ratio  # NaN (check not applicable) compares False
        self.ratio[better] = ratio[better]
        self.check[better] = code
        self.value[better] = value[better]
        self.limit[better] = limit[better]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ratio, check)``, NaN and -1 where no check applied."""
        unchecked = self.check < 0
        self.ratio[unchecked] = np.nan
        return self.ratio, self.check


def tolerance_arrays(
    pairs: list[tuple[str, str]], tol: Tolerance, pair: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per matched record: atol, rtol, stat limit, abs-mean limit (NaN = none), overrides resolved per pair."""
    per_pair = np.zeros((max(len(pairs), 1), 4))
    for k, (port_name, upstream_name) in enumerate(pairs):
        t = tol.for_module(port_name, upstream_name)
        per_pair[k] = (t.atol, t.rtol, t.stat_limit, np.nan if t.abs_mean_limit is None else t.abs_mean_limit)
    values = per_pair[pair] if len(pair) else np.zeros((0, 4))
    return values[:, 0], values[:, 1], values[:, 2], values[:, 3]


#: Statistics that repeating a tensor along a dimension changes (means and extrema it does not).
CHANGED_BY_REPEATING = ("l2", "sum", "std")


def layout_equivalent(
    upstream: Trace, port: Trace, mu: np.ndarray, mp: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Among records of different shape: ``(same element count, one broadcast from the other)``."""
    layout = np.zeros(len(mu), dtype=bool)
    repeated = np.zeros(len(mu), dtype=bool)
    for i in np.flatnonzero(candidates).tolist():
        a, b = upstream.records.shape_of(int(mu[i])), port.records.shape_of(int(mp[i]))
        if same_layout(a, b):
            layout[i] = True
        elif broadcast_equivalent(a, b):
            repeated[i] = True
    return layout, repeated


def same_layout(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """One shape is the other with dimensions merged or split in place (``(1, 6, 64)`` and ``(1, 384)``).

    That is a ``view``/``flatten``/``unflatten`` of the same memory order; a transpose
    (``(64, 32)`` against ``(32, 64)``) is not, and stays a shape mismatch.
    """
    x, y = [d for d in a if d != 1], [d for d in b if d != 1]
    return _merges_into(x, y) or _merges_into(y, x)


def _merges_into(coarse: list[int], fine: list[int]) -> bool:
    """``fine``'s dimensions, merged in consecutive runs, give ``coarse``'s."""
    j = 0
    for dim in coarse:
        size = 1
        while size < dim and j < len(fine):
            size *= fine[j]
            j += 1
        if size != dim:
            return False
    return j == len(fine)


def shape_mismatch(upstream: Trace, port: Trace, mu: np.ndarray, mp: np.ndarray) -> np.ndarray:
    """Whether each matched pair's recorded shapes differ (unknown shapes never do)."""
    ur, pr = upstream.records, port.records
    known = (ur.columns["numel"][mu] >= 0) & (pr.columns["numel"][mp] >= 0)
    differs = (ur.columns["ndim"][mu] != pr.columns["ndim"][mp]) | np.any(ur.shape[mu] != pr.shape[mp], axis=1)
    return known & differs


def dtype_mismatch(upstream: Trace, port: Trace, mu: np.ndarray, mp: np.ndarray) -> np.ndarray:
    """Whether each matched pair's recorded dtypes differ (an unrecorded dtype never does)."""
    names: dict[str, int] = {"": 0}
    u_map = np.asarray([names.setdefault(d, len(names)) for d in upstream.records.dtypes] or [0])
    p_map = np.asarray([names.setdefault(d, len(names)) for d in port.records.dtypes] or [0])
    u = u_map[upstream.records.columns["dtype"][mu]] if len(mu) else np.zeros(0, dtype=np.int64)
    p = p_map[port.records.columns["dtype"][mp]] if len(mp) else np.zeros(0, dtype=np.int64)
    return (u != 0) & (p != 0) & (u != p)


def rank_mismatch(trace: Trace, rows: np.ndarray) -> np.ndarray:
    """Whether each record is a replicated tensor whose copies differ across ranks (merged traces only)."""
    if trace.ranks is None:
        return np.zeros(len(rows), dtype=bool)
    return trace.ranks.mismatched(len(trace.records))[rows]


def nonfinite(trace: Trace, rows: np.ndarray) -> np.ndarray:
    """Whether each record held NaN/Inf: from the counts when recorded, else from its stats."""
    cols = trace.records.columns
    nan, inf = cols["nan_count"][rows], cols["inf_count"][rows]
    counted = (nan >= 0) & (inf >= 0) & bool(trace.meta.get("has_moments", False))
    from_counts = (nan > 0) | (inf > 0)
    from_stats = np.zeros(len(rows), dtype=bool)
    for name in ("abs_mean", "sum", "l2", "max", "min", "mean", "std"):
        if name in trace.records.direct:
            from_stats |= ~np.isfinite(trace.records.direct[name][rows])
    return np.where(counted, from_counts, from_stats)


def stat_drifts(
    upstream: Trace, port: Trace, mu: np.ndarray, mp: np.ndarray, atol: np.ndarray
) -> dict[str, np.ndarray]:
    """Relative drift ``|a - b| / max(scale(b), floor)`` of every stat both traces hold.

    The scale is the stat's own magnitude, except for ``mean`` and ``sum``, which
    are measured against the tensor's absolute mass (abs-mean, abs-sum): a
    zero-mean activation has a sum near zero, and relative drift of that is noise.
    The floor is ``atol`` per element (``atol * sqrt(numel)`` for L2), so a
    tensor that is zero at this tolerance does not produce a huge ratio.
    """
    out: dict[str, np.ndarray] = {}
    numel = upstream.records.columns["numel"][mu].astype(np.float64)
    numel = np.where(numel >= 0, numel, np.nan)
    b_abs_mean = upstream.stat("abs_mean")[mu] if upstream.has_stat("abs_mean") else np.full(len(mu), np.nan)
    for name in STAT_CHECKS:
        if not (upstream.has_stat(name) and port.has_stat(name)):
            continue
        if name in _RECORDED_ONLY and not (name in upstream.records.direct and name in port.records.direct):
            continue
        a, b = port.stat(name)[mp], upstream.stat(name)[mu]
        if name == "l2":
            scale, floor = np.abs(b), atol * np.sqrt(np.nan_to_num(numel, nan=1.0))
        elif name == "mean":  # |mean| <= abs_mean: measure against the mass, not the (near-zero) mean
            scale, floor = b_abs_mean, atol
        elif name == "sum":
            scale, floor = b_abs_mean * numel, atol * numel
        else:
            scale, floor = np.abs(b), atol
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            d = np.abs(a - b) / np.maximum(np.where(np.isfinite(scale), scale, 0.0), floor)
        agree = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
        one_sided = ~agree & ~(np.isfinite(a) & np.isfinite(b))
        d = np.where(agree, 0.0, np.where(one_sided, np.inf, d))
        out[name] = np.where(np.isnan(scale) & ~np.isnan(b), np.nan, d)
    return out
