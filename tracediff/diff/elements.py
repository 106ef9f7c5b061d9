"""Element checks: each recorded element of the port against upstream's, as ``torch.testing.assert_close`` does.

An element fails when ``|port - ref| > atol + rtol * |ref|``; per record the differ also keeps the max absolute
error, the relative L2 error ``||port - ref|| / ||ref||``, the cosine similarity and the SQNR in dB. Everything
is vectorised over records: a record is a segment of one flat array, and records of one length are rows of a
matrix (the common case, ``sample_size`` elements each).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracediff.store.format import FULL_F32, FULL_F64, FULL_NONE
from tracediff.store.trace import Trace

#: Elements processed per vectorised batch (bounds memory, not speed).
_CHUNK_ELEMENTS = 1 << 22


def limit_ratio(value: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """``value / limit``; a zero limit means "any difference fails", NaN in either stays NaN."""
    with np.errstate(invalid="ignore"):
        out = np.where(value > 0, np.inf, np.where(np.isnan(value), np.nan, 0.0))
    np.divide(value, limit, out=out, where=limit > 0)
    return np.where(np.isnan(limit), np.nan, out)


@dataclass(eq=False)
class ElementMetrics:
    """Element metrics of every matched record pair, column-wise (NaN where no elements were compared)."""

    kind: np.ndarray  # 0 none, 1 sample, 2 full
    ratio: np.ndarray
    worst_diff: np.ndarray
    worst_allowed: np.ndarray
    max_abs: np.ndarray
    rel_l2: np.ndarray
    cosine: np.ndarray
    sqnr_db: np.ndarray

    @classmethod
    def compute(
        cls,
        upstream: Trace,
        port: Trace,
        mu: np.ndarray,
        mp: np.ndarray,
        atol: np.ndarray,
        rtol: np.ndarray,
        comparable: np.ndarray,
    ) -> ElementMetrics:
        n = len(mu)
        out = cls(np.zeros(n, dtype=np.int8), *(np.full(n, np.nan) for _ in range(7)))
        uc, pc = upstream.records.columns, port.records.columns
        full = (
            comparable
            & (uc["full_kind"][mu] != FULL_NONE)
            & (pc["full_kind"][mp] != FULL_NONE)
            & (uc["full_len"][mu] == pc["full_len"][mp])
            & (pc["full_len"][mp] > 0)
        )
        sample = (
            comparable
            & ~full
            & (pc["sample_len"][mp] > 0)
            & (uc["sample_len"][mu] == pc["sample_len"][mp])
            & (upstream.samples is not None)
            & (port.samples is not None)
        )
        for mask, kind in ((full, 2), (sample, 1)):
            idx = np.flatnonzero(mask)
            if not len(idx):
                continue
            a_vals, a_off, lens = _values(port, mp[idx], full=kind == 2)
            b_vals, b_off, _ = _values(upstream, mu[idx], full=kind == 2)
            chunks = _chunks(lens)
            a_parts = _Span(a_vals).each([(a_off[c], lens[c]) for c in chunks])
            b_parts = _Span(b_vals).each([(b_off[c], lens[c]) for c in chunks])
            for chunk, (a_chunk, a_at), (b_chunk, b_at) in zip(chunks, a_parts, b_parts, strict=True):
                sel = idx[chunk]
                res = _chunk_metrics(a_chunk, a_at, b_chunk, b_at, lens[chunk], atol[sel], rtol[sel])
                out.kind[sel] = kind
                for name, values in res.items():
                    getattr(out, name)[sel] = values
        return out


def _values(trace: Trace, rows: np.ndarray, *, full: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A flat float64 array holding the rows' elements, with each row's offset and length."""
    cols = trace.records.columns
    if not full:
        lens = cols["sample_len"][rows].astype(np.int64)
        samples = trace.samples
        if not hasattr(samples, "read_into"):  # read lazily, chunk by chunk (:class:`_Span`)
            samples = np.asarray(samples, dtype=np.float64)
        return samples, cols["sample_offset"][rows], lens  # type: ignore[return-value]
    lens = cols["full_len"][rows].astype(np.int64)
    offsets = np.zeros(len(rows), dtype=np.int64)
    parts: list[np.ndarray] = []
    base = 0
    for kind in (FULL_F32, FULL_F64):
        sel = np.flatnonzero(cols["full_kind"][rows] == kind)
        if not len(sel) or kind not in trace.full_values:
            continue
        start = cols["full_offset"][rows[sel]]
        lo, hi = int(start.min()), int((start + lens[sel]).max())
        parts.append(np.asarray(trace.full_values[kind][lo:hi], dtype=np.float64))
        offsets[sel] = start - lo + base
        base += hi - lo
    values = np.concatenate(parts) if parts else np.zeros(0)
    return values, offsets, lens


