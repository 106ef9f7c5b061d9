"""``tracediff merge RANK_TRACES… -o MERGED.h5``: one trace of the whole model from per-rank traces.

Exit codes: 0 merged and every replicated tensor agrees across ranks, 1 merged
but some replicated tensor differs across ranks (listed), 2 usage or input
error (not one run's per-rank traces, a bad ``--shard-dim``).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from tracediff.commands import command_parser
from tracediff.merge import DEFAULT_REPLICA_RTOL, merge_files
from tracediff.store.load import rank_trace_paths
from tracediff.store.trace import Trace

EXIT_OK, EXIT_MISMATCH = 0, 1
#: Rank mismatches listed in the summary; the merged file holds all of them.
SHOWN = 10


def register(subparsers: Any) -> None:
    parser = command_parser(
        subparsers,
        "merge",
        help="merge the per-rank traces of a tensor-/sequence-parallel run into one trace",
        description=(
            "Combine per-rank traces exactly: sharded tensors are concatenated (moments added, min/max combined), "
            "replicated tensors are checked for equality across ranks. Exit code 0: merged; 1: merged, but a "
            "replicated tensor differs across ranks; 2: usage or input error. See docs/distributed.md."
        ),
        examples=[
            ("tracediff merge traces/port-rank*.h5 -o port.h5", "one trace of the whole model from every rank's"),
            ("tracediff merge traces/ -o port.h5 --like upstream.h5",
             "a folder of rank traces; shards found by comparing with the unsharded upstream trace"),
            ("tracediff merge traces/ -o port.h5 --shard-dim 'mlp\\.fc1=-1' --shard-dim 'norm=replicated'",
             "declare how modules are split when shapes alone cannot tell"),
        ],
    )
    parser.add_argument("traces", nargs="+", help="per-rank trace files, folders or glob patterns")
    parser.add_argument("-o", "--output", required=True, metavar="MERGED.h5", help="merged trace to write")
    parser.add_argument(
        "--like",
        metavar="TRACE",
        help="the unsharded side's trace: equal-shaped records are sharded where it holds a larger tensor",
    )
    parser.add_argument(
        "--shard-dim",
        action="append",
        default=[],
        metavar="REGEX=DIM",
        help="modules matching REGEX are sharded along DIM (or 'replicated'); repeatable, first match wins",
    )
    parser.add_argument(
        "--replica-rtol",
        type=float,
        default=DEFAULT_REPLICA_RTOL,
        metavar="X",
        help=f"relative difference above which replicated copies mismatch (default {DEFAULT_REPLICA_RTOL:g})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    paths = []
    for item in args.traces:
        paths.extend(rank_trace_paths(item) or [item])
    merged = merge_files(
        paths, args.output, reference=args.like, shard_dims=args.shard_dim, replica_rtol=args.replica_rtol
    )
    for line in summary_lines(merged):
        print(line)
    return EXIT_MISMATCH if merged.ranks is not None and len(merged.ranks.mismatch_record) else EXIT_OK


def summary_lines(merged: Trace) -> list[str]:
    """What the merge did, and the first replicated records that differ across ranks."""
    info = merged.meta.get("merge", {})
    layout = merged.ranks
    assert layout is not None
    lines = [
        f"merged ranks {', '.join(map(str, layout.ranks))} of {layout.world_size} into {merged.path}: "
        f"{info.get('records', 0)} records, {info.get('sharded', 0)} sharded, {info.get('replicated', 0)} replicated, "
        f"{info.get('single_rank', 0)} on one rank only"
    ]
    if info.get("missing_ranks"):
        lines.append(f"note: ranks {', '.join(map(str, info['missing_ranks']))} have no trace; sharded records "
                     "hold only the shards of the ranks merged")
    if info.get("assumed_replicated"):
        lines.append(
            f"note: {info['assumed_replicated']} records have equal shapes on every rank and were taken as "
            "replicated; give --like (the unsharded trace) or --shard-dim if some are sharded"
        )
    if info.get("samples_dropped"):
        lines.append(f"note: {info['samples_dropped']} sharded records lost their sample (no full tensors to "
                     "recompute it from)")
    records = np.unique(layout.mismatch_record)
    if len(records):
        lines.append(f"rank mismatch: {len(records)} replicated records differ across ranks; first:")
        names = merged.record_modules()
        for record in records[:SHOWN].tolist():
            cols = merged.records.columns
            lines.append(
                f"  {names[record] or '<model>'} step {int(cols['step'][record])} call {int(cols['call'][record])} "
                f"tensor {merged.records.label_of(record)}: {layout.describe_mismatch(record)}"
            )
    return lines


__all__ = ["register", "run", "summary_lines"]
