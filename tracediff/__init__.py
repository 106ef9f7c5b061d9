"""tracediff: find the first layer where a model port computes something different.

Public API:
    attach, trace_step: record a model's per-layer activations into HDF5.
    TraceConfig: tracing settings (``FASTVIDEO_TRACE_*`` variables or arguments).
    open_trace: read a trace back as numpy columns.
"""

from __future__ import annotations

__version__ = "0.1.0"

from tracediff.config import TraceConfig
from tracediff.errors import AlignmentError, SpecError, TraceConfigError, TracediffError, TraceFormatError
from tracediff.hooks import TraceHandle, attach, current_step, trace_step
from tracediff.store.reader import open_trace
from tracediff.trace import Trace

__all__ = [
    "AlignmentError",
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
    "open_trace",
    "trace_step",
]
