"""The summary table of planted bugs, for any family: which module each tool named, against the expected one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
from planted import Bug

#: ``verdict(bug, row, tool)``: the verdict cell for one tool's result in one bug's row.
Verdict = Callable[[Bug, Mapping[str, Any], str], str]


def render_table(bugs: Iterable[Bug], results: Mapping[str, Mapping[str, Any]], tools: Mapping[str, str],
                 verdict: Verdict, *, not_run: str = "-") -> str:
    """A plain-text table, one row per bug that has results (in ``bugs`` order), a column pair per tool.

    Args:
        results: ``{bug name: {tool: the module it named ("" = the model's own forward) or None}}``.
        tools: result key -> column header, in column order; each gets a (named, verdict) column pair.
        verdict: the family's verdict words.
        not_run: what a tool that did not run shows in its named column.
    """
    header = ["bug", "expected"]
    for title in tools.values():
        header += [title, ""]
    body = []
    for bug in bugs:
        found = results.get(bug.name)
        if found is None:
            continue
        cells = [bug.name, bug.expected + (" (or inside)" if bug.scope == "subtree" else "")]
        for tool in tools:
            named = found.get(tool)
            cells += [not_run if named is None else (named or "<model>"), verdict(bug, found, tool)]
        body.append(cells)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config,
                  key: pytest.StashKey[dict[str, dict[str, Any]]], title: str,
                  render: Callable[[dict[str, dict[str, Any]]], str]) -> None:
    """A family's ``pytest_terminal_summary``: ``render`` of the rows its bug tests stashed under ``key``, if any."""
    rows = config.stash.get(key, {})
    if not rows:
        return
    terminalreporter.write_sep("=", title)
    terminalreporter.write_line(render(rows))