class _Span:
    """The values chunks of records need: an array as it is, or a lazy table read chunk by chunk.

    A trace file's samples (:class:`tracediff.store.reader.CommittedValues`) are read one
    chunk's span at a time, the next one in a background thread while this one is
    compared (HDF5 reads release the GIL): reading the whole table at once costs page
    faults and as much memory again, and reading in turn with the arithmetic leaves a
    core idle. Records far apart in the file make the whole table read once instead.
    """

    def __init__(self, values: Any) -> None:
        self.values = values

    def each(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per ``(offsets, lens)``: ``(values, offsets into them)`` covering ``offsets[i] .. offsets[i] + lens[i]``."""
        if isinstance(self.values, np.ndarray):
            for offsets, _ in parts:
                yield self.values, offsets
            return
        spans = [(int(o.min()), int((o + n).max())) if len(o) else (0, 0) for o, n in parts]
        if any(hi - lo > 4 * max(int(n.sum()), _CHUNK_ELEMENTS) for (lo, hi), (_, n) in zip(spans, parts, strict=True)):
            whole = np.asarray(self.values, dtype=np.float64)
            for offsets, _ in parts:
                yield whole, offsets
            return
        size = max((hi - lo for lo, hi in spans), default=0)
        buffers = (np.empty(size), np.empty(size))

        def read(i: int) -> np.ndarray:
            lo, hi = spans[i]
            out = buffers[i % 2][: hi - lo]
            self.values.read_into(out, lo)
            return out

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, 0) if parts else None
            for i, (offsets, _) in enumerate(parts):
                assert pending is not None
                values = pending.result()
                # the other buffer is free again: the caller is done with part i - 1
                pending = pool.submit(read, i + 1) if i + 1 < len(parts) else None
                yield values, offsets - spans[i][0]


def _chunks(lens: np.ndarray) -> list[np.ndarray]:
    """Split row indices into runs of at most ``_CHUNK_ELEMENTS`` elements (at least one row each)."""
    if not len(lens):
        return []
    bounds = np.cumsum(lens) // _CHUNK_ELEMENTS
    cuts = np.flatnonzero(np.diff(bounds)) + 1
    return np.split(np.arange(len(lens)), cuts)


def _chunk_metrics(a_vals: np.ndarray, a_off: np.ndarray, b_vals: np.ndarray, b_off: np.ndarray, lens: np.ndarray,
                   atol: np.ndarray, rtol: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`_segment_metrics`, but records of one length are taken as a 2-D block when that is exact.

    Nearly every record holds the same number of sample elements (``sample_size``); as rows of a
    matrix their elements need no per-element segment ids, repeats or ``reduceat``, the costly
    part of the general path on large traces.
    """
    out = {name: np.empty(len(lens)) for name in _SEGMENT_KEYS}
    if not len(lens):
        return out
    for length in np.unique(lens).tolist():
        rows = np.flatnonzero(lens == length)
        res = None
        if length > 0:
            res = _uniform_blocks(a_vals, a_off[rows], b_vals, b_off[rows], length, atol[rows], rtol[rows])
        if res is None:
            res = _segment_metrics(a_vals, a_off[rows], b_vals, b_off[rows], lens[rows], atol[rows], rtol[rows])
        for name in _SEGMENT_KEYS:
            out[name][rows] = res[name]
    return out


_SEGMENT_KEYS = ("ratio", "worst_diff", "worst_allowed", "max_abs", "rel_l2", "cosine", "sqnr_db")
#: Elements per side taken at once by :func:`_uniform_blocks`: small enough that its temporaries stay in cache.
_BLOCK_ELEMENTS = 1 << 18


def _uniform_blocks(
    a_vals: np.ndarray,
    a_off: np.ndarray,
    b_vals: np.ndarray,
    b_off: np.ndarray,
    length: int,
    atol: np.ndarray,
    rtol: np.ndarray,
) -> dict[str, np.ndarray] | None:
    """:func:`_uniform_metrics` of records of one ``length``, a block of rows at a time; None outside its fast case.

    Each row's results depend on that row alone, so blocks give exactly the whole-matrix results;
    but a block's copies and temporaries stay in cache and in memory already mapped, where
    whole-chunk ones cost page faults and memory traffic on every pass.
    """
    n = len(a_off)
    if not (np.all(atol > 0) and np.all(rtol >= 0)):
        return None
    out = {name: np.empty(n) for name in _SEGMENT_KEYS}
    step = max(1, _BLOCK_ELEMENTS // length)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        a = _rows_of(a_vals, a_off[lo:hi], length)
        res = _uniform_metrics(a, _rows_of(b_vals, b_off[lo:hi], length), atol[lo:hi], rtol[lo:hi])
        if res is None:  # a non-finite element: the general path takes all of these records, as before
            return None
        for name in _SEGMENT_KEYS:
            out[name][lo:hi] = res[name]
    return out


def _rows_of(values: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """``values[offsets[i] : offsets[i] + length]`` as row ``i`` of a matrix (a view when they are back to back).

    Otherwise rows are copied whole from a sliding-window view, which beats gathering
    element by element through an index matrix.
    """
    n = len(offsets)
    if n and int(offsets[0]) >= 0 and (n == 1 or bool(np.all(np.diff(offsets) == length))):
        start = int(offsets[0])
        return values[start : start + n * length].reshape(n, length)
    return np.lib.stride_tricks.sliding_window_view(values, length)[offsets]


def _uniform_metrics(
    a: np.ndarray, b: np.ndarray, atol: np.ndarray, rtol: np.ndarray
) -> dict[str, np.ndarray] | None:
    """:func:`_segment_metrics` of equal-length records (rows of ``a`` and ``b``); None outside its fast case.

    The fast case is every element finite and every row's ``atol`` > 0 (so every allowed
    difference is > 0): then the general function's special cases cannot occur, and its
    results are reproduced exactly, up to the summation order of the sums of squares.
    Temporaries are reused in place: on large traces each pass over the elements counts.
    """
    if not (np.all(atol > 0) and np.all(rtol >= 0)):
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.subtract(a, b)
        d2 = np.einsum("ij,ij->i", d, d)
    if not np.isfinite(d2).all():  # a non-finite element on either side (or an overflow): the general path
        return None
    a2 = np.einsum("ij,ij->i", a, a)
    b2 = np.einsum("ij,ij->i", b, b)
    ab = np.einsum("ij,ij->i", a, b)
    diff = np.abs(d, out=d)
    allowed = np.abs(b)
    uniform = atol.min() == atol.max() and rtol.min() == rtol.max()
    allowed *= rtol[0] if uniform else rtol[:, None]
    allowed += atol[0] if uniform else atol[:, None]
    el_ratio = np.divide(diff, allowed)
    first = np.argmax(el_ratio, axis=1)  # the first element of the worst ratio, as the general function picks
    at = np.arange(len(first))
    rel_l2, cosine, sqnr = _norm_metrics(d2, a2, b2, ab)
    return {
        "ratio": el_ratio[at, first],
        "worst_diff": diff[at, first],
        "worst_allowed": allowed[at, first],
        "max_abs": diff.max(axis=1),
        "rel_l2": rel_l2,
        "cosine": cosine,
        "sqnr_db": sqnr,
    }


def _segment_metrics(a_vals: np.ndarray, a_off: np.ndarray, b_vals: np.ndarray, b_off: np.ndarray, lens: np.ndarray,
                     atol: np.ndarray, rtol: np.ndarray) -> dict[str, np.ndarray]:
    """Element metrics of many records at once: gather all elements, reduce per record."""
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    total = int(lens.sum())
    within = np.arange(total) - np.repeat(starts, lens)
    a = a_vals[np.repeat(a_off, lens) + within]
    b = b_vals[np.repeat(b_off, lens) + within]
    seg = np.repeat(np.arange(len(lens)), lens)
    finite = np.isfinite(a) & np.isfinite(b)
    same = ~finite & ((a == b) | (np.isnan(a) & np.isnan(b)))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(a - b), np.where(same, 0.0, np.inf))
        allowed = atol[seg] + rtol[seg] * np.where(np.isfinite(b), np.abs(b), 0.0)
    el_ratio = limit_ratio(diff, allowed)
    ratio = np.maximum.reduceat(el_ratio, starts)
    first = np.minimum.reduceat(np.where(el_ratio == ratio[seg], np.arange(total), total), starts)
    af, bf = np.where(finite, a, 0.0), np.where(finite, b, 0.0)
    d2 = np.add.reduceat((af - bf) ** 2, starts)
    a2 = np.add.reduceat(af * af, starts)
    b2 = np.add.reduceat(bf * bf, starts)
    ab = np.add.reduceat(af * bf, starts)
    broken = np.add.reduceat((~finite & ~same).astype(np.int64), starts) > 0
    rel_l2, cosine, sqnr = _norm_metrics(d2, a2, b2, ab)
    return {
        "ratio": ratio,
        "worst_diff": diff[first],
        "worst_allowed": allowed[first],
        "max_abs": np.maximum.reduceat(diff, starts),
        "rel_l2": np.where(broken, np.inf, rel_l2),
        "cosine": np.where(broken, np.nan, cosine),
        "sqnr_db": np.where(broken, -np.inf, sqnr),
    }




def _norm_metrics(
    d2: np.ndarray, a2: np.ndarray, b2: np.ndarray, ab: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rel L2 error, cosine, SQNR dB)`` per record from its sums of squares (``d = port - ref``)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_l2 = np.where(b2 > 0, np.sqrt(d2 / b2), np.where(d2 > 0, np.inf, 0.0))
        cosine = np.where((a2 > 0) & (b2 > 0), ab / np.sqrt(a2 * b2), np.where((a2 == 0) & (b2 == 0), 1.0, 0.0))
        sqnr = np.where(d2 > 0, 10.0 * np.log10(b2 / d2), np.inf)
    return rel_l2, np.clip(cosine, -1.0, 1.0), sqnr
