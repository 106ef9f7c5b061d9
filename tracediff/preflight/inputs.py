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

import numpy as np

from tracediff.preflight.compare import _moments_close, _moments_delta, _sample_errors, pair_rtol
from tracediff.preflight.result import InputCheck
from tracediff.store.trace import Trace

#: Moments of the same values summed in another order (another device) differ by about this much.
_REDUCTION_RTOL = 1e-9
_MOMENTS = ("sum", "abs_sum", "sumsq", "min", "max", "nan_count", "inf_count")


def input_records(trace: Trace) -> dict[tuple[int, int], list[int]]:
    """``(step, call) -> record indices`` of the root module's input tensors, in call order."""
    names = trace.modules.names
    if "" in names:
        root = names.index("")
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
    base = {
        "step": step,
        "call": call,
        "label": pr.label_of(p) if p is not None else None,
        "upstream_label": ur.label_of(u) if u is not None else None,
        "shape": pr.shape_of(p) if p is not None else None,
        "upstream_shape": ur.shape_of(u) if u is not None else None,
        "dtype": pr.dtype_of(p) if p is not None else None,
        "upstream_dtype": ur.dtype_of(u) if u is not None else None,
    }
    if u is None:
        return InputCheck(status="missing_in_upstream", **base)
    if p is None:
        return InputCheck(status="missing_in_port", **base)
    if base["shape"] != base["upstream_shape"]:
        return InputCheck(status="shape_mismatch", **base)
    same_dtype = base["dtype"] == base["upstream_dtype"]
    rtol = pair_rtol(str(base["upstream_dtype"]), str(base["dtype"]))
    numel = int(ur.columns["numel"][u])
    values_up, values_port, compared = _values(upstream, u), _values(port, p), ""
    if values_up is not None and values_port is not None and len(values_up) == len(values_port):
        what = "all" if len(values_up) >= numel else f"{len(values_up)} sampled of"
        compared = f"{what} {numel} element{'s' if numel != 1 else ''}"
    else:
        values_up = values_port = None
    moments_up, moments_port = _moments(upstream, u), _moments(port, p)
    have_moments = moments_up is not None and moments_port is not None
    if values_up is None and not have_moments:
        return None  # nothing recorded to compare (no moments, no values): say nothing rather than guess
    cast = "" if same_dtype else f"{base['upstream_dtype']} -> {base['dtype']}"
    values_same = values_up is None or np.array_equal(values_up, values_port, equal_nan=True)
    moments_same = not have_moments or _moments_close(moments_up, moments_port, _REDUCTION_RTOL)
    if same_dtype and values_same and moments_same:
        return InputCheck(status="identical", compared=compared, **base)
    max_abs = rel = None
    if values_up is not None:
        max_abs, rel = _sample_errors(values_up, values_port)
    values_close = values_up is None or _close(values_up, values_port, rtol)
    if not same_dtype and values_close and (not have_moments or _moments_close(moments_up, moments_port, rtol)):
        return InputCheck(status="close", max_abs=max_abs, rel=rel, compared=compared, detail=cast, **base)
    detail = cast
    if values_up is None or (values_same and not moments_same):
        detail = "; ".join(part for part in (cast, "moments " + _moments_delta(moments_up, moments_port)) if part)
    return InputCheck(status="different", max_abs=max_abs, rel=rel, compared=compared, detail=detail, **base)


def _values(trace: Trace, index: int) -> np.ndarray | None:
    full = trace.full(index)
    if full is not None:
        return np.asarray(full, dtype=np.float64).reshape(-1)
    return trace.sample(index)


def _moments(trace: Trace, index: int) -> np.ndarray | None:
    if not trace.meta.get("has_moments", False):
        return None
    cols = trace.records.columns
    if any(name not in cols for name in _MOMENTS):
        return None
    return np.asarray([float(cols[name][index]) for name in _MOMENTS], dtype=np.float64)


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return False
    va, vb = a[~nan_a], b[~nan_b]
    if va.size == 0:
        return True
    floor = rtol * 1e-3 * float(np.max(np.abs(va)))
    return bool(np.all(np.abs(vb - va) <= rtol * np.abs(va) + floor))
