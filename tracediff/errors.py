"""The few error types tracediff raises on purpose.

Every expected failure (bad configuration, unreadable trace, unusable mapping)
is one of these, so the CLI can print a single line and exit 2 instead of a
traceback. Messages name the offending value and say what would be valid.
"""

from __future__ import annotations


class TracediffError(Exception):
    """Base class: an expected, user-facing failure."""


class TraceConfigError(TracediffError, ValueError):
    """A tracing setting (env var or argument) cannot be honoured."""


class TraceFormatError(TracediffError):
    """A file is not a readable tracediff trace of a supported version."""


class AlignmentError(TracediffError):
    """A mapping file or rule cannot be applied."""


class SpecError(TracediffError):
    """A run spec (TOML file or CLI flags) is incomplete or wrong."""


class DiffError(TracediffError):
    """Two traces cannot be compared (nothing aligned, no common step, bad tolerance)."""


class MergeError(TracediffError):
    """Per-rank traces cannot be merged (mixed runs, sides or world sizes; a bad shard-dim declaration)."""
