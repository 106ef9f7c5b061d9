"""The summary table of planted bugs: which module first-drift and bisection name, against the expected one."""

from __future__ import annotations

from vit_bugs import Bug
from vit_ports import PORTS

#: Result keys a bug test fills: the port module each tool named ("" = the model's own forward).
FIRST_DRIFT, BISECT = "first drift", "bisect"


def verdict(bug: Bug, named: str | None) -> str:
    """``ok``: the expected module (or, for a subtree bug, one inside it); ``inside``: a module
    inside a module-scoped culprit (correct code that runs after the faulty code); ``ancestor``:
    a module containing it; ``WRONG`` otherwise."""
    if named is None:
        return "n/a"
    if bug.named_correctly(named):
        return "ok"
    if named.startswith(bug.expected + "."):
        return "inside"
    if named == "" or bug.expected.startswith(named + "."):
        return "ancestor"
    return "WRONG"


def render_table(results: dict[tuple[str, str], dict[str, str | None]]) -> str:
    """A plain-text table, one row per (port, bug), in the ports' bug order."""
    header = ("port", "bug", "expected", "first drift names", "", "bisect names", "")
    body = []
    for port in PORTS.values():
        for bug in port.bugs:
            found = results.get((port.name, bug.name))
            if found is None:
                continue
            cells = [port.name, bug.name, bug.expected + (" (or inside)" if bug.scope == "subtree" else "")]
            for tool in (FIRST_DRIFT, BISECT):
                named = found.get(tool)
                cells += [_show(named), verdict(bug, named)]
            body.append(tuple(cells))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _show(named: str | None) -> str:
    if named is None:
        return "n/a (not run)"
    return named or "<model>"
