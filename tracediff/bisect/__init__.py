"""Drift bisection: which module, and which operator inside it, first adds error.

Accumulated drift grows layer after layer, so the first layer whose accumulated
drift crosses a threshold is often several layers after the one that introduced
it. Bisection measures each module's *local* error instead: the error it adds
when it is fed the reference's own inputs (teacher forcing), drills down the
aligned module tree to the culprit, and traces operators inside it.

Public API:
    bisect_models: the whole drill-down on two live models -> :class:`BisectResult`.
    isolate_models: local / accumulated / amplification figures of one level.

From a run spec: :func:`tracediff.pipeline.bisect.bisect_spec`; reports: :mod:`tracediff.render.bisect`.

See docs/bisection.md.
"""

from __future__ import annotations

from tracediff.bisect.drill import BisectError, bisect_models, isolate_models
from tracediff.bisect.metrics import Metrics
from tracediff.bisect.result import BisectResult, Level, ModuleMeasurement, OpFinding, OpRef, Source

__all__ = [
    "BisectError",
    "BisectResult",
    "Level",
    "Metrics",
    "ModuleMeasurement",
    "OpFinding",
    "OpRef",
    "Source",
    "bisect_models",
    "isolate_models",
]
