"""The note that a loose preset hid an fp32 difference: re-diff under ``fp32`` when it could apply."""

from __future__ import annotations

from tracediff.align.alignment import Alignment
from tracediff.diff.compare import diff_traces
from tracediff.diff.result import DiffResult
from tracediff.errors import DiffError
from tracediff.store.trace import Trace
from tracediff.tolerance import DEFAULT_PRESET, PRESETS, fp32_note, looser_than, ran_in_fp32


def fp32_note_for(upstream: Trace, port: Trace, alignment: Alignment, result: DiffResult) -> str | None:
    """:func:`tracediff.tolerance.fp32_note` for a finished diff, or ``None``.

    The extra diff runs only for a tolerance looser than ``fp32`` on traces recorded in float32.
    """
    tolerance = result.tolerance
    if not looser_than(tolerance, PRESETS[DEFAULT_PRESET]) or not ran_in_fp32([*upstream.records.dtypes,
                                                                                 *port.records.dtypes]):
        return None
    try:
        strict = diff_traces(upstream, port, alignment, tolerance=PRESETS[DEFAULT_PRESET], fail_on=result.fail_on)
    except DiffError:
        return None
    flagged, chosen = strict.first_drift, result.first_drift
    if flagged is None or flagged.kind != "drift" or flagged.row is None:
        return None
    key = (flagged.step, flagged.call, flagged.label, flagged.port)
    if chosen is not None and (chosen.step, chosen.call, chosen.label, chosen.port) == key:
        return None  # the chosen tolerance flags the very same record
    return fp32_note(tolerance, dtypes=[*upstream.records.dtypes, *port.records.dtypes],
                     passed=(flagged.culprit or flagged.port or "?", flagged.row.ratio))
