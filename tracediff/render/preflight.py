"""Show a :class:`PreflightResult`: one line when clean, a table of findings when not.

Called before the first-drift report (``first-drift``, ``run``, the pytest
section) so a converted-wrong weight or a different input is read before any
layer is blamed. Names come from user models and are never parsed as markup.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracediff.preflight.result import InputCheck, ParamCheck, PreflightResult, input_name

#: Findings listed in the terminal before "… and N more".
MAX_ROWS = 20


def render_preflight(result: PreflightResult, console: Console | None = None, *, diff: Any = None,
                     max_rows: int = MAX_ROWS, show_all: bool = False) -> None:
    """Print the pre-flight verdict; with ``diff`` (a DiffResult), name the likely cause of its first drift.

    Args:
        result: the pre-flight result.
        console: where to print (default a new console on stdout).
        diff: the :class:`~tracediff.diff.DiffResult` of the same two traces, if any.
        max_rows: findings listed before the rest are counted only.
        show_all: list every parameter, identical ones included (``tracediff weights --all``).
    """
    console = console or Console()
    if not result.weights_checked and not result.inputs_checked:
        console.print(Text("pre-flight: skipped (the traces hold neither a module table nor the model inputs)",
                           style="dim"), soft_wrap=True)
        return
    clean = bool(result)
    style = "green" if clean else "bold yellow"
    console.print(Text(result.summary(), style=style), soft_wrap=True)
    rows: list[ParamCheck | InputCheck] = [*result.input_findings]
    rows += result.params if show_all else [p for p in result.params if p.failing]
    rows += [] if show_all else [p for p in result.params if p.finding and not p.failing]
    if rows:
        console.print(findings_table(rows[:max_rows] if not show_all else rows, width=console.width))
        if not show_all and len(rows) > max_rows:
            console.print(Text(f"  … and {len(rows) - max_rows} more (see the JSON report)"), soft_wrap=True)
    for note in result.notes:
        console.print(Text(f"  note: {note}", style="dim"), soft_wrap=True)
    cause = likely_cause(result, diff)
    if cause:
        console.print(Text(cause, style="bold"), soft_wrap=True)


def likely_cause(result: PreflightResult, diff: Any) -> str | None:
    """The pre-flight's explanation of ``diff``'s first drift, if it has one."""
    first = getattr(diff, "first_drift", None)
    if first is None:
        return None
    return result.likely_cause(first.culprit, first.step)


def preflight_json(result: PreflightResult, diff: Any = None) -> dict[str, Any]:
    """``result.to_dict()`` with the likely cause of ``diff``'s first drift filled in."""
    first = getattr(diff, "first_drift", None)
    if first is None:
        return result.to_dict()
    return result.to_dict(first_drift_port=first.culprit, first_drift_step=first.step)


def findings_table(rows: list[ParamCheck | InputCheck], *, width: int) -> Table:
    """One row per verdict: check (weight, buffer, input), port name, upstream name, finding."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    # Names fold rather than being cut; each name column gets up to a third of what "check" leaves.
    room = max((width - 10) // 3, 12)
    longest = {
        "port": max((len(r.port_label if isinstance(r, ParamCheck) else f"{r.name} ({r.where})") for r in rows),
                    default=4),
        "upstream": max((len(r.upstream_label if isinstance(r, ParamCheck) else input_name(r.upstream_label))
                         for r in rows), default=8),
    }
    for column in ("check", "port", "upstream", "finding"):
        table.add_column(column, overflow="fold", min_width=min(longest[column], room) if column in longest else None)
    for row in rows:
        if isinstance(row, InputCheck):
            upstream = input_name(row.upstream_label) if row.upstream_label is not None else "-"
            port = f"{row.name} ({row.where})" if row.label is not None else f"- ({row.where})"
            verdict = ("differs: " if row.status == "different" else "") + row.describe()
            table.add_row(Text("input"), Text(port), Text(upstream), Text(verdict),
                          style="red" if row.finding else "")
            continue
        style = "red" if row.failing else ("yellow" if row.finding else "")
        table.add_row(Text(row.kind if row.kind == "buffer" else "weight"), Text(row.port_label),
                      Text(row.upstream_label), Text(_finding_text(row)), style=style)
    return table


def _finding_text(row: ParamCheck) -> str:
    """The verdict without repeating the names the other columns show."""
    text = row.describe()
    up = f"upstream {row.upstream_label}"
    return text.replace(f" vs {up}", "").replace(f" from {up}", "").replace(f" to {up}", "").replace(
        f" where {up} belongs", "").replace(
        f"holds {up} transposed", "holds upstream's transpose").replace(f"same values as {up}", "same values")
