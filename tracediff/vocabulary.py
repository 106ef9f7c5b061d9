"""One vocabulary for every report: column names, metric names, number formatting, finding messages, one-line errors.

The terminal report, the JSON report and the HTML report of ``first-drift``,
``run`` and ``bisect`` all take their words from here, so a value printed in
the headline, in a table row and in the HTML details reads the same (same name,
same digits), and a column means the same thing wherever it appears.

Kept free of heavy imports: the recorder imports :func:`error_summary`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

#: Longest one-line error summary (exception type included).
_ERROR_MAX = 200


def number(value: float | int | None) -> str:
    """A measured value with three significant digits, the one format every report uses.

    ``0.000473`` and ``4.73e-04`` are the same number; printing it one way here
    and the other way there made users think they were two numbers. Plain
    decimals from 1e-3 to 1e4, scientific notation outside; ``-`` for
    missing (``None``/NaN), ``inf``/``-inf`` for infinities.
    """
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        text = f"{value:.3g}"
        if "e" not in text:
            return text
    return f"{value:.2e}"


@dataclass(frozen=True)
class Column:
    """A table column: its header (terminal and HTML), its key in the JSON rows, what it means."""

    header: str
    key: str
    meaning: str


#: Columns of the first-drift tables, in order. The terminal shows the first ten, HTML all of them.
COLUMNS: tuple[Column, ...] = (
    Column("#", "index", "position among the compared records of the step, in the port's execution order"),
    Column("port module", "port", "module name in the port"),
    Column("upstream module", "upstream", "the aligned module in the upstream"),
    Column("call", "call", "which call of the module within the step (0 = first)"),
    Column("tensor", "tensor", "out, out[i], input[i], input.NAME: which tensor of the call"),
    Column("check", "check", "what decided the row: elements (each |port - upstream| against atol + rtol*|upstream|), "
           "a statistic's name (abs_mean, max, ...: its relative difference, when no elements were recorded) "
           "or abs_mean_limit"),
    Column("error", "value", "that check's worst value: the abs error at the worst element, or the statistic's "
           "relative difference"),
    Column("tol", "limit", "the tolerance that value was held to (atol + rtol*|upstream| at that element)"),
    Column("err/tol", "ratio", "error / tol; over 1 fails (✗)"),
    Column("rel L2 err", "rel_l2", "||port - upstream|| / ||upstream|| over the recorded elements"),
    Column("max abs err", "max_abs_err", "largest |port - upstream| over the recorded elements (not always the "
           "worst element: that one is worst relative to its own tolerance)"),
    Column("SQNR dB", "sqnr_db", "10*log10(||upstream||^2 / ||port - upstream||^2); higher is closer"),
    Column("shape", "port_shape", "the port tensor's shape"),
    Column("dtype", "port_dtype", "the port tensor's dtype (/ upstream's when different)"),
)

#: Columns the terminal table shows (the HTML table shows all).
TERMINAL_COLUMNS: tuple[Column, ...] = COLUMNS[:10]

#: One line under every first-drift table.
LEGEND = (
    "check: elements = each |port - upstream| against atol + rtol*|upstream|, a stat name = that statistic's "
    "relative difference; error: the check's worst value; tol: its tolerance there; err/tol: error / tol, "
    "✗ over 1; rel L2 err: ||port - upstream|| / ||upstream||"
)


def metric_name(check: str) -> str:
    """The name of the value a check measures, as headlines and details say it."""
    if check == "elements":
        return "abs error"
    if check == "abs_mean_limit":
        return "abs_mean drift"
    return f"{check} drift" if check else "unchecked"


def error_summary(error: BaseException | str) -> str:
    """An exception as one short line: its type and the first sentence of its first line.

    PyTorch's "Could not run 'aten::…' with arguments from the 'SparseCPU'
    backend" carries a 14 kB list of dispatch keys; a warning shows what
    failed, not that list.
    """
    if isinstance(error, BaseException):
        kind, text = type(error).__name__, str(error)
    else:
        kind, text = "", str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > 120 and ". " in first:
        first = first.split(". ", 1)[0]
    line = f"{kind}: {first}" if kind and first else (kind or first or "error")
    return line if len(line) <= _ERROR_MAX else line[: _ERROR_MAX - 1] + "…"


# -- finding messages: one line per finding of the differ, built from the finding's data ----------


def quoted_module(name: str) -> str:
    """A module name inside a sentence: quoted, the root module ``<model>``."""
    return repr(name) if name else "<model>"


def shape_tuple(shape: tuple[int, ...] | None) -> str:
    """A shape as Python writes it, ``?`` when it was not recorded."""
    return "?" if shape is None else "(" + ", ".join(map(str, shape)) + ")"


def batch_note(batching: tuple[str, int] | None) -> str:
    """Why a module's calls did not line up: ``(side that batches, number of calls)``, or nothing when none did."""
    if batching is None:
        return ""
    side, n = batching
    who, other = ("the port", "upstream's") if side == "port" else ("upstream", "the port's")
    return (f"; {who} batches {n} calls into one (CFG?), but this tensor does not split into {other} "
            f"{n} calls along dim 0")


