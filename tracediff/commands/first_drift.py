"""``tracediff first-drift UPSTREAM PORT``: the first layer where the port computes something else.

Exit codes: 0 nothing drifts, 1 a drift was found, 2 usage or input error
(missing file, not a trace, nothing aligned).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from tracediff.commands import command_parser
from tracediff.diff import DEFAULT_FAIL_ON, KINDS, diff_traces
from tracediff.errors import DiffError
from tracediff.render.html import write_html
from tracediff.render.report import render_terminal, to_json, wide_console
from tracediff.store.load import is_rank_set, load_trace
from tracediff.store.trace import Trace
from tracediff.tolerance import DEFAULT_PRESET, PRESETS, Tolerance, parse_override, preset

EXIT_OK, EXIT_DRIFT = 0, 1


def register(subparsers: Any) -> None:
    parser = command_parser(
        subparsers,
        "first-drift",
        help="find the first layer where the port drifts from upstream",
        description=(
            "Compare two traces (tracediff HDF5 or FastVideo JSONL, either side) layer by layer in the port's "
            "execution order and report the first record that breaks tolerance. Exit code 0: no drift; "
            "1: drift found; 2: usage or input error."
        ),
        examples=[
            ("tracediff first-drift out/upstream.h5 out/port.h5", "the first drifting layer, default tolerance"),
            ("tracediff first-drift upstream.h5 /tmp/port.jsonl --preset dit-bf16",
             "against a FastVideo JSONL trace, with a bf16 tolerance preset"),
            ("tracediff first-drift up.h5 port.h5 --param-map my_port.convert:param_names_mapping --html r.html",
             "help the aligner with the port's checkpoint mapping; also write an HTML report"),
            ("tracediff first-drift up.h5 'port-rank*.h5' --shard-dim 'attn=1'",
             "per-rank traces of a tensor-parallel port, merged on the fly"),
        ],
    )
    parser.add_argument(
        "upstream",
        help="the reference side's trace (.h5 or FastVideo .jsonl), or a folder/glob of per-rank traces (merged)",
    )
    parser.add_argument(
        "port", help="the port's trace (.h5 or FastVideo .jsonl), or a folder/glob of per-rank traces (merged)"
    )
    parser.add_argument(
        "--shard-dim",
        action="append",
        default=[],
        metavar="REGEX=DIM",
        help="per-rank traces: modules matching REGEX are sharded along DIM (or 'replicated'); "
        "repeatable, first match wins; default: inferred from shapes (see docs/distributed.md)",
    )
    parser.add_argument("--map", metavar="FILE", help="explicit module mapping file (.toml/.json) for the aligner")
    parser.add_argument("--param-map", metavar="FILE", help="the port's param_names_mapping, for the aligner")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        metavar="NAME",
        help=f"tolerance preset: {', '.join(PRESETS)} (default {DEFAULT_PRESET}; see docs/tolerance.md)",
    )
    parser.add_argument("--atol", type=float, metavar="X", help="absolute tolerance (replaces the preset's)")
    parser.add_argument("--rtol", type=float, metavar="Y", help="relative tolerance (replaces the preset's)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="REGEX=key:value,...",
        help="per-module tolerance, e.g. 'final_norm=atol:1e-3,rtol:1e-3' (repeatable; first match wins)",
    )
    parser.add_argument("--step", type=int, metavar="N", help="compare this denoising step only")
    parser.add_argument(
        "--fail-on",
        metavar="KINDS",
        help=f"comma list of finding kinds that fail (default {','.join(sorted(DEFAULT_FAIL_ON))}; "
        f"valid: {','.join(KINDS)})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the report")
    parser.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="JSONL traces: skip lines that are not valid records (their count is reported) instead of failing",
    )
    parser.add_argument("--html", metavar="FILE", help="also write a standalone HTML report with a drift chart")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tolerance = _tolerance(args)
    fail_on = _fail_on(args.fail_on)
    if args.step is not None and args.step < 0:
        raise DiffError(f"--step={args.step} must be a step index >= 0")
    from tracediff.align.aligner import align  # the aligner is heavy; import only when a diff runs
    from tracediff.commands.align import require_aligned
    from tracediff.preflight import check_traces
    from tracediff.render.preflight import preflight_json, render_preflight

    with _load_sides(args) as (upstream, port):
        alignment = align(upstream, port, mapping=args.map, param_map=args.param_map)
        require_aligned(alignment, args.upstream, args.port)
        preflight = check_traces(upstream, port, alignment=alignment, param_map=args.param_map)
        result = diff_traces(upstream, port, alignment, tolerance=tolerance, step=args.step, fail_on=fail_on)
        if args.html:
            try:
                write_html(result, args.html)
            except OSError as exc:
                raise DiffError(f"--html {args.html}: cannot write ({exc.strerror or exc})") from None
        if args.json:
            # one write: json.dump would write its ~450 000 pieces one by one (1-1.5 s at 1 M records)
            sys.stdout.write(json.dumps({**to_json(result), "preflight": preflight_json(preflight, result)}, indent=2))
            sys.stdout.write("\n")
        else:
            console = wide_console()
            render_preflight(preflight, console, diff=result)
            render_terminal(result, console)
            for line in _merge_lines(upstream, "upstream") + _merge_lines(port, "port"):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
            if args.html:
                console.print(f"HTML report: {args.html}", highlight=False, markup=False)
    return EXIT_OK if result else EXIT_DRIFT


@contextlib.contextmanager
def _load_sides(args: argparse.Namespace) -> Any:
    """Open both sides; a folder or glob of per-rank traces is merged, using the other side as reference."""
    with contextlib.ExitStack() as stack:
        sides: dict[str, Trace] = {}
        multi = {name: is_rank_set(getattr(args, name)) for name in ("upstream", "port")}
        for name in sorted(multi, key=lambda n: multi[n]):  # single files first: they guide the merge
            other_name = "port" if name == "upstream" else "upstream"
            other = sides.get(other_name)
            if not multi[name]:
                trace = stack.enter_context(load_trace(getattr(args, name), skip_bad_lines=args.skip_bad_lines))
                skipped = trace.meta.get("skipped_lines", 0)
                if skipped:
                    print(f"tracediff first-drift: note: skipped {skipped} bad line{'s' if skipped != 1 else ''} "
                          f"of {getattr(args, name)}", file=sys.stderr)
                sides[name] = trace
                continue
            sides[name] = _load_ranks(args, name, other)
        yield sides["upstream"], sides["port"]


def _load_ranks(args: argparse.Namespace, name: str, other: Trace | None) -> Trace:
    """Merge one side's per-rank traces; module names unknown to the other side are mapped by the aligner."""
    from tracediff.merge import merge_traces
    from tracediff.store.load import open_traces, rank_trace_paths

    paths = rank_trace_paths(getattr(args, name)) or []
    if len(paths) == 1:
        return load_trace(paths[0])
    traces = open_traces(paths)
    try:
        name_map = None
        if other is not None and not _names_shared(traces[0], other):
            from tracediff.align.aligner import align

            if name == "port":
                name_map = align(other, traces[0], mapping=args.map, param_map=args.param_map).upstream_for
            else:
                name_map = align(traces[0], other, mapping=args.map, param_map=args.param_map).port_for
        return merge_traces(
            traces, reference=other, name_map=name_map, shard_dims=args.shard_dim, path=getattr(args, name)
        )
    finally:
        for trace in traces:
            trace.close()


