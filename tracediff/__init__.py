"""tracediff: find the first layer where a model port computes something different.

Public API:
    attach, trace_step: record a model's per-layer activations into HDF5.
    TraceConfig: tracing settings (``FASTVIDEO_TRACE_*`` variables or arguments).
    open_trace: read a trace back as numpy columns.
    merge_traces: merge the per-rank traces of a distributed run into one trace.

Names are imported lazily so that commands which only read traces
(``tracediff show``, ``first-drift``) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tracediff.version import __version__

_EXPORTS = {
    "TraceConfig": "tracediff.config",
    "AlignmentError": "tracediff.errors",
    "MergeError": "tracediff.errors",
    "SpecError": "tracediff.errors",
    "TraceConfigError": "tracediff.errors",
    "TraceFormatError": "tracediff.errors",
    "TracediffError": "tracediff.errors",
    "TraceHandle": "tracediff.hooks",
    "attach": "tracediff.hooks",
    "current_step": "tracediff.hooks",
    "trace_step": "tracediff.hooks",
    "open_trace": "tracediff.store.reader",
    "merge_traces": "tracediff.merge",
    "Trace": "tracediff.store.trace",
}

__all__ = [
    "AlignmentError",
    "MergeError",
    "SpecError",
    "Trace",
    "TraceConfig",
    "TraceConfigError",
    "TraceFormatError",
    "TraceHandle",
    "TracediffError",
    "__version__",
    "attach",
    "current_step",
    "merge_traces",
    "open_trace",
    "trace_step",
]

if TYPE_CHECKING:
    from tracediff.config import TraceConfig
    from tracediff.errors import (
        AlignmentError,
        MergeError,
        SpecError,
        TraceConfigError,
        TracediffError,
        TraceFormatError,
    )
    from tracediff.hooks import TraceHandle, attach, current_step, trace_step
    from tracediff.merge import merge_traces
    from tracediff.store.reader import open_trace
    from tracediff.store.trace import Trace


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tracediff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
