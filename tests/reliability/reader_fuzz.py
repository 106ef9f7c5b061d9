"""Mutated trace files for the reader, checked in a subprocess (test_fuzz_reader.py).

``python reader_fuzz.py REPO GOOD.h5 WORK_DIR SEED COUNT START``: makes COUNT
mutations of GOOD.h5 (truncations, bit flips, zeroed or random blocks, seeded
by SEED; cases START.. only, so a run can resume after a hang), opens each
with ``open_trace`` and classifies it, one JSON line per case:

* ``error``: ``TraceFormatError``, the clean refusal;
* ``same``: the trace opened and every record, sample and full tensor equals
  the first records of the good file (a correct result, perhaps a prefix);
* ``wrong``: it opened but something differs or is inconsistent (the reader
  returned data it should have refused);
* ``crash``: any other exception, with its type and message.

A case that makes libhdf5 itself loop or crash cannot be caught in Python:
before each case a watchdog (``faulthandler``, a C thread that needs no GIL)
is armed that ends the process after a timeout; a ``start`` line without its
result line then names the case, so the test can report it and resume behind it.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import sys
import warnings
from pathlib import Path

sys.path.insert(0, sys.argv[1])

import numpy as np  # noqa: E402

from tracediff import TraceFormatError, open_trace  # noqa: E402

CASE_SECONDS = 20


def mutate(good: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(good)
    kind = rng.choice(["truncate", "flip", "flip", "zero-block", "random-block"])
    if kind == "truncate":
        return kind, bytes(data[: rng.randrange(1, len(data))])
    if kind == "flip":
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
        return kind, bytes(data)
    at, size = rng.randrange(len(data)), rng.choice([1, 8, 64, 512, 4096])
    block = bytes(size) if kind == "zero-block" else rng.randbytes(size)
    data[at : at + size] = block[: len(data) - at]
    return kind, bytes(data)


def snapshot(trace) -> dict:  # noqa: ANN001
    n = len(trace.records)
    return {
        "columns": {name: column[:n] for name, column in trace.records.columns.items()},
        "shape": trace.records.shape[:n],
        "labels": [trace.records.label_of(i) for i in range(n)],
        "dtypes": [trace.records.dtype_of(i) for i in range(n)],
        "modules": trace.record_modules()[:n].tolist(),
        "samples": [trace.sample(i) for i in range(n)],
        "full": [trace.full(i) for i in range(n)],
        "names": list(trace.modules.names),
    }


def equal_prefix(got: dict, ref: dict) -> str | None:
    n = len(got["labels"])
    if n > len(ref["labels"]):
        return f"{n} records, the good file has {len(ref['labels'])}"
    if got["names"] != ref["names"]:
        return "module table differs"
    for name, column in got["columns"].items():
        if not np.array_equal(column, ref["columns"][name][:n], equal_nan=True):
            return f"column {name} differs"
    if not np.array_equal(got["shape"], ref["shape"][:n]):
        return "shapes differ"
    for key in ("labels", "dtypes", "modules"):
        if got[key] != ref[key][:n]:
            return f"{key} differ"
    for key in ("samples", "full"):
        for i, (a, b) in enumerate(zip(got[key], ref[key][:n], strict=True)):
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b, equal_nan=True)):
                return f"{key}[{i}] differs"
    return None


def classify(path: str, ref: dict) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace = open_trace(path)
    except TraceFormatError as exc:
        return {"result": "error", "message": str(exc)[:300]}
    except Exception as exc:  # the reader let something other than its own error escape
        return {"result": "crash", "message": f"{type(exc).__name__}: {str(exc)[:300]}"}
    try:
        problem = equal_prefix(snapshot(trace), ref)
    except TraceFormatError as exc:  # refusing while reading lazily is a clean refusal too
        return {"result": "error", "message": str(exc)[:300]}
    except Exception as exc:
        return {"result": "crash", "message": f"reading the opened trace: {type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        trace.close()
    if problem is None:
        return {"result": "same", "records": len(trace.records)}
    return {"result": "wrong", "message": problem}


def main() -> None:
    good_path, work, seed, count, start = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    good = Path(good_path).read_bytes()
    with open_trace(good_path) as trace:
        ref = snapshot(trace)
    rng = random.Random(seed)
    quiet = open(os.devnull, "w")  # noqa: SIM115 - the watchdog writes here until the process ends
    for case in range(count):
        kind, data = mutate(good, rng)  # drawn for every case, so resuming keeps the same mutations
        if case < start:
            continue
        path = os.path.join(work, f"case-{case}.h5")
        with open(path, "wb") as handle:
            handle.write(data)
        print(json.dumps({"start": case, "kind": kind, "path": path}), flush=True)
        faulthandler.dump_traceback_later(CASE_SECONDS, exit=True, file=quiet)
        outcome = classify(path, ref)
        faulthandler.cancel_dump_traceback_later()
        print(json.dumps({"case": case, "kind": kind, "path": path, **outcome}), flush=True)
        if outcome["result"] in ("error", "same"):
            os.unlink(path)


if __name__ == "__main__":
    main()