def _names_shared(ranks: Trace, other: Trace) -> bool:
    """Whether most traced module names of a rank's trace exist on the other side as they are."""
    traced = {ranks.modules.names[i] for i in set(ranks.records.columns["module"].tolist()) if i >= 0}
    return len(traced & set(other.modules.names)) * 2 >= len(traced)


def _merge_lines(trace: Trace, name: str) -> list[str]:
    """One line per merged side: what was merged, and what could not be merged exactly."""
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


def _tolerance(args: argparse.Namespace) -> Tolerance:
    base = preset(args.preset or DEFAULT_PRESET)
    if args.atol is not None or args.rtol is not None:
        values = {"atol": base.atol if args.atol is None else args.atol,
                  "rtol": base.rtol if args.rtol is None else args.rtol}
        if args.preset is None:  # plain --atol/--rtol: stats follow rtol, no abs-mean limit
            base = Tolerance(**values)
        else:
            base = Tolerance(**values, stat_rtol=base.stat_rtol, abs_mean_limit=base.abs_mean_limit,
                             name=f"{base.name} (modified)")
    overrides = [parse_override(text) for text in args.override]
    return base.with_overrides(overrides) if overrides else base


def _fail_on(text: str | None) -> frozenset[str]:
    if text is None:
        return DEFAULT_FAIL_ON
    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(kinds - set(KINDS))
    if unknown or not kinds:
        raise DiffError(f"--fail-on={text!r}: unknown kind {unknown[0] if unknown else '(none)'!r}; "
                        f"valid: {', '.join(KINDS)}")
    return kinds
