"""``tracediff`` / ``python -m tracediff``: parse arguments, dispatch, map errors to exit codes.

Each subcommand lives in ``tracediff/commands/<name>.py`` and exposes
``register(subparsers)`` (adding its parser, with ``func`` set to a callable
taking the parsed namespace and returning an exit code). This module only
wires them up and turns expected failures into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tracediff.errors import TracediffError

#: Subcommand modules under ``tracediff.commands``, in ``--help`` order.
COMMANDS = ("run", "first_drift", "weights", "merge", "align", "show", "bisect")

EXIT_OK, EXIT_DRIFT, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that keeps usage errors to exit code 2 with a one-line hint."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from tracediff import __version__

    parser = _Parser(
        prog="tracediff",
        description="Find the first layer where a model port computes something different from upstream.",
    )
    parser.add_argument("--version", action="version", version=f"tracediff {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"tracediff.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tracediff`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args_list:
        parser.print_help()
        return EXIT_USAGE
    args = parser.parse_args(args_list)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except TracediffError as exc:
        print(f"tracediff {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a user's file that cannot be read or written (permissions, a full disk, a damaged file)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"tracediff {args.command}: error: {where}{_one_line(exc.strerror or str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tracediff {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    """An error message as the single line the CLI promises (library messages sometimes span several)."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
