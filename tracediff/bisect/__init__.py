"""Drift bisection: which module, and which operator inside it, first adds error.

Accumulated drift grows layer after layer, so the first layer whose accumulated
drift crosses a threshold is often several layers after the one that introduced
it. Bisection measures each module's *local* error instead: the error it adds
when it is fed the reference's own inputs (teacher forcing), drills down the
aligned module tree to the culprit, and traces operators inside it.

Public API:
    bisect_models: the whole drill-down on two live models -> :class:`BisectResult`.
    bisect_spec: the same from a run spec (``tracediff bisect SPEC.toml``).
    isolate_models: local / accumulated / amplification figures of one level.
    render_terminal, to_json, headline: reports.

See docs/bisection.md.
"""

from __future__ import annotations

from typing import Any

from tracediff.bisect.drill import BisectError, bisect_models, isolate_models
from tracediff.bisect.metrics import Metrics
from tracediff.bisect.result import BisectResult, Level, ModuleError, OpFinding, OpRef, Source

__all__ = [
    "BisectError",
    "BisectResult",
    "Level",
    "Metrics",
    "ModuleError",
    "OpFinding",
    "OpRef",
    "Source",
    "bisect_models",
    "bisect_spec",
    "headline",
    "isolate_models",
    "render_terminal",
    "to_json",
]


def __getattr__(name: str) -> Any:
    """Lazy: the spec and report layers import rich and the runner, which the API does not need."""
    if name == "bisect_spec":
        from tracediff.bisect.spec import bisect_spec

        return bisect_spec
    if name in ("render_terminal", "to_json", "headline"):
        from tracediff.bisect import report

        return getattr(report, name)
    raise AttributeError(f"module 'tracediff.bisect' has no attribute {name!r}")
