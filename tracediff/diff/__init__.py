"""Compare two aligned traces record by record and find the first drift in execution order.

Records of an aligned module pair are matched by ``(step, call, tensor label)``.
For each match the differ computes what both traces allow:

* **elements** (``sample`` or ``full`` captured on both sides, same shape):
  ``torch.testing.assert_close`` semantics, an element fails when
  ``|port - ref| > atol + rtol * |ref|``; plus max absolute error, relative L2
  error ``||port - ref|| / ||ref||``, cosine similarity and SQNR in dB.
  Element checks are authoritative when present.
* **stats** (everything else, e.g. FastVideo JSONL): relative drift
  ``|port - ref| / max(scale, atol)`` of abs-mean, L2 norm, max, min, mean,
  std and sum, failing above ``stat_rtol``.
* ``abs_mean_limit``, when the tolerance sets one, bounds abs-mean drift on
  every record, elements or not.

Each matched record gets a ``ratio``: the largest ``value / limit`` over the
checks that applied, so ``ratio > 1`` means it breaks tolerance whatever the
check and whatever per-module override applied. Its ``drift`` is the number a
human reads on the curve: relative L2 error when elements were compared, else
the largest relative stat drift.

Shape and dtype mismatches, records present on one side only and the first
NaN/Inf are findings of their own kinds, ordered with drifts by the port's
execution order. Everything is vectorised over records with numpy; Python
objects are built only for the records a report shows.

The modules, in the order the data flows: :mod:`~tracediff.diff.match` (which record meets which, with
:mod:`~tracediff.diff.batching` for CFG calls batched on one side), :mod:`~tracediff.diff.checks` and
:mod:`~tracediff.diff.elements` (the measures and their limits), :mod:`~tracediff.diff.table` (all of them,
column-wise), :mod:`~tracediff.diff.collect` (kinds in execution order, with :mod:`~tracediff.diff.blame` and
:mod:`~tracediff.diff.ranks` saying where), :mod:`~tracediff.diff.result` (the :class:`DiffResult`) and
:mod:`~tracediff.diff.compare` (:func:`diff_traces`, the entry point). The words a person reads are made from the
data by :mod:`tracediff.vocabulary` and :mod:`tracediff.render`.
"""

from tracediff.diff.blame import caller_of
from tracediff.diff.checks import STAT_CHECKS
from tracediff.diff.compare import diff_traces
from tracediff.diff.finding import DEFAULT_FAIL_ON, KINDS, Finding, LayerRow, ShardSplit
from tracediff.diff.fp32 import fp32_note_for
from tracediff.diff.result import DiffResult

__all__ = [
    "DEFAULT_FAIL_ON",
    "KINDS",
    "STAT_CHECKS",
    "DiffResult",
    "Finding",
    "LayerRow",
    "ShardSplit",
    "caller_of",
    "diff_traces",
    "fp32_note_for",
]
