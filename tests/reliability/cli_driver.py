"""Run many ``tracediff`` command lines in one process, exactly as ``python -m tracediff`` would.

``python cli_driver.py REPO CASES.json RESULTS.json``: CASES is ``{id: argv}``.
Each argv goes to :func:`tracediff.cli.main` (what ``python -m tracediff``
runs) with file descriptors 1 and 2 redirected to files, so output written by
C libraries (HDF5's error stack) is caught too. An exception escaping ``main``
is what a user would see as a traceback; it is recorded as such. Starting
Python and torch once instead of once per case is what makes a matrix of a
hundred bad inputs affordable.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

sys.path.insert(0, sys.argv[1])

from tracediff.cli import main  # noqa: E402


def run_case(argv: list[str]) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse, or a command that exits
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = "traceback"
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return {"code": code, "stdout": out.read().decode("utf-8", "replace"),
                "stderr": err.read().decode("utf-8", "replace")}


if __name__ == "__main__":
    with open(sys.argv[2]) as handle:
        cases = json.load(handle)
    results = {case_id: run_case(argv) for case_id, argv in cases.items()}
    with open(sys.argv[3], "w") as handle:
        json.dump(results, handle)
