"""The summary table of planted bugs: which module each way of asking names, against the expected one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bug_table
from planted import Bug
from wan_bugs import BUGS

#: The ways of asking, in table order: first-drift with automatic alignment, with the port's
#: param_names_mapping, bisection, and first-drift of FastVideo's own JSONL trace of the port.
AUTO, PARAM_MAP, BISECT, JSONL = "first-drift auto", "first-drift --param-map", "bisect", "FastVideo JSONL"
TOOLS = (AUTO, PARAM_MAP, BISECT, JSONL)
#: Suffix of a result key holding where the named module stood among the suspects (0: the culprit itself).
RANK = " rank"


def verdict(bug: Bug, named: str | None, rank: int = 0) -> str:
    """``ok`` when the expected module is named (``ok (suspect N)`` when it was the N-th suspect, not the
    culprit), ``WRONG`` otherwise, ``n/a`` when not run."""
    if named is None:
        return "n/a"
    if not bug.named_correctly(named):
        return "WRONG"
    return f"ok (suspect {rank + 1})" if rank else "ok"


def _verdict(bug: Bug, found: Mapping[str, Any], tool: str) -> str:
    return verdict(bug, found.get(tool), found.get(tool + RANK) or 0)


def render_table(results: dict[str, dict[str, str | None]]) -> str:
    """A plain-text table, one row per bug, a column pair (named, verdict) per tool."""
    return bug_table.render_table(BUGS, results, {tool: tool for tool in TOOLS}, _verdict)
