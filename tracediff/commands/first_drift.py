"""``tracediff first-drift UPSTREAM PORT``: the first layer where the port computes something else.

Exit codes: 0 nothing drifts, 1 a drift was found, 2 usage or input error
(missing file, not a trace, nothing aligned).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tracediff.commands import command_parser
from tracediff.diff import DEFAULT_FAIL_ON, KINDS
from tracediff.errors import DiffError
from tracediff.pipeline.analyse import analyse_traces, dumps
from tracediff.pipeline.sides import merge_lines, open_sides
from tracediff.render.html import write_html
from tracediff.render.report import wide_console
from tracediff.tolerance import DEFAULT_PRESET, PRESETS, Tolerance, ToleranceChoiceError, parse_override, resolve

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
    parser.add_argument("--atol", type=float, metavar="X",
                        help="absolute tolerance, with --rtol, instead of a preset (stats then follow --rtol)")
    parser.add_argument("--rtol", type=float, metavar="Y", help="relative tolerance, with --atol, instead of a preset")
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
    with open_sides(args.upstream, args.port, mapping=args.map, param_map=args.param_map, shard_dims=args.shard_dim,
                    skip_bad_lines=args.skip_bad_lines, note=_note) as (upstream, port):
        analysis = analyse_traces(upstream, port, mapping=args.map, param_map=args.param_map, tolerance=tolerance,
                                  step=args.step, fail_on=fail_on, names=(args.upstream, args.port),
                                  fp32_check=False)
        if args.html:
            try:
                write_html(analysis.result, args.html)
            except OSError as exc:
                raise DiffError(f"--html {args.html}: cannot write ({exc.strerror or exc})") from None
        if args.json:
            sys.stdout.write(dumps(analysis.summary()))  # one write: json.dump would write a large report piecemeal
        else:
            console = wide_console()
            analysis.render(console)
            for line in merge_lines(upstream, "upstream") + merge_lines(port, "port"):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
            if args.html:
                console.print(f"HTML report: {args.html}", highlight=False, markup=False)
    return EXIT_OK if analysis else EXIT_DRIFT


def _note(line: str) -> None:
    print(f"tracediff first-drift: note: {line}", file=sys.stderr)


def _tolerance(args: argparse.Namespace) -> Tolerance:
    """The tolerance by the one rule set (:func:`tracediff.tolerance.resolve`), overrides on top."""
    overrides = [parse_override(text) for text in args.override]
    try:
        return resolve(preset_name=args.preset, atol=args.atol, rtol=args.rtol, overrides=overrides)
    except ToleranceChoiceError as exc:
        raise ToleranceChoiceError(f"--preset/--atol/--rtol: {exc}") from None


def _fail_on(text: str | None) -> frozenset[str]:
    if text is None:
        return DEFAULT_FAIL_ON
    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(kinds - set(KINDS))
    if unknown or not kinds:
        raise DiffError(f"--fail-on={text!r}: unknown kind {unknown[0] if unknown else '(none)'!r}; "
                        f"valid: {', '.join(KINDS)}")
    return kinds
