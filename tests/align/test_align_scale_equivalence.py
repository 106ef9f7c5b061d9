"""The aligner's fast paths (issue 20: ``align`` at 5 000 modules) decide exactly as the plain loops they replaced.

Each test keeps a straightforward reference implementation of the old per-row
code and compares it with the vectorised one on synthetic tables built to hit
the edges: twins, converted dtypes, transposed weights, NaN and inf moments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tracediff.align import fingerprint as fp
from tracediff.align.side import _base_side, _same_values
from tracediff.moments import ABS_SUM, MAX, MIN, SUM, SUMSQ, moments_close, moments_may_be_close, sample_positions
from tracediff.store.trace import FINGERPRINT_SAMPLE, ModuleTable, ParamEntry


def _fingerprint(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flat = values.reshape(-1).astype(np.float64)
    finite = flat[np.isfinite(flat)]
    moments = np.array([
        finite.sum(), np.abs(finite).sum(), (finite ** 2).sum(),
        finite.min() if finite.size else math.nan, finite.max() if finite.size else math.nan,
        np.isnan(flat).sum(), np.isinf(flat).sum(),
    ])
    if np.isnan(flat).any():
        moments[SUMSQ] = math.nan
    positions = sample_positions(flat.size, FINGERPRINT_SAMPLE)
    sample = np.full(FINGERPRINT_SAMPLE, np.nan)
    sample[: len(positions)] = flat[positions]
    sample_t = np.full(FINGERPRINT_SAMPLE, np.nan)
    if values.ndim == 2:
        sample_t[: len(positions)] = values.T.reshape(-1)[positions]
    return moments, sample, sample_t


def _side(tensors: list[tuple[np.ndarray, str]], label: str):  # noqa: ANN202
    names = [""] + [f"m{i}" for i in range(len(tensors))]
    params, moments, samples, samples_t = [], [], [], []
    for i, (values, dtype) in enumerate(tensors):
        params.append(ParamEntry(i + 1, f"m{i}.weight", "parameter", tuple(values.shape), dtype))
        m, s, t = _fingerprint(values)
        moments.append(m)
        samples.append(s)
        samples_t.append(t)
    table = ModuleTable(names, ["Model"] + ["Linear"] * len(tensors), params, np.array(moments), np.array(samples),
                        np.array(samples_t))
    return _base_side(table, label, kinds=table.classes)


def _pair(seed: int):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    up, port = [], []
    for k in range(120):
        shape = [(8, 4), (4, 8), (32,), (16, 16)][k % 4]
        values = rng.standard_normal(shape).astype(np.float32)
        kind = k % 9
        if kind == 5:
            values[0, ...] = np.nan
        if kind == 6:
            values.reshape(-1)[3] = np.inf
        up.append((values, "float32"))
        if kind == 0:  # the same values
            port.append((values.copy(), "float32"))
        elif kind == 1:  # reduction noise
            port.append((values * (1 + 3e-7), "float32"))
        elif kind == 2:  # bf16 conversion
            port.append((values * (1 + 3e-3 * rng.standard_normal(shape)), "bfloat16"))
        elif kind == 3 and values.ndim == 2:  # stored transposed
            port.append((values.T.copy(), "float32"))
        elif kind == 4:  # a twin: both sides hold it twice
            port.append((np.ones(shape, np.float32), "float32"))
            up.append((np.ones(shape, np.float32), "float32"))
            port.append((np.ones(shape, np.float32), "float32"))
        elif kind in (5, 6):
            port.append((values.copy(), "float32"))
        else:  # unrelated values of the same size: only the window screens them out
            port.append((rng.standard_normal(shape).astype(np.float32), "float32"))
    return _side(up, "upstream"), _side(port, "port")


def _reference_candidates(side, row: int, other) -> list[int]:  # noqa: ANN001
    """The pre-issue-20 ``_param_candidates``: one mixed-dtype window per size, a scalar test per row."""
    groups: dict[int, list[int]] = {}
    for rows in other.identity:
        for r in rows:
            groups.setdefault(math.prod(other.table.params[r].shape), []).append(r)
    numel = math.prod(side.table.params[row].shape)
    if numel not in groups:
        return []
    rows = np.asarray(groups[numel])
    moments = other.table.param_moments[rows]
    order = np.argsort(moments[:, SUMSQ], kind="stable")
    keys, rows, moments = moments[order, SUMSQ], rows[order], moments[order]
    mine = side.table.param_moments[row]
    sumsq = float(mine[SUMSQ])
    if math.isnan(sumsq):
        window = np.flatnonzero(np.isnan(keys))
    else:
        slack = 2 * fp.CROSS_DTYPE_RTOL * abs(sumsq) + 1e-30
        low = int(np.searchsorted(keys, sumsq - slack, side="left"))
        high = int(np.searchsorted(keys, sumsq + slack, side="right"))
        near = moments[low:high]
        scale = 2 * fp.CROSS_DTYPE_RTOL * np.maximum(np.abs(near[:, ABS_SUM]), abs(mine[ABS_SUM])) + 1e-30
        extent = 2 * fp.CROSS_DTYPE_RTOL * np.maximum(
            np.abs(near[:, [MIN, MAX]]).max(axis=1), abs(mine[MAX])) + 1e-30
        with np.errstate(invalid="ignore"):
            keep = (
                (np.abs(near[:, ABS_SUM] - mine[ABS_SUM]) <= scale)
                & (np.abs(near[:, SUM] - mine[SUM]) <= scale)
                & ((np.abs(near[:, MIN] - mine[MIN]) <= extent)
                   | (np.isnan(near[:, MIN]) & np.isnan(mine[MIN])))
                & ((np.abs(near[:, MAX] - mine[MAX]) <= extent)
                   | (np.isnan(near[:, MAX]) & np.isnan(mine[MAX])))
            )
        window = low + np.flatnonzero(keep)
    return sorted(int(rows[k]) for k in window if fp._param_match(side, row, other, int(rows[k])) is not None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_screened_candidates_match_the_scalar_window(seed: int) -> None:
    up, port = _pair(seed)
    rows = [r[0] for r in up.identity if r]
    screened = fp._screened_candidates(up, rows, fp._index_by_numel(port, set()))
    found = 0
    for row, window in zip(rows, screened, strict=True):
        fast = sorted(int(r) for r in window if fp._param_match(up, row, port, int(r)) is not None)
        assert fast == _reference_candidates(up, row, port), row
        found += bool(fast)
    assert found > 40  # the table really holds matches of every kind


def test_moments_close_extent_is_nanmax() -> None:
    rng = np.random.default_rng(3)
    for _ in range(500):
        a, b = rng.standard_normal(7), rng.standard_normal(7)
        a[rng.integers(0, 7)] = rng.choice([np.nan, np.inf, 1.0])
        b[:] = a * (1 + rng.choice([0, 1e-7, 1e-3]))
        for rtol in (fp.SAME_DTYPE_RTOL, fp.CROSS_DTYPE_RTOL):
            may = moments_may_be_close(a, b[None, :], np.array([rtol]))[0]
            exact = moments_close(a, b, rtol)
            assert may or not exact


def _reference_passthrough(records: list[tuple[int, int, bool, tuple[int, ...], np.ndarray]],
                           leaves: set[int]) -> set[int]:
    """The old per-record loop over ``(module, call, is_input, shape, moments)`` in record order."""
    outputs: dict[int, int] = {}
    for module, call, is_input, _, _ in records:
        if call == 0 and not is_input:
            outputs[module] = outputs.get(module, 0) + 1
    found = set()
    for i in range(1, len(records)):
        module, call, is_input, shape, moments = records[i]
        previous = records[i - 1]
        if (outputs.get(module) != 1 or call != 0 or module not in leaves or previous[0] == module or is_input
                or shape != previous[3]):
            continue
        if _same_values(moments, previous[4]):
            found.add(module)
    return found


def test_passthrough_matches_the_record_loop() -> None:
    from types import SimpleNamespace

    from tracediff.align.side import _MOMENTS, _passthrough

    rng = np.random.default_rng(4)
    n, modules = 600, 400
    module = rng.integers(0, modules, n)
    call = rng.choice([0, 0, 0, 1], n)
    label = rng.choice([0, 0, 1], n)  # label 1 is an input
    ndim = rng.integers(1, 3, n)
    shape = np.full((n, 4), -1, dtype=np.int64)
    for i in range(n):
        shape[i, : ndim[i]] = rng.integers(1, 3, ndim[i])
    moments = rng.choice([1.0, 2.0], (n, len(_MOMENTS)), p=[0.97, 0.03])
    moments[rng.random((n, len(_MOMENTS))) < 0.2] = np.nan
    cols = {"seq": np.arange(n), "module": module, "call": call, "label": label, "ndim": ndim}
    cols.update({name: moments[:, k] for k, name in enumerate(_MOMENTS)})
    records = SimpleNamespace(columns=cols, labels=["output", "input.0"], shape=shape)
    names = [f"m{i}" for i in range(modules)]
    descendants = {name: ([f"m{i + 1}"] if i % 5 == 0 else []) for i, name in enumerate(names)}
    side = SimpleNamespace(names=names, descendants=descendants)
    fast = _passthrough(SimpleNamespace(records=records), np.arange(n), side)
    reference = _reference_passthrough(
        [(int(module[i]), int(call[i]), bool(label[i]), tuple(shape[i, : ndim[i]]), moments[i]) for i in range(n)],
        {i for i in range(modules) if i % 5},
    )
    assert fast == reference and reference  # some pass-throughs, and exactly the same