def missing_message(kind: str, *, port: str, upstream: str, label: str, call: int) -> str:
    """A record one side produced and the other did not (``missing_in_port`` or ``missing_in_upstream``)."""
    if kind == "missing_in_port":
        return f"upstream {quoted_module(upstream)} produced {label} (call {call}) but the port's " \
               f"{quoted_module(port)} did not"
    return f"port {quoted_module(port)} produced {label} (call {call}) but upstream {quoted_module(upstream)} did not"


def shape_message(port_shape: tuple[int, ...] | None, upstream_shape: tuple[int, ...] | None) -> str:
    """A module output of another shape on each side."""
    return f"shape {shape_tuple(port_shape)} in the port vs {shape_tuple(upstream_shape)} upstream"


def dtype_message(port_dtype: str, upstream_dtype: str) -> str:
    """A record of another dtype on each side (usually deliberate: a bf16 port against fp32)."""
    return f"dtype {port_dtype} in the port vs {upstream_dtype} upstream"


def nonfinite_message(nan_count: int, inf_count: int) -> str:
    """The port's first NaN/Inf; counts below zero were not recorded."""
    counts = f"{nan_count} NaN, {inf_count} Inf" if nan_count >= 0 and inf_count >= 0 else "non-finite stats"
    return f"first NaN/Inf: the port's output has {counts}; upstream's is finite"


def drift_message(*, check: str, value: float, limit: float, ratio: float, max_abs_err: float,
                  rel_l2: float) -> str:
    """A record over tolerance: the deciding check's value against its limit."""
    return f"{metric_name(check)} {number(value)} > tol {number(limit)}" + (
        f" at the worst element (tol = atol + rtol*|upstream| there; err/tol {number(ratio)}, "
        f"max abs err {number(max_abs_err)}, rel L2 err {number(rel_l2)})"
        if check == "elements" else f" (err/tol {number(ratio)})"
    )


def rank_mismatch_message(mismatches: Iterable[tuple[str, str]]) -> str:
    """A replicated tensor that differs across ranks: ``(side, which ranks disagree)`` per side."""
    return "; ".join((f"{side}: " if side == "upstream" else "") + text for side, text in mismatches)


def shard_note(side: str, ranks: Iterable[int], dim: int, errors: Iterable[float] | None) -> str:
    """How a drifting sharded record splits over ranks, with each shard's rel L2 error when it is known."""
    ranks = list(ranks)
    where = (f"{'' if side == 'port' else 'upstream '}sharded over ranks {', '.join(str(r) for r in ranks)} "
             f"along dim {dim}")
    if errors is None:
        return f"{where} (trace the full stat on both sides to see which rank's shard differs)"
    by_error = list(zip(errors, ranks, strict=True))
    worst = max(by_error)
    by_rank = ", ".join(f"rank {rank} {number(err)}" for err, rank in by_error)
    return f"{where}; rel L2 err by shard: {by_rank} (worst: rank {worst[1]})"


__all__ = [
    "COLUMNS",
    "LEGEND",
    "TERMINAL_COLUMNS",
    "Column",
    "batch_note",
    "drift_message",
    "dtype_message",
    "error_summary",
    "metric_name",
    "missing_message",
    "nonfinite_message",
    "number",
    "quoted_module",
    "rank_mismatch_message",
    "shape_message",
    "shape_tuple",
    "shard_note",
]
