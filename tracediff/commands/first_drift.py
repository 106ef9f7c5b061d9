"""``tracediff first-drift UPSTREAM PORT``: the first layer where the port computes something else.

Exit codes: 0 nothing drifts, 1 a drift was found, 2 usage or input error
(missing file, not a trace, nothing aligned).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rich.console import Console

from tracediff.diff import DEFAULT_FAIL_ON, KINDS, diff_traces
from tracediff.errors import DiffError
from tracediff.report import render_terminal, to_json, write_html
from tracediff.store.load import load_trace
from tracediff.tolerance import DEFAULT_PRESET, PRESETS, Tolerance, parse_override, preset

EXIT_OK, EXIT_DRIFT = 0, 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "first-drift",
        help="find the first layer where the port drifts from upstream",
        description=(
            "Compare two traces (tracediff HDF5 or FastVideo JSONL, either side) layer by layer in the port's "
            "execution order and report the first record that breaks tolerance. Exit code 0: no drift; "
            "1: drift found; 2: usage or input error."
        ),
    )
    parser.add_argument("upstream", help="the reference side's trace (.h5 or FastVideo .jsonl)")
    parser.add_argument("port", help="the port's trace (.h5 or FastVideo .jsonl)")
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
    parser.add_argument("--html", metavar="FILE", help="also write a standalone HTML report with a drift chart")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tolerance = _tolerance(args)
    fail_on = _fail_on(args.fail_on)
    if args.step is not None and args.step < 0:
        raise DiffError(f"--step={args.step} must be a step index >= 0")
    from tracediff.align import align  # the aligner is heavy; import only when a diff runs

    with load_trace(args.upstream) as upstream, load_trace(args.port) as port:
        alignment = align(upstream, port, mapping=args.map, param_map=args.param_map)
        result = diff_traces(upstream, port, alignment, tolerance=tolerance, step=args.step, fail_on=fail_on)
        if args.html:
            try:
                write_html(result, args.html)
            except OSError as exc:
                raise DiffError(f"--html {args.html}: cannot write ({exc.strerror or exc})") from None
        if args.json:
            json.dump(to_json(result), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            console = _console()
            render_terminal(result, console)
            if args.html:
                console.print(f"HTML report: {args.html}", highlight=False, markup=False)
    return EXIT_OK if result else EXIT_DRIFT


def _console() -> Console:
    """A console; piped output (CI logs) gets a wide line so module names stay whole."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


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
