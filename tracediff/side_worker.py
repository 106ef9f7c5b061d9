"""``python -m tracediff.side_worker SPEC.json SIDE OUT RESULT.json``: one side, one process.

Used by ``tracediff run --isolate-sides``. Expected failures are printed as
one ``tracediff-worker:`` line so the parent can pass the message on unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tracediff.errors import TracediffError
from tracediff.runner import spec_from_json, trace_side


def main(argv: list[str]) -> int:
    spec_file, side, out_dir, result_file = argv
    try:
        spec = spec_from_json(Path(spec_file).read_text())
        result = trace_side(spec, side, Path(out_dir))
    except TracediffError as exc:
        print(f"tracediff-worker: {exc}", file=sys.stderr)
        return 2
    Path(result_file).write_text(json.dumps({
        "trace": str(result.trace), "seconds": result.seconds, "records": result.records,
        "failures": result.failures,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
