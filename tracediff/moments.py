"""The moment vector: seven statistics of a tensor that can be combined across its parts.

``[sum, abs_sum, sumsq, min, max, nan_count, inf_count]`` is what the recorder
reduces every traced tensor to (a record's moment columns) and what a parameter
fingerprint keeps (:attr:`tracediff.store.trace.ModuleTable.param_moments`). Sums,
counts and extrema of a concatenation follow from its pieces', so fused weights
are recognised from fingerprints alone, and the same closeness test serves the
aligner and the weight check. The fingerprint's sampled values sit at
:func:`sample_positions`, the one definition the recorder and every reader share.

Numpy only: reading traces never imports torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Names of the moments, in vector order; also the names of a record's moment columns.
MOMENT_NAMES = ("sum", "abs_sum", "sumsq", "min", "max", "nan_count", "inf_count")
#: Length of a moment vector.
MOMENT_COUNT = len(MOMENT_NAMES)
#: Index of each moment in the vector.
SUM, ABS_SUM, SUMSQ, MIN, MAX, NAN_COUNT, INF_COUNT = range(MOMENT_COUNT)
#: Moments of an empty tensor: nothing summed or counted, no extremum.
EMPTY_MOMENTS = (0.0, 0.0, 0.0, math.nan, math.nan, 0.0, 0.0)
#: Per-tensor stats that follow from the moments and the element count: what a trace with moments
#: can answer, and what makes the recorder reduce every tensor to its moments.
DERIVED_STATS = ("abs_mean", "sum", "min", "max", "mean", "std", "l2", "nan_count", "inf_count")


def stack_moments(parts: np.ndarray) -> np.ndarray:
    """Moments of the concatenation of tensors, from theirs (one row per tensor): sums add, extrema combine."""
    out = parts.sum(axis=0)
    out[MIN] = np.nanmin(parts[:, MIN])
    out[MAX] = np.nanmax(parts[:, MAX])
    return out


def scaled_moments(moments: np.ndarray, factor: float | None) -> np.ndarray:
    """Moments of ``factor * x`` from those of ``x`` (a copy; None and 1 leave them as they are)."""
    out = moments.copy()
    if factor is None or factor == 1.0:
        return out
    out[SUM] *= factor
    out[ABS_SUM] *= abs(factor)
    out[SUMSQ] *= factor * factor
    low, high = moments[MIN] * factor, moments[MAX] * factor
    out[MIN], out[MAX] = min(low, high), max(low, high)
    return out


def zero_padded_moments(moments: np.ndarray) -> np.ndarray:
    """Moments of a tensor with zeros appended: sums unchanged, min and max widened to 0."""
    out = moments.copy()
    if not math.isnan(out[MIN]):
        out[MIN] = min(out[MIN], 0.0)
    if not math.isnan(out[MAX]):
        out[MAX] = max(out[MAX], 0.0)
    return out


def moments_close(ma: np.ndarray, mb: np.ndarray, rtol: float) -> bool:
    """Whether two moment vectors describe the same values up to ``rtol``.

    NaN and Inf counts must be equal; sums agree to ``rtol`` of the larger |sum|,
    sums of squares to ``2 rtol`` of the larger one, extrema to ``rtol`` of the
    largest magnitude among them. A NaN moment matches only NaN, an infinite one
    only the same infinity.
    """
    if ma[NAN_COUNT] != mb[NAN_COUNT] or ma[INF_COUNT] != mb[INF_COUNT]:
        return False
    scale = max(abs(ma[ABS_SUM]), abs(mb[ABS_SUM]))
    if not _close(ma[SUM], mb[SUM], rtol * scale):
        return False
    if not _close(ma[ABS_SUM], mb[ABS_SUM], rtol * scale):
        return False
    if not _close(ma[SUMSQ], mb[SUMSQ], 2 * rtol * max(abs(ma[SUMSQ]), abs(mb[SUMSQ]))):
        return False
    # np.nanmax of the absolute values and 0, in plain floats (called thousands of times)
    extent = max(abs(float(v)) for v in (ma[MIN], ma[MAX], mb[MIN], mb[MAX], 0.0) if not math.isnan(v))
    return _close(ma[MIN], mb[MIN], rtol * extent) and _close(ma[MAX], mb[MAX], rtol * extent)


def moments_may_be_close(mine: np.ndarray, others: np.ndarray, rtol: np.ndarray) -> np.ndarray:
    """Which rows of ``others`` may pass :func:`moments_close` against ``mine`` (one row, or one per row).

    A superset, decided for all rows at once: tolerances widened by 1e-6 of
    themselves, rows with a non-finite value always kept. Screening many
    candidates this way and running the exact scalar test on the survivors
    decides as the scalar test alone would, in a fraction of the time.
    """
    n = len(others)
    mine = np.broadcast_to(mine, (n, mine.shape[-1]))
    loose = rtol * (1 + 1e-6)
    with np.errstate(invalid="ignore", over="ignore"):
        extent = np.nanmax(np.abs(np.column_stack([
            mine[:, MIN], mine[:, MAX], others[:, MIN], others[:, MAX], np.zeros(n),
        ])), axis=1) if n else np.zeros(0)
        scale = np.maximum(np.abs(others[:, ABS_SUM]), np.abs(mine[:, ABS_SUM]))
        sq_scale = 2 * np.maximum(np.abs(others[:, SUMSQ]), np.abs(mine[:, SUMSQ]))
        keep = (others[:, NAN_COUNT] == mine[:, NAN_COUNT]) & (others[:, INF_COUNT] == mine[:, INF_COUNT])
        for column, tolerance in ((SUM, scale), (ABS_SUM, scale), (SUMSQ, sq_scale), (MIN, extent), (MAX, extent)):
            x, y = others[:, column], mine[:, column]
            unsure = ~np.isfinite(x) | ~np.isfinite(y) | ~np.isfinite(tolerance)
            keep &= unsure | (np.abs(x - y) <= loose * tolerance + 1e-300)
    return keep


def _close(x: float, y: float, atol: float) -> bool:
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    if math.isinf(x) or math.isinf(y):
        return x == y
    return abs(x - y) <= atol + 1e-300


# -- sampled values ------------------------------------------------------------------------


def sample_positions(numel: int, size: int) -> np.ndarray:
    """Flat (row-major) positions of the ``size`` values sampled from a tensor of ``numel`` elements, as int64.

    Evenly spread and deterministic, so both sides of a comparison sample the same elements.
    """
    return spread_positions(np.arange(min(numel, size), dtype=np.int64), numel, size)


def spread_positions(slots: Any, numel: int, size: int) -> Any:
    """The flat position of each sample slot (an int64 ``arange`` of ``min(numel, size)``, numpy or torch).

    The one formula behind :func:`sample_positions`; the recorder applies it to a
    tensor made on the GPU, so the positions need no copy from the host there.
    """
    return slots if numel <= size else slots * numel // size
