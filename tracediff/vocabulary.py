"""One vocabulary for every report: column names, metric names, number formatting, one-line errors.

The terminal report, the JSON report and the HTML report of ``first-drift``,
``run`` and ``bisect`` all take their words from here, so a value printed in
the headline, in a table row and in the HTML details reads the same (same name,
same digits), and a column means the same thing wherever it appears.

Kept free of heavy imports: the recorder imports :func:`error_summary`.
"""

from __future__ import annotations

import math
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


__all__ = ["COLUMNS", "LEGEND", "TERMINAL_COLUMNS", "Column", "error_summary", "metric_name", "number"]
