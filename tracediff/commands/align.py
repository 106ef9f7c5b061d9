"""``tracediff align UPSTREAM.h5 PORT.h5``: which upstream module is which port module."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracediff.align.aligner import align, alignment_to_dict, coverage, write_mapping
from tracediff.align.alignment import Alignment
from tracediff.commands import add_trace_pair, command_parser
from tracediff.pipeline.sides import require_aligned
from tracediff.store.reader import open_trace

_SOURCE_STYLE = {"root": "green", "map": "green", "param_map": "green", "fingerprint": "cyan", "structure": "yellow"}


def register(subparsers: Any) -> None:
    parser = command_parser(
        subparsers,
        "align",
        help="pair upstream modules with port modules (mapping, parameter map, weights, structure)",
        description=(
            "Pair every upstream module with the port module that computes the same thing, from the two "
            "trace files alone (weight fingerprints and execution order), helped by an explicit mapping "
            "file or the port's checkpoint param_names_mapping."
        ),
        examples=[
            ("tracediff align out/upstream.h5 out/port.h5", "which upstream module is which port module, and why"),
            ("tracediff align up.h5 port.h5 --write map.toml",
             "save the pairing as a mapping file to correct by hand, then pass it back with --map map.toml"),
            ("tracediff align up.h5 port.h5 --param-map tracediff.demo.convert:PARAM_NAMES_MAPPING --json",
             "use the port's checkpoint mapping; print JSON"),
        ],
    )
    add_trace_pair(parser)
    parser.add_argument(
        "--map", metavar="FILE", help="explicit mapping file (.toml or .json): pairs, rules, ignore, groups"
    )
    parser.add_argument(
        "--param-map",
        metavar="FILE|MODULE:ATTR",
        help="the port's param_names_mapping: .json/.toml/.py file, or e.g. tracediff.demo.convert:PARAM_NAMES_MAPPING",
    )
    parser.add_argument(
        "--write", metavar="FILE", help="save the result as a mapping file to edit and pass back with --map"
    )
    parser.add_argument("--json", action="store_true", help="print the alignment as JSON instead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_trace(args.upstream) as upstream, open_trace(args.port) as port:
        alignment = align(upstream, port, mapping=args.map, param_map=args.param_map)
        figures = coverage(alignment, upstream, port)
    require_aligned(alignment, args.upstream, args.port)
    if args.write:
        write_mapping(alignment, args.write)
    if args.json:
        print(json.dumps(alignment_to_dict(alignment, figures), indent=2))
        return 0
    render(alignment, figures, written=args.write)
    return 0


def render(alignment: Alignment, figures: dict[str, dict[str, int]], *, written: str | None = None) -> None:
    """Pairs, groups, coverage and leftovers as rich tables."""
    console = Console()
    table = Table(title=f"{len(alignment.pairs)} pairs", title_justify="left")
    # Module names are the point of the table: when the terminal allows, they get
    # their full width and only the note wraps.
    widest_up = max((len(_shown(p.upstream)) for p in alignment.pairs), default=8)
    widest_port = max((len(_shown(p.port)) for p in alignment.pairs), default=8)
    room = console.width - widest_up - widest_port - len("fingerprint") - len("conf.") - 16  # 16: borders, padding
    fits = room >= 20
    table.add_column("upstream", overflow="fold", min_width=widest_up if fits else None)
    table.add_column("port", overflow="fold", min_width=widest_port if fits else None)
    table.add_column("source", no_wrap=True)
    table.add_column("conf.", justify="right", no_wrap=True)
    table.add_column("note", overflow="fold", max_width=room if fits else None)
    for pair in alignment.pairs:
        style = _SOURCE_STYLE.get(pair.source, "")
        table.add_row(
            _shown(pair.upstream),
            _shown(pair.port),
            f"[{style}]{pair.source}[/]" if style else pair.source,
            f"{pair.confidence:.2f}",
            pair.note,
        )
    console.print(table)
    if alignment.groups:
        groups = Table(
            title=f"{len(alignment.groups)} groups (many-to-one, not compared one to one)", title_justify="left"
        )
        for column in ("upstream", "port", "source", "note"):
            groups.add_column(column, overflow="fold", no_wrap=column == "source")
        for group in alignment.groups:
            groups.add_row(
                "\n".join(map(_shown, group.upstream)), "\n".join(map(_shown, group.port)), group.source, group.note
            )
        console.print(groups)
    for side in ("upstream", "port"):
        f = figures[side]
        ignored = f", {f['ignored']} ignored" if f["ignored"] else ""
        console.print(
            f"[bold]{side}[/]: {f['aligned']}/{f['total']} modules aligned "
            f"({_percent(f['aligned'], f['total'])}), {f['params_aligned']}/{f['params_total']} of those "
            f"with parameters ({_percent(f['params_aligned'], f['params_total'])}){ignored}"
        )
    for side, names in (("upstream", alignment.unmatched_upstream), ("port", alignment.unmatched_port)):
        listed = ", ".join(map(_shown, names)) if names else "-"
        console.print(f"unmatched {side} ({len(names)}): {listed}", highlight=False)
    for note in alignment.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    for suspect in alignment.suspects:
        console.print(Text.assemble(
            ("alignment suspect:", "yellow"),
            f" upstream {_shown(suspect.upstream)} / port {_shown(suspect.port)} left unpaired: {suspect.reason}; "
            f"if they are the same module, map them: {suspect.hint()}",
        ), highlight=False)
    if written:
        console.print(f"wrote {written} (edit it, then pass it back with --map)", highlight=False)


def _shown(name: str) -> str:
    return name or "<model>"


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "n/a"
