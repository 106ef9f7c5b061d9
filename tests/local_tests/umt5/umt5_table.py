"""The summary table of planted bugs: which module first-drift and bisection name, against the expected one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bug_table
from planted import Bug
from umt5_bugs import BUGS

#: Result keys a bug test fills: the port module each tool named ("" = the model's own forward).
FIRST_DRIFT, BISECT = "first drift", "bisect"
#: Prefix of a result that is not a module name: the tool raised.
ERROR = "error: "


def verdict(bug: Bug, named: str | None) -> str:
    """``ok``: the expected module (or, for a subtree bug, one inside it); ``inside``: a module
    inside a module-scoped culprit (correct code that runs after the faulty code); ``ancestor``:
    a module containing it; ``CRASH``: the tool raised; ``WRONG`` otherwise."""
    if named is None:
        return "n/a"
    if named.startswith(ERROR):
        return "CRASH"
    if bug.named_correctly(named):
        return "ok"
    if named.startswith(bug.expected + "."):
        return "inside"
    if named == "" or bug.expected.startswith(named + "."):
        return "ancestor"
    return "WRONG"


def _verdict(bug: Bug, found: Mapping[str, Any], tool: str) -> str:
    return verdict(bug, found.get(tool))


def render_table(results: dict[str, dict[str, str | None]]) -> str:
    """A plain-text table, one row per bug, in ``BUGS`` order."""
    return bug_table.render_table(BUGS, results, {FIRST_DRIFT: "first drift names", BISECT: "bisect names"},
                                  _verdict, not_run="n/a (not run)")
