"""``first-drift --atol/--rtol/--preset`` follow the one tolerance rule set (``tracediff.tolerance.resolve``).

``--atol`` and ``--rtol`` come together and replace a preset; half of the pair, or a preset with them, is a
one-line usage error (exit 2), as in a run spec, ``tracediff run`` and the pytest plugin.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import tracediff
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import TinyNet
from tracediff import TraceConfig

CASES = {
    "atol_alone": ("--atol", "1e-3"),
    "rtol_alone": ("--rtol", "1e-3"),
    "preset_and_atol": ("--preset", "encoder", "--atol", "1e-3", "--rtol", "1e-3"),
    "atol_and_rtol": ("--atol", "1e-3", "--rtol", "2e-3", "--json"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("tolerance_flags")
    torch.manual_seed(0)
    model, x = TinyNet(), torch.randn(3, 4)
    paths = []
    for side in ("up", "port"):
        path = root / f"{side}.h5"
        with tracediff.attach(model, side=side, config=TraceConfig(stats="abs_mean,sample"), output=path), \
                torch.no_grad():
            model(x)
        paths.append(str(path))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, "first-drift", *paths, *flags, cwd=root) for name, flags in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", ["atol_alone", "rtol_alone"])
def test_half_of_atol_rtol_is_a_usage_error(runs: dict, case: str) -> None:
    assert_one_line_error(runs[case], "tracediff first-drift: error:", "give atol and rtol together, or a preset")


def test_a_preset_with_atol_rtol_is_a_usage_error(runs: dict) -> None:
    assert_one_line_error(runs["preset_and_atol"], "tracediff first-drift: error:",
                          "give either preset or atol/rtol, not both")


def test_atol_and_rtol_make_a_custom_tolerance_whose_stats_follow_rtol(runs: dict) -> None:
    proc = runs["atol_and_rtol"]
    assert proc.returncode == 0, proc.stderr
    tolerance = json.loads(proc.stdout)["tolerance"]
    assert tolerance == {"atol": 1e-3, "rtol": 2e-3, "stat_rtol": 2e-3, "abs_mean_limit": None, "name": "custom",
                         "overrides": []}
