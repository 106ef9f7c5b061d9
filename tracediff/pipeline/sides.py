"""The two sides of a comparison: open them, and refuse a pair in which nothing aligned.

Each side is a trace file (HDF5 or FastVideo JSONL), or a folder or glob of per-rank traces merged on the fly.
A rank set is merged against the other side (its shapes tell sharded from replicated records), so single files
are opened first; when the ranks name their modules differently from the other side, the aligner maps the names
for the merge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tracediff.align.aligner import align
from tracediff.align.alignment import Alignment
from tracediff.errors import AlignmentError
from tracediff.merge import NameMap, merge_paths
from tracediff.store.load import is_rank_set, load_trace, rank_trace_paths
from tracediff.store.trace import Trace

SIDES = ("upstream", "port")


@contextlib.contextmanager
def open_sides(
    upstream: str,
    port: str,
    *,
    mapping: Any = None,
    param_map: Any = None,
    shard_dims: Sequence[str] = (),
    skip_bad_lines: bool = False,
    note: Callable[[str], None] | None = None,
) -> Iterator[tuple[Trace, Trace]]:
    """Open both sides; a folder or glob of per-rank traces is merged, using the other side as reference.

    ``note`` hears one line per JSONL file whose bad lines were skipped (``skip_bad_lines``).
    """
    given = {"upstream": upstream, "port": port}
    with contextlib.ExitStack() as stack:
        sides: dict[str, Trace] = {}
        multi = {name: is_rank_set(given[name]) for name in SIDES}
        for name in sorted(multi, key=lambda n: multi[n]):  # single files first: they guide the merge
            if multi[name]:
                other = sides.get("port" if name == "upstream" else "upstream")
                sides[name] = _merge_ranks(given[name], name, other, mapping=mapping, param_map=param_map,
                                           shard_dims=shard_dims)
                continue
            trace = stack.enter_context(load_trace(given[name], skip_bad_lines=skip_bad_lines))
            skipped = trace.meta.get("skipped_lines", 0)
            if skipped and note is not None:
                note(f"skipped {skipped} bad line{'s' if skipped != 1 else ''} of {given[name]}")
            sides[name] = trace
        yield sides["upstream"], sides["port"]


def require_aligned(alignment: Alignment, upstream: str, port: str) -> None:
    """Refuse to go on when nothing but the two models themselves could be paired.

    Comparing two unrelated traces (a wrong file, another model) would only
    list every module as missing; one line saying so is more useful.

    Raises:
        AlignmentError: no module pair or group besides the root.
    """
    if alignment.groups or any(pair.source != "root" for pair in alignment.pairs):
        return
    raise AlignmentError(
        f"nothing aligned between {upstream} and {port}: no shared weights or structure (traces of different "
        "models?); pass --map FILE or --param-map FILE|MODULE:ATTR"
    )


def merge_lines(trace: Trace, name: str) -> list[str]:
    """One line for a merged side: what was merged, and what could not be merged exactly (none for a file)."""
    info = trace.meta.get("merge")
    if trace.ranks is None or not isinstance(info, dict):
        return []
    ranks = ", ".join(map(str, trace.ranks.ranks))
    line = (
        f"{name}: merged ranks {ranks} of {trace.ranks.world_size}: {info.get('sharded', 0)} sharded, "
        f"{info.get('replicated', 0)} replicated records"
    )
    extra = []
    if info.get("rank_mismatches"):
        extra.append(f"{info['rank_mismatches']} replicated records differ across ranks")
    if info.get("missing_ranks"):
        extra.append(f"ranks {', '.join(map(str, info['missing_ranks']))} missing")
    if info.get("assumed_replicated"):
        extra.append(f"{info['assumed_replicated']} equal-shaped records assumed replicated (no reference shape)")
    if info.get("samples_dropped"):
        extra.append(f"{info['samples_dropped']} sharded samples dropped (no full tensors)")
    return [line + ("; " + "; ".join(extra) if extra else "")]


def _merge_ranks(given: str, name: str, other: Trace | None, *, mapping: Any, param_map: Any,
                 shard_dims: Sequence[str]) -> Trace:
    """Merge one side's per-rank traces; module names unknown to the other side are mapped by the aligner."""
    paths = rank_trace_paths(given) or []
    if len(paths) == 1:
        return load_trace(paths[0])

    def map_names(first_rank: Trace) -> NameMap | None:
        if other is None or _names_shared(first_rank, other):
            return None
        if name == "port":
            return align(other, first_rank, mapping=mapping, param_map=param_map).upstream_for
        return align(first_rank, other, mapping=mapping, param_map=param_map).port_for

    return merge_paths(paths, reference=other, map_names=map_names, shard_dims=list(shard_dims), path=given)


def _names_shared(ranks: Trace, other: Trace) -> bool:
    """Whether most traced module names of a rank's trace exist on the other side as they are."""
    traced = {ranks.modules.names[i] for i in set(ranks.records.columns["module"].tolist()) if i >= 0}
    return len(traced & set(other.modules.names)) * 2 >= len(traced)
