"""``tracediff`` / ``python -m tracediff``: parse arguments, dispatch, map errors to exit codes.

Each subcommand lives in ``tracediff/commands/<name>.py`` and exposes
``register(subparsers)`` (adding its parser, with ``func`` set to a callable
taking the parsed namespace and returning an exit code). This module only
wires them up and turns every failure into one line and exit code 2: exit code 1
means "a drift was found" and nothing else. ``--debug`` (or ``TRACEDIFF_DEBUG=1``)
prints the full traceback as well.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import TextIO

from tracediff.errors import ENV_DEBUG, TracediffError, debug_enabled, describe_user_error
from tracediff.version import __version__

#: Subcommand modules under ``tracediff.commands``, in ``--help`` order.
COMMANDS = ("run", "first_drift", "weights", "merge", "align", "show", "bisect")

EXIT_OK, EXIT_DRIFT, EXIT_USAGE = 0, 1, 2

EPILOG = """\
examples:
  tracediff run                                   the built-in demo: a port with one planted bug
  tracediff run parity.toml                       your own pair, from a run spec (docs/run-spec.md)
  tracediff first-drift upstream.h5 port.h5       compare two traces you already have
  tracediff run --help                            every flag of a command, grouped by mode

Exit codes: 0 no drift, 1 drift found, 2 usage or input error. --debug (or TRACEDIFF_DEBUG=1) shows the full
traceback of any error."""


class _Parser(argparse.ArgumentParser):
    """argparse that keeps usage errors to exit code 2 with a one-line hint."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with ``only`` that one (``first-drift``).

    A run imports only its own command's module: the others pull in numpy, h5py and the analysis
    (``tracediff align`` on 5 000 modules spent a fifth of its time importing what it never used).
    """
    parser = _Parser(
        prog="tracediff",
        description="Find the first layer where a model port computes something different from upstream.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tracediff {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of any error (or set {ENV_DEBUG}=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        if only is not None and name != only.replace("-", "_"):
            continue
        module = importlib.import_module(f"tracediff.commands.{name}")
        module.register(subparsers)
    return parser


def command_names() -> list[str]:
    """The subcommands as typed on the command line (``first-drift``)."""
    return [name.replace("_", "-") for name in COMMANDS]


def _unknown_command(args_list: Sequence[str]) -> str | None:
    """A one-line error with a suggestion when the first word is not a command (``first-drif``)."""
    word = next((arg for arg in args_list if arg != "--debug"), None)
    if word is None or word.startswith("-"):
        return None  # --help, --version, or an unknown flag: argparse answers
    names = command_names()
    if word in names:
        return None
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    suggestion = f"; did you mean {close[0]}?" if close else ""
    return (f"tracediff: error: unknown command {word!r}{suggestion} "
            f"(commands: {', '.join(names)}; see 'tracediff --help')")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tracediff`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    unknown = _unknown_command(args_list)
    if unknown is not None:
        print(unknown, file=sys.stderr)
        return EXIT_USAGE
    words = [arg for arg in args_list if arg != "--debug"]
    parser = build_parser(only=words[0] if words and words[0] in command_names() else None)
    if not words:
        parser.print_help()
        return EXIT_USAGE
    args = parser.parse_args(args_list)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    before = os.environ.get(ENV_DEBUG)
    if getattr(args, "debug", False):
        os.environ[ENV_DEBUG] = "1"  # child processes (script mode, --isolate-sides) inherit it
    try:
        return _dispatch(args)
    finally:
        if before is None:
            os.environ.pop(ENV_DEBUG, None)  # main() called in-process (tests, drivers) leaves no trace
        else:
            os.environ[ENV_DEBUG] = before


def _dispatch(args: argparse.Namespace) -> int:
    """Run the subcommand; every failure becomes one line on stderr and exit code 2."""
    debug = debug_enabled()
    prefix = f"tracediff {args.command}: error:"
    try:
        with warnings.catch_warnings():
            if not debug:  # --debug keeps Python's own format, with the file and line that warned
                warnings.showwarning = _one_line_warning
            return int(args.func(args))
    except TracediffError as exc:
        _traceback(debug)
        print(f"{prefix} {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a user's file that cannot be read or written (permissions, a full disk, a damaged file)
        _traceback(debug)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prefix} {where}{_one_line(exc.strerror or str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tracediff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # unexpected: still one line and exit 2, never exit 1 (which means "drift found")
        _traceback(debug)
        hint = "" if debug else f"; run again with --debug (or {ENV_DEBUG}=1) for the full traceback"
        print(f"{prefix} unexpected {_one_line(describe_user_error(exc))}{hint}", file=sys.stderr)
        return EXIT_USAGE


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: TextIO | None = None, line: str | None = None) -> None:
    """A warning as one line (``tracediff: warning: …``), not Python's two (the file and the code that warned)."""
    text = _one_line(str(message)).removeprefix("tracediff: ")
    kind = "" if category in (UserWarning, RuntimeWarning) else f"{category.__name__}: "
    print(f"tracediff: warning: {kind}{text}", file=file or sys.stderr)


def _traceback(debug: bool) -> None:
    """With ``--debug``: the whole traceback (with its causes) before the one-line message."""
    if debug:
        traceback.print_exc()


def _one_line(text: str) -> str:
    """An error message as the single line the CLI promises (library messages sometimes span several)."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
