"""``tracediff weights UPSTREAM PORT``: were the weights converted right, and did both sides get the same inputs?

Works from the two trace files alone: the module table of each trace keeps a
fingerprint of every parameter and buffer (moments and 32 sampled values), and
the root module's records keep the inputs of every step. Exit codes: 0 clean,
1 findings, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.text import Text

from tracediff.align.aligner import align
from tracediff.align.alignment import Alignment
from tracediff.commands import add_trace_pair, command_parser
from tracediff.errors import AlignmentError, TraceFormatError
from tracediff.merge import load_merged
from tracediff.pipeline.sides import require_aligned
from tracediff.preflight import InputCheck, ParamCheck, PreflightResult, check_traces, has_module_table
from tracediff.render.preflight import counts_line, findings_table, inputs_line, notes, preflight_json
from tracediff.render.report import wide_console

EXIT_OK, EXIT_FINDINGS = 0, 1


def register(subparsers: Any) -> None:
    parser = command_parser(
        subparsers,
        "weights",
        help="check the port's weights and inputs against upstream's before blaming a layer",
        description=(
            "Compare every aligned parameter and buffer of two traces (identical, within tolerance, transposed, "
            "scaled, permuted, different, shape-mismatched, or on one side only) and the inputs each model "
            "received, from the traces' fingerprints alone. Exit code 0: clean; 1: findings; 2: usage or "
            "input error."
        ),
        examples=[
            ("tracediff weights out/upstream.h5 out/port.h5",
             "was every weight converted right, and did both models get the same inputs"),
            ("tracediff weights up.h5 port.h5 --param-map my_port.convert:param_names_mapping --all",
             "pair parameters by the port's checkpoint mapping and list identical ones too"),
        ],
    )
    add_trace_pair(parser)
    parser.add_argument("--map", metavar="FILE", help="explicit module mapping file (.toml/.json) for the aligner")
    parser.add_argument(
        "--param-map",
        metavar="FILE|MODULE:ATTR",
        help="the port's param_names_mapping (.json/.toml/.py file or module:ATTR): parameters are then paired "
        "by their full names, fused q/k/v pieces against their slices",
    )
    parser.add_argument("--rtol", type=float, metavar="X",
                        help="relative tolerance of 'equal within tolerance' (default: from the two dtypes)")
    parser.add_argument("--all", action="store_true", help="list every parameter, identical ones too")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with load_merged(args.upstream) as upstream, load_merged(args.port) as port:
        for path, trace in ((args.upstream, upstream), (args.port, port)):
            if not has_module_table(trace):
                raise TraceFormatError(f"{path}: holds no module table (a FastVideo JSONL import?), so its "
                                       "weights cannot be checked; trace the model with tracediff")
        alignment: Alignment | None = None
        try:
            aligned = align(upstream, port, mapping=args.map, param_map=args.param_map)
        except AlignmentError:  # a parameter map the aligner refuses: check_traces aligns without it and says why
            pass
        else:
            require_aligned(aligned, args.upstream, args.port)
            alignment = aligned
        result = check_traces(
            upstream, port, mapping=args.map, param_map=args.param_map, alignment=alignment, rtol=args.rtol
        )
    if args.json:
        json.dump(preflight_json(result), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(result, show_all=args.all)
    return EXIT_OK if result else EXIT_FINDINGS


def render(result: PreflightResult, *, show_all: bool = False) -> None:
    """Findings table (every parameter with ``show_all``), then the counts and inputs lines."""
    console = wide_console()
    rows: list[ParamCheck | InputCheck] = [*result.input_findings]
    rows += result.params if show_all else [p for p in result.params if p.finding]
    if rows:
        console.print(findings_table(rows, width=console.width))
    for note in notes(result):
        console.print(Text(f"note: {note}", style="dim"), soft_wrap=True)
    style = "green" if result else "bold red"
    console.print(Text(counts_line(result), style=style), soft_wrap=True)
    console.print(Text(inputs_line(result), style="green" if not result.input_findings else "bold red"),
                  soft_wrap=True)
