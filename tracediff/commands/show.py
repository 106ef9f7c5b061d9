"""``tracediff show TRACE``: what a trace file holds, at a glance."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracediff.commands import command_parser
from tracediff.errors import TraceConfigError
from tracediff.render.report import failure_lines, wide_console
from tracediff.store.reader import open_trace
from tracediff.store.trace import Trace
from tracediff.vocabulary import number


def register(subparsers: Any) -> None:
    parser = command_parser(
        subparsers,
        "show",
        help="summarise a trace file (side, model, steps, modules, records, stats)",
        description="Summarise a tracediff HDF5 trace, then list its traced modules.",
        examples=[
            ("tracediff show out/port.h5", "side, model, steps, stats, and the first 40 traced modules"),
            ("tracediff show out/port.h5 --module 'blocks\\.2\\.' --limit 0", "every traced module of block 2"),
        ],
    )
    parser.add_argument("trace", help="trace file (.h5) written by the recorder")
    parser.add_argument("--module", metavar="REGEX", help="only list modules whose name matches (re.search)")
    parser.add_argument("--limit", type=int, default=40, metavar="N", help="list at most N rows (default 40; 0 = all)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise TraceConfigError(f"--limit={args.limit} must be 0 (all) or a positive number of rows")
    pattern = _compile(args.module)
    with open_trace(args.trace) as trace:
        summary = summarise(trace)
        rows = module_rows(trace, pattern)
    if args.json:
        print(json.dumps({"summary": summary, "modules": rows}, indent=2, default=str))
        return 0
    render(summary, rows, limit=args.limit)
    return 0


def summarise(trace: Trace) -> dict[str, Any]:
    """The headline facts of a trace, as plain data."""
    records = trace.records
    traced = np.unique(records.columns["module"]) if len(records) else np.array([], dtype=int)
    config = trace.config
    return {
        "file": trace.path,
        "file_size": os.path.getsize(trace.path),
        "side": trace.side,
        "model_class": trace.meta.get("model_class", ""),
        "complete": trace.complete,
        "created": trace.meta.get("created", ""),
        "torch_version": trace.meta.get("torch_version", ""),
        "device": trace.meta.get("device", ""),
        "rank": trace.meta.get("rank", 0),
        "world_size": trace.meta.get("world_size", 1),
        "steps": trace.steps,
        "modules_total": len(trace.modules.names),
        "modules_traced": int(len(traced)),
        "records": len(records),
        "stats": list(config.get("stats", [])),
        "layers": config.get("layers", ""),
        "failures": _failures(trace.meta.get("failures")),
        "stopped": str(trace.meta.get("stopped", "")),
    }


def module_rows(trace: Trace, pattern: re.Pattern[str] | None) -> list[dict[str, Any]]:
    """One row per (module, tensor label) in first-execution order."""
    records = trace.records
    if not len(records):
        return []
    modules = records.columns["module"]
    labels = records.columns["label"]
    keys = modules.astype(np.int64) * (len(records.labels) + 1) + labels
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    abs_mean = trace.stat("abs_mean") if trace.has_stat("abs_mean") else None
    rows = []
    for index, count in sorted(zip(first.tolist(), counts.tolist(), strict=True)):
        name = trace.module_name(int(modules[index]))
        shown = name or "<model>"
        if pattern is not None and not pattern.search(name):
            continue
        same = keys == keys[index]
        rows.append(
            {
                "module": shown,
                "class": trace.modules.classes[int(modules[index])].rsplit(".", 1)[-1],
                "tensor": records.label_of(index),
                "records": int(count),
                "calls": int(records.columns["call"][same].max()) + 1,
                "shape": list(records.shape_of(index)),
                "dtype": records.dtype_of(index),
                "abs_mean": float(abs_mean[index]) if abs_mean is not None else None,
            }
        )
    return rows


def render(summary: dict[str, Any], rows: list[dict[str, Any]], *, limit: int, console: Console | None = None) -> None:
    """Print the summary and the module table; names are never cut (folded on a terminal, whole in a pipe)."""
    console = console or wide_console(min_width=80)
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    steps = summary["steps"]
    state = "[green]complete[/]" if summary["complete"] else "[yellow]incomplete (writer did not close)[/]"
    facts = [
        ("file", f"{summary['file']}  ({_size(summary['file_size'])})"),
        ("side", summary["side"]),
        ("model", summary["model_class"]),
        ("state", state),
        ("steps", _steps(steps)),
        ("modules", f"{summary['modules_traced']} traced of {summary['modules_total']}"),
        ("records", f"{summary['records']:,}"),
        ("stats", ", ".join(summary["stats"]) or "-"),
        ("layers", summary["layers"] or "(all)"),
        ("recorded with", f"torch {summary['torch_version']} on {summary['device']}, "
         f"rank {summary['rank']}/{summary['world_size']}, {summary['created']}"),
    ]
    for key, value in facts:
        head.add_row(key, str(value))
    console.print(head)
    if summary["stopped"]:
        console.print(f"stopped early: {summary['stopped']}", style="yellow", markup=False, highlight=False)
    for line in failure_lines({"": summary["failures"]}):
        console.print(Text(f"warning: {line}", style="yellow"), soft_wrap=True)
    table = Table(title="records per module and tensor (first step's abs_mean)", title_justify="left")
    for column in ("module", "class", "tensor", "records", "calls", "shape", "dtype", "abs_mean"):
        table.add_column(column, justify="right" if column in ("records", "calls", "abs_mean") else "left",
                         overflow="fold")
    shown = rows if limit == 0 else rows[:limit]
    for row in shown:
        value = row["abs_mean"]
        table.add_row(
            Text(row["module"]), Text(row["class"]), Text(row["tensor"]), str(row["records"]), str(row["calls"]),
            "×".join(map(str, row["shape"])) or "()", row["dtype"], number(value),
        )
    console.print(table)
    if len(rows) > len(shown):
        console.print(f"… {len(rows) - len(shown)} more rows (use --limit 0 or --module REGEX)")


def _failures(value: Any) -> dict[str, str]:
    """The trace's recording failures; anything but a name -> error mapping (a damaged attribute) reads as none."""
    if not isinstance(value, dict):
        return {}
    return {str(name): str(error) for name, error in value.items()}


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TraceConfigError(f"--module={pattern!r} is not a valid regex ({exc})") from None


def _steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if steps == list(range(steps[0], steps[-1] + 1)) and len(steps) > 3:
        return f"{steps[0]}–{steps[-1]} ({len(steps)})"
    return ", ".join(map(str, steps))


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


