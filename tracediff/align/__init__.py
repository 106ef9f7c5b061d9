"""Alignment: which upstream module computes what which port module computes.

Layer 3 of the data flow (record → store → **align** → compare → localise → render → entry points): it reads
traces and module tables, and knows nothing of diffs, reports or the CLI.

Public API (the names docs/alignment.md uses):
    align: two traces -> :class:`Alignment`.
    align_models: two live models -> :class:`Alignment` (no trace needed).
    coverage: how much of each side the alignment pairs.
"""

from __future__ import annotations

from tracediff.align.aligner import align, align_models, coverage
from tracediff.align.alignment import Alignment

__all__ = ["Alignment", "align", "align_models", "coverage"]
