"""Bisection as the last stage of ``tracediff run --bisect`` and of the pytest plugin's ``bisect`` mode.

Both already produced a first-drift report; these helpers add the drill-down
after it and never let a bisection failure hide that report.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from tracediff.errors import TracediffError

BISECT_JSON = "bisect.json"


def bisect_pair(pair: Any, out_dir: Path | None = None, *, alignment: Any = None) -> str:
    """Bisect a parity pair (:class:`tracediff.parity.PairSpec`); the report as text. Never raises.

    With ``out_dir``, the JSON result is written to ``out_dir/bisect.json`` too. ``alignment``: the one
    first-drift found from both traces (values and execution order pair modules without weights, which
    the live models' definition order cannot); default: aligned from the live models.
    """
    from tracediff.bisect.drill import bisect_models
    from tracediff.render.bisect import dumps, text

    try:
        result = bisect_models(
            pair.upstream, pair.port, pair.inputs, mapping=pair.mapping, param_map=pair.param_map,
            tolerance=pair.tolerance, upstream_call=pair.upstream_call, port_call=pair.port_call,
            upstream_context=pair.upstream_context, port_context=pair.port_context, alignment=alignment,
        )
    except Exception as exc:  # the plugin's diagnosis must survive a bisection that cannot run
        return f"tracediff bisect: could not bisect this pair: {type(exc).__name__}: {exc}"
    if out_dir is not None:
        (out_dir / BISECT_JSON).write_text(dumps(result))
    return "tracediff bisect (local error, teacher forcing):\n" + text(result)


def bisect_after_run(spec: Any, out_dir: Path, *, as_json: bool, stream: TextIO) -> int:
    """The end of ``tracediff run --bisect``: bisect the same spec, write ``bisect.json``, print.

    Returns:
        0 when nothing adds error, 1 when a culprit or differing outputs were found, 2 when
        the bisection itself could not run (the first-drift report above stands).
    """
    from tracediff.commands.bisect import print_result
    from tracediff.pipeline.bisect import bisect_spec
    from tracediff.render.bisect import dumps

    try:
        result = bisect_spec(spec)
    except TracediffError as exc:
        print(f"tracediff run --bisect: error: {exc}", file=sys.stderr)
        return 2
    path = out_dir / BISECT_JSON
    path.write_text(dumps(result))
    if not as_json:
        stream.write("\n")
        print_result(result, as_json=False, stream=stream)
        stream.write(f"bisection: {path}\n")
    return 0 if result else 1
