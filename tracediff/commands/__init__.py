"""One module per CLI subcommand; see :mod:`tracediff.cli`.

:func:`command_parser` gives every subcommand the same help layout: a wrapped
description, an ``examples:`` section kept as written, and ``--debug``.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from collections.abc import Sequence
from typing import Any

#: Help text is read in a terminal: the RST/Markdown double backticks of docstrings are dropped.
_QUOTES = re.compile(r"``(.+?)``")


def plain(text: str) -> str:
    """Docstring text for a terminal: ``code`` becomes code."""
    return _QUOTES.sub(r"\1", text)


def _wrapped(text: str, width: int = 100) -> str:
    """Wrap each paragraph of prose; indented lines (tables, commands) stay as written."""
    paragraphs = []
    for block in plain(text).strip().split("\n\n"):
        lines = block.splitlines()
        if any(line.startswith(" ") for line in lines):
            paragraphs.append(block)
        else:
            paragraphs.append(textwrap.fill(" ".join(line.strip() for line in lines), width))
    return "\n\n".join(paragraphs)


def examples_epilog(examples: Sequence[tuple[str, str]]) -> str:
    """An ``examples:`` section: each command line with what it does underneath."""
    lines = ["examples:"]
    for command, what in examples:
        lines.append(f"  {command}")
        lines.extend(f"      {line}" for line in textwrap.wrap(what, 90, break_on_hyphens=False))
    return "\n".join(lines)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the command, too (``tracediff run --debug``); the global one works the same."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of any error (or set TRACEDIFF_DEBUG=1)")


def add_trace_pair(parser: argparse.ArgumentParser) -> None:
    """The two trace files of a command that reads a pair (``align``, ``weights``)."""
    parser.add_argument("upstream", help="trace (.h5) of the upstream reference")
    parser.add_argument("port", help="trace (.h5) of the port")


def command_parser(
    subparsers: Any, name: str, *, help: str, description: str, examples: Sequence[tuple[str, str]]
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` with a wrapped description, an examples section and ``--debug``."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=_wrapped(description),
        epilog=examples_epilog(examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_debug_flag(parser)
    return parser
