"""Did both models receive the same inputs? Compare the root module's ``input.*`` records.

The recorder keeps every tensor argument of each top-level call (``input.x``,
``input[0]``, ``input.encoder_hidden_states``) as a record of module ``""``,
with moments and, when the ``sample``/``full`` stats are on, values. Per step
and call, arguments are matched by label; arguments the two forwards name
differently (``context`` upstream, ``encoder_hidden_states`` in the port) are
matched by position among the unmatched ones when their shapes agree.
Identical means the same values bit for bit (same dtype) as far as recorded:
the full tensor, else the sample, plus all seven moments.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np

from tracediff.modtree import ROOT
from tracediff.moments import MOMENT_NAMES, moments_close
from tracediff.preflight.compare import moments_delta, pair_rtol, sample_errors
from tracediff.preflight.result import InputCheck
from tracediff.store.trace import Trace

#: Moments of the same values summed in another order (another device) differ by about this much.
_REDUCTION_RTOL = 1e-9


def input_records(trace: Trace) -> dict[tuple[int, int], list[int]]:
    """``(step, call) -> record indices`` of the root module's input tensors, in call order."""
    names = trace.modules.names
    if ROOT in names:
        root = names.index(ROOT)
    else:
        return {}
    records = trace.records
    if len(records) == 0:
        return {}
    cols = records.columns
    labels = records.labels
    out: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index in np.flatnonzero(cols["module"] == root).tolist():
        if labels[int(cols["label"][index])].startswith("input"):
            out[(int(cols["step"][index]), int(cols["call"][index]))].append(index)
    return dict(out)


def check_inputs(upstream: Trace, port: Trace) -> tuple[list[InputCheck], bool, list[str]]:
    """Compare the inputs each model received, per step and top-level call.

    Returns:
        ``(checks, checked, notes)``: one check per input tensor in steps both
        traces hold; ``checked`` is False when neither trace recorded inputs.
    """
    up_calls, port_calls = input_records(upstream), input_records(port)
    notes: list[str] = []
    if not up_calls and not port_calls:
        return [], False, notes
    if not up_calls or not port_calls:
        side = "upstream" if not up_calls else "port"
        notes.append(f"the {side} trace holds no model inputs; inputs not compared")
        return [], False, notes
    checks: list[InputCheck] = []
    for key in sorted(set(up_calls) & set(port_calls)):
        checks += _compare_call(upstream, port, key, up_calls[key], port_calls[key])
    only = sorted({s for s, _ in up_calls} ^ {s for s, _ in port_calls})
    if only:
        notes.append(f"inputs of step{'s' if len(only) > 1 else ''} {', '.join(map(str, only))} recorded on one "
                     "side only; not compared")
    return checks, True, notes


def _compare_call(upstream: Trace, port: Trace, key: tuple[int, int], up_rows: list[int],
                  port_rows: list[int]) -> list[InputCheck]:
    step, call = key
    up_label = {upstream.records.label_of(r): r for r in up_rows}
    port_label = {port.records.label_of(r): r for r in port_rows}
    matched: list[tuple[int | None, int | None]] = []
    for label, row in port_label.items():
        if label in up_label:
            matched.append((up_label[label], row))
    left_up = [r for r in up_rows if upstream.records.label_of(r) not in port_label]
    left_port = [r for r in port_rows if port.records.label_of(r) not in up_label]
    # Arguments named differently on the two sides: pair by position when the shapes agree.
    while left_up and left_port and upstream.records.shape_of(left_up[0]) == port.records.shape_of(left_port[0]):
        matched.append((left_up.pop(0), left_port.pop(0)))
    matched += [(r, None) for r in left_up] + [(None, r) for r in left_port]
    order = {row: i for i, row in enumerate(port_rows)}
    matched.sort(key=lambda m: (m[1] is None, order.get(m[1], 0) if m[1] is not None else m[0]))
    checks = [_compare_record(upstream, port, step, call, u, p) for u, p in matched]
    return [check for check in checks if check is not None]


