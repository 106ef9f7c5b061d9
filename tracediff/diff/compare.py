"""The entry point of a diff: two aligned traces in, a :class:`DiffResult` out."""

from __future__ import annotations

from collections.abc import Iterable

from tracediff.align.alignment import Alignment
from tracediff.diff.collect import collect_findings
from tracediff.diff.finding import DEFAULT_FAIL_ON, KINDS
from tracediff.diff.match import RecordMatch
from tracediff.diff.result import DiffResult
from tracediff.diff.table import RecordTable
from tracediff.errors import DiffError
from tracediff.store.trace import Trace
from tracediff.tolerance import DEFAULT_PRESET, PRESETS, Tolerance, preset


def diff_traces(
    upstream: Trace,
    port: Trace,
    alignment: Alignment,
    *,
    tolerance: Tolerance | str | None = None,
    step: int | None = None,
    fail_on: Iterable[str] = DEFAULT_FAIL_ON,
) -> DiffResult:
    """Compare ``port`` against ``upstream`` and find the first record that breaks tolerance.

    Args:
        upstream: the reference trace (its values are ``b`` in ``atol + rtol * |b|``).
        port: the trace under test; its execution order defines "first".
        alignment: which upstream module is which port module.
        tolerance: a :class:`Tolerance`, a preset name, or ``None`` for :data:`DEFAULT_PRESET`.
        step: compare this step only; default every step both traces hold.
        fail_on: finding kinds that fail the diff (default :data:`DEFAULT_FAIL_ON`).

    Returns:
        A :class:`DiffResult`, truthy when nothing fatal was found.

    Raises:
        DiffError: no step in common, ``step`` absent, nothing aligned, or nothing comparable.
    """
    tol = _resolve_tolerance(tolerance)
    fail_on = frozenset(fail_on)
    unknown = sorted(fail_on - set(KINDS))
    if unknown:
        raise DiffError(f"fail_on has unknown kind {unknown[0]!r}; valid: {', '.join(KINDS)}")
    match = RecordMatch.build(upstream, port, alignment, step)
    # The traces compared: with the records of a module's batched calls (CFG) combined, see tracediff.diff.batching.
    upstream, port = match.upstream, match.port
    table = RecordTable.build(upstream, port, match, tol)
    return collect_findings(table, tol, fail_on, upstream, port, list(alignment.suspects))


def _resolve_tolerance(tolerance: Tolerance | str | None) -> Tolerance:
    if tolerance is None:
        return PRESETS[DEFAULT_PRESET]
    if isinstance(tolerance, str):
        return preset(tolerance)
    return tolerance
