"""Fuzz the reader with mutated trace files: a clean error or a correct result, never a crash.

A real trace is truncated at random offsets, has bits flipped, and blocks
zeroed or overwritten (seeded; ``TRACEDIFF_FUZZ_SEED`` / ``TRACEDIFF_FUZZ_CASES``
for longer runs). Each case runs in reader_fuzz.py, in a subprocess with a
watchdog, because a damaged file can make libhdf5 itself spin, which no
Python code can interrupt.

What the format can promise, and what is asserted:

* any mutation: ``open_trace`` raises ``TraceFormatError`` or returns a trace
  whose every record, sample and full tensor can be read (no other exception);
* truncation (the common damage: a copy cut short, a disk that filled up):
  a clean error or exactly the first records of the good file;
* bit flips inside stored numbers cannot be told from real values without
  checksums (format v1 has none): such cases are counted and printed, not failed;
* a file that makes libhdf5 loop is reported with its case number (a libhdf5
  limitation, docs/reliability.md), and the run resumes behind it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import pytest
import torch

from tests.conftest import TinyNet
from tracediff import TraceConfig, TraceFormatError, attach, open_trace, trace_step

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("reader_fuzz.py")
SEED = int(os.environ.get("TRACEDIFF_FUZZ_SEED", "20261126"))
CASES = int(os.environ.get("TRACEDIFF_FUZZ_CASES", "120"))


def _good_trace(path: Path) -> Path:
    torch.manual_seed(0)
    model = TinyNet()
    with attach(model, config=TraceConfig(stats="abs_mean,sum,min,max,sample,full", sample_size=8), output=path):
        for step in range(3):
            with trace_step(step):
                model(torch.randn(2, 4))
    return path


def _fuzz(good: Path, work: Path) -> tuple[list[dict], list[int]]:
    """All case results; the cases libhdf5 did not come back from (resumed behind each)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTVIDEO_TRACE_", "TRACEDIFF_"))}
    env["PYTHONPATH"] = str(REPO)
    results: list[dict] = []
    stuck: list[int] = []
    start = 0
    while start < CASES:
        proc = subprocess.run(
            [sys.executable, str(DRIVER), str(REPO), str(good), str(work), str(SEED), str(CASES), str(start)],
            capture_output=True, text=True, env=env, timeout=900,
        )
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        results += [line for line in lines if "result" in line]
        if lines and "start" in lines[-1]:  # the watchdog (or a native crash) ended it mid-case
            stuck.append(lines[-1]["start"])
            start = lines[-1]["start"] + 1
            continue
        assert proc.returncode == 0, proc.stderr
        break
    return results, stuck


def test_mutated_trace_files_give_a_clean_error_or_a_correct_result(tmp_path, tally, capsys) -> None:
    good = _good_trace(tmp_path / "good.h5")
    work = tmp_path / "cases"
    work.mkdir()
    results, stuck = _fuzz(good, work)
    assert len(results) + len(stuck) == CASES
    counts = Counter((r["kind"], r["result"]) for r in results)
    crashes = [r for r in results if r["result"] == "crash"]
    assert not crashes, crashes[:5]  # only TraceFormatError may escape, also when reading the opened trace
    cut_wrong = [r for r in results if r["kind"] == "truncate" and r["result"] == "wrong"]
    assert not cut_wrong, cut_wrong[:5]  # a truncated file is refused or read as an exact prefix
    for result in results:
        if result["result"] == "error":
            assert result["message"].startswith(str(result["path"])), result  # the message names the file
    silent = sum(n for (kind, result), n in counts.items() if result == "wrong")
    tally["fuzz_reader"] += CASES
    tally["  of which refused with TraceFormatError"] += sum(n for (_, r), n in counts.items() if r == "error")
    tally["  of which read back correctly"] += sum(n for (_, r), n in counts.items() if r == "same")
    tally["  of which flipped stored numbers, undetectable without checksums"] += silent
    tally["  of which made libhdf5 loop (known limitation)"] += len(stuck)
    with capsys.disabled():
        print(f"\nreader fuzz (seed {SEED}): {dict(sorted(counts.items()))}; libhdf5 stuck on cases {stuck}")


@pytest.mark.parametrize(
    ("column", "row", "value", "message"),
    [
        ("full_len", 1, 3, r"record 1 holds a full tensor of 3 values for shape \(2, 8\)"),
        ("full_offset", 2, 10**9, r"record 2 has its full-tensor offset 1000000000 outside"),
        ("sample_offset", 0, -5, r"record 0 has its sample offset -5 outside samples"),
        ("label", 3, 99, r"points past the label or dtype table|record 3 has its label index 99"),
        ("module", 0, -1, r"record 0 has its module index -1 outside modules"),
        ("full_kind", 1, 7, r"record 1 has its full-tensor kind 7 outside"),
    ],
)
def test_records_pointing_outside_their_tables_are_refused(tmp_path, column, row, value, message) -> None:
    path = _good_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as handle:
        handle["records"][column][row] = value
    with pytest.raises(TraceFormatError, match=message) as err:
        open_trace(path)
    assert str(err.value).startswith(f"{path}: damaged trace: ")