def _compare_record(upstream: Trace, port: Trace, step: int, call: int, u: int | None,
                    p: int | None) -> InputCheck | None:
    ur, pr = upstream.records, port.records
    base = InputCheck(
        status="", step=step, call=call,
        label=pr.label_of(p) if p is not None else None,
        upstream_label=ur.label_of(u) if u is not None else None,
        shape=pr.shape_of(p) if p is not None else None,
        upstream_shape=ur.shape_of(u) if u is not None else None,
        dtype=pr.dtype_of(p) if p is not None else None,
        upstream_dtype=ur.dtype_of(u) if u is not None else None,
    )
    if u is None:
        return replace(base, status="missing_in_upstream")
    if p is None:
        return replace(base, status="missing_in_port")
    if base.shape != base.upstream_shape:
        return replace(base, status="shape_mismatch")
    same_dtype = base.dtype == base.upstream_dtype
    rtol = pair_rtol(str(base.upstream_dtype), str(base.dtype))
    numel = int(ur.columns["numel"][u])
    values = _values(upstream, u), _values(port, p)
    compared = ""
    if values[0] is not None and values[1] is not None and len(values[0]) == len(values[1]):
        what = "all" if len(values[0]) >= numel else f"{len(values[0])} sampled of"
        compared = f"{what} {numel} element{'s' if numel != 1 else ''}"
        pair: tuple[np.ndarray, np.ndarray] | None = (values[0], values[1])
    else:
        pair = None
    moments_up, moments_port = _moments(upstream, u), _moments(port, p)
    moments = (moments_up, moments_port) if moments_up is not None and moments_port is not None else None
    if pair is None and moments is None:
        return None  # nothing recorded to compare (no moments, no values): say nothing rather than guess
    cast = "" if same_dtype else f"{base.upstream_dtype} -> {base.dtype}"
    values_same = pair is None or np.array_equal(*pair, equal_nan=True)
    moments_same = moments is None or moments_close(*moments, _REDUCTION_RTOL)
    if same_dtype and values_same and moments_same:
        return replace(base, status="identical", compared=compared)
    max_abs, rel = sample_errors(*pair) if pair is not None else (None, None)
    values_close = pair is None or _close(*pair, rtol)
    if not same_dtype and values_close and (moments is None or moments_close(*moments, rtol)):
        return replace(base, status="close", max_abs=max_abs, rel=rel, compared=compared, detail=cast)
    detail = cast
    if moments is not None and (pair is None or (values_same and not moments_same)):
        detail = "; ".join(part for part in (cast, "moments " + moments_delta(*moments)) if part)
    return replace(base, status="different", max_abs=max_abs, rel=rel, compared=compared, detail=detail)


def _values(trace: Trace, index: int) -> np.ndarray | None:
    full = trace.full(index)
    if full is not None:
        return np.asarray(full, dtype=np.float64).reshape(-1)
    return trace.sample(index)


def _moments(trace: Trace, index: int) -> np.ndarray | None:
    if not trace.meta.get("has_moments", False):
        return None
    cols = trace.records.columns
    if any(name not in cols for name in MOMENT_NAMES):
        return None
    return np.asarray([float(cols[name][index]) for name in MOMENT_NAMES], dtype=np.float64)


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    """Whether the port's values ``b`` match upstream's ``a`` to ``rtol`` (NaNs at the same places).

    Not the weight check's sample test (:mod:`tracediff.preflight.compare`): without its 1e-300 of
    slack, an all-zero upstream input matches only zeros.
    """
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return False
    va, vb = a[~nan_a], b[~nan_b]
    if va.size == 0:
        return True
    floor = rtol * 1e-3 * float(np.max(np.abs(va)))
    return bool(np.all(np.abs(vb - va) <= rtol * np.abs(va) + floor))
