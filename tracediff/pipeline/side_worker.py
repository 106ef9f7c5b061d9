"""One side of a run in its own process.

``python -m tracediff.pipeline.side_worker SPEC.json SIDE OUT RESULT.json [--progress-fd FD]``.

Used by ``tracediff run --isolate-sides``. Expected failures are printed as
one ``tracediff-worker:`` line so the parent can pass the message on unchanged.
With ``--progress-fd``, the side's phases, steps and record counts go to that
pipe as JSON lines (:class:`tracediff.render.progress.PipeProgress`), so the parent's
display moves while this process builds and traces.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from tracediff.errors import TracediffError, debug_enabled
from tracediff.render.progress import PipeProgress


def main(argv: list[str]) -> int:
    """Trace one side of the spec; 0 with the result file written, 2 on an expected failure."""
    progress = None
    if len(argv) == 6 and argv[4] == "--progress-fd":
        progress = PipeProgress(int(argv[5]))
        argv = argv[:4]
    spec_file, side, out_dir, result_file = argv
    from tracediff.pipeline.runner import spec_from_json, trace_side  # imports torch: after the pipe is open

    try:
        spec = spec_from_json(Path(spec_file).read_text())
        result = trace_side(spec, side, Path(out_dir), progress=progress)
    except TracediffError as exc:
        if debug_enabled():  # the parent passes this process's stderr on under --debug
            traceback.print_exc()
        print(f"tracediff-worker: {exc}", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.finish()
    Path(result_file).write_text(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
