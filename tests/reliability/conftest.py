"""Reliability tests (docs/reliability.md): shared helpers, and the tally printed after the run.

Each test adds what it exercised (kills, fuzz cases, bad inputs) to the
session-wide ``tally``; the totals are printed in the terminal summary, so a
CI log shows how much was actually tried, not only that it passed.
"""

from __future__ import annotations

from collections import Counter

import pytest

_TALLY = pytest.StashKey[Counter]()

#: Wording of the summary lines (other keys are printed as they are), in the order first counted.
LABELS = {
    "kills": "random kills of a traced run (SIGKILL + SIGTERM)",
    "kills_sigkill": "  of which SIGKILL",
    "kills_sigterm": "  of which SIGTERM",
    "fuzz_env": "fuzz cases: env-var parsers",
    "fuzz_mapping": "fuzz cases: mapping-file parser",
    "fuzz_jsonl": "fuzz cases: JSONL importer",
    "fuzz_reader": "fuzz cases: mutated trace files for the reader",
    "bad_inputs": "bad inputs given to CLI commands",
    "disk_full": "disk-full runs",
}


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TALLY] = Counter()


@pytest.fixture(scope="session")
def tally(pytestconfig: pytest.Config) -> Counter:
    """Session-wide counter: ``tally["kills"] += 1``."""
    return pytestconfig.stash[_TALLY]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    counts = config.stash.get(_TALLY, Counter())
    if not counts:
        return
    terminalreporter.write_sep("-", "reliability: what was tried")
    for key in counts:
        terminalreporter.write_line(f"{LABELS.get(key, key)}: {counts[key]}")
