"""``tracediff bisect``: the module, and the operator, where the port first adds error.

Two forms:
  ``tracediff bisect SPEC.toml [flags]``   a run spec (as for ``tracediff run``); every spec field is also a flag
  ``tracediff bisect --demo BUG``          the built-in demo with one planted bug

Both models are loaded at once. Each aligned module is fed the upstream's own
inputs (teacher forcing) so its error is purely its own; the drill starts at the
top-level blocks and descends into the first module that adds error, down to a
leaf module or to the operator inside a module whose children are all clean.

Exit codes: 0 nothing adds error, 1 a culprit (or differing outputs) found, 2 usage or input error.
"""

from __future__ import annotations

import argparse
from typing import Any

from tracediff.commands import command_parser
from tracediff.commands.run import DEMO_CHOICES, add_spec_flags, spec_from_args
from tracediff.errors import SpecError


def register(subparsers: Any) -> None:
    parser = command_parser(
        subparsers,
        "bisect",
        help="find the module and operator where the port first adds error (teacher forcing + drill-down)",
        description=__doc__.split("\n", 1)[1] if __doc__ else "",
        examples=[
            ("tracediff bisect --demo", "the demo's planted bug: the module and the operator, with its source line"),
            ("tracediff bisect parity.toml", "your own pair, from the run spec you gave tracediff run"),
            ("tracediff bisect parity.toml --step 2 --noise-floor",
             "bisect step 2; judge each module's error against its own bf16 noise floor"),
        ],
    )
    parser.add_argument("target", nargs="*", metavar="SPEC", help="run spec (TOML); see docs/run-spec.md")
    parser.add_argument("--demo", nargs="?", const="gelu_tanh", choices=DEMO_CHOICES, metavar="BUG",
                        help=f"bisect the built-in demo with planted bug BUG ({', '.join(DEMO_CHOICES[1:])}; "
                             "default gelu_tanh) or 'clean'")
    parser.add_argument("--step", type=int, metavar="N",
                        help="bisect this step only (default: the first step whose top level drifts)")
    parser.add_argument("--noise-floor", action="store_true",
                        help="calibrate each module's noise floor (upstream against a higher-precision copy of "
                             "itself) and judge local errors as multiples of it")
    parser.add_argument("--noise-factor", type=float, metavar="X",
                        help="with --noise-floor: a module drifts above X times its floor (default 4)")
    parser.add_argument("--max-depth", type=int, metavar="N", help="stop after N levels below the top")
    parser.add_argument("--low-memory", action="store_true",
                        help="keep the upstream outputs used for teacher forcing in CPU memory, not on the GPU: "
                             "for a pair that barely fits (same passes and result, slower by the copies)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the terminal view")
    add_spec_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: torch stays off --help and the usage errors of other commands
    from tracediff.bisect.noise import DEFAULT_NOISE_FACTOR
    from tracediff.pipeline.bisect import bisect_spec, print_bisection

    if len(args.target) > 1:
        raise SpecError(f"expected one run spec, got {len(args.target)}: {' '.join(args.target)}")
    if args.noise_factor is not None and (args.noise_factor <= 0 or not args.noise_floor):
        raise SpecError("--noise-factor needs --noise-floor and a value > 0")
    if args.max_depth is not None and args.max_depth < 0:
        raise SpecError(f"--max-depth {args.max_depth} must be >= 0")
    spec = spec_from_args(args)
    result = bisect_spec(spec, step=args.step, noise_floor=args.noise_floor,
                         noise_factor=args.noise_factor or DEFAULT_NOISE_FACTOR, max_depth=args.max_depth,
                         low_memory=args.low_memory)
    print_bisection(result, as_json=args.json)
    return 0 if result else 1

