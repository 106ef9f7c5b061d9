"""Bad input to every command: one clear line on stderr, exit code 2, never a traceback.

Every command that reads a user's file is given every kind of bad file in
that place. The matrix runs through ``tracediff.cli.main`` in one subprocess
(cli_driver.py: what ``python -m tracediff`` runs, with stdout and stderr
captured at the file-descriptor level), and a few cases also as real
``python -m tracediff`` processes, so the whole path is covered without
paying a Python start per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from torch import nn

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import TinyNet
from tracediff import TraceConfig, attach
from tracediff.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("cli_driver.py")

#: Trace-file arguments: what the bad file is, and a fragment its error line must contain.
BAD_TRACES = {
    "missing": "no such file",
    "directory": "",
    "empty": "empty",
    "truncated": "",
    "random-bytes": "",
    "plain-hdf5": "not a tracediff trace",
    "newer-version": "format version 9",
    "damaged": "damaged",
    "broken-jsonl": "",
    "binary-jsonl": "",
}
BAD_MAPS = {
    "map-missing": "no such mapping file",
    "map-directory": "directory",
    "map-bad-toml": "not valid TOML",
    "map-bad-json": "not valid JSON",
    "map-wrong-suffix": "must end in .toml or .json",
    "map-not-a-table": "must hold a table",
    "map-unknown-key": "unknown key 'pairz'",
    "map-bad-regex": "not a valid regex",
    "map-unknown-module": "does not have",
    "map-binary": "",
}
BAD_SPECS = {
    "spec-missing": "",
    "spec-directory": "",
    "spec-empty": "",
    "spec-random-bytes": "",
    "spec-bad-toml": "",
}


class Other(nn.Module):
    """A model sharing nothing with TinyNet: other names, other shapes, other weights."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(3, 5, 3)
        self.pool = nn.AdaptiveAvgPool1d(2)
        self.out = nn.Bilinear(10, 10, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.stem(x)).flatten(1)
        return self.out(h, h)


def _trace(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with attach(model, side="ref", config=TraceConfig(stats="abs_mean,sum,sample"), output=path):
        model(x)
    return path


def _files(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    files = {
        "upstream": _trace(TinyNet(), torch.randn(2, 4), root / "upstream.h5"),
        "other-model": _trace(Other(), torch.randn(2, 3, 8), root / "other.h5"),
    }
    torch.manual_seed(0)
    files["port"] = _trace(TinyNet(), torch.randn(2, 4), root / "port.h5")
    good = files["upstream"].read_bytes()
    bad = {name: root / f"bad-{name}.h5" for name in BAD_TRACES}
    bad["directory"].mkdir()
    bad["empty"].write_bytes(b"")
    bad["truncated"].write_bytes(good[: len(good) // 3])
    bad["random-bytes"].write_bytes(os.urandom(4096))
    h5py.File(bad["plain-hdf5"], "w").close()
    for name, change in (("newer-version", "version"), ("damaged", "damage")):
        bad[name].write_bytes(good)
        with h5py.File(bad[name], "a") as handle:
            if change == "version":
                handle.attrs["encoding-version"] = "9"
            else:
                del handle["records/label"]
    bad["broken-jsonl"] = root / "broken.jsonl"
    bad["broken-jsonl"].write_text(
        '{"module": "blocks.0", "tensor": "out", "step": 0, "abs_mean": 1.0}\n'
        '{"module": "blocks.1", "tensor": "out", "step": 0, "abs_mean": 1.0}\n'
        '{"module": "blocks.2", "tensor": "out", "step": 0, "abs_mean": \n'
        '{"module": "head", "step": "zero"}\n'
    )
    bad["binary-jsonl"] = root / "binary.jsonl"
    bad["binary-jsonl"].write_bytes(b'{"module": "x"}\n' + os.urandom(256) + b"\xff\xfe\n")
    files.update({f"bad-{name}": path for name, path in bad.items()})
    maps = {name: root / f"{name}.toml" for name in BAD_MAPS}
    maps["map-directory"].mkdir()
    maps["map-bad-toml"].write_text('[pairs]\n"blocks.0" = \n')
    maps["map-bad-json"] = root / "map-bad-json.json"
    maps["map-bad-json"].write_text('{"pairs": {"blocks.0": "blocks.0",}}')
    maps["map-wrong-suffix"] = root / "map.yaml"
    maps["map-wrong-suffix"].write_text("pairs: {}\n")
    maps["map-not-a-table"] = root / "map-list.json"
    maps["map-not-a-table"].write_text("[1, 2]")
    maps["map-unknown-key"].write_text('[pairz]\n"a" = "b"\n')
    maps["map-bad-regex"].write_text("[rules]\n'blocks\\.(\\d+' = 'x'\n")
    maps["map-unknown-module"].write_text('[pairs]\n"blocks.0.nope" = "blocks.0"\n')
    maps["map-binary"].write_bytes(os.urandom(64) + b"\xff")
    files.update(maps)
    specs = {name: root / f"{name}.toml" for name in BAD_SPECS}
    specs["spec-directory"].mkdir()
    specs["spec-empty"].write_text("")
    specs["spec-random-bytes"].write_bytes(os.urandom(512))
    specs["spec-bad-toml"].write_text("[upstream\nfactory = 1\n")
    files.update(specs)
    return files


def _cases(f: dict[str, Path], out: Path) -> dict[str, tuple[list[str], str, str]]:
    """``id: (argv, path the message must name or "", fragment it must contain)``."""
    up, port = str(f["upstream"]), str(f["port"])
    cases: dict[str, tuple[list[str], str, str]] = {}
    for name, fragment in BAD_TRACES.items():
        bad = str(f[f"bad-{name}"])
        cases[f"show/{name}"] = (["show", bad], bad, fragment)
        cases[f"first-drift/upstream-{name}"] = (["first-drift", bad, port], bad, fragment)
        cases[f"first-drift/port-{name}"] = (["first-drift", up, bad], bad, fragment)
        cases[f"align/{name}"] = (["align", up, bad], bad, fragment)
        cases[f"weights/{name}"] = (["weights", bad, port], bad, fragment)
        cases[f"merge/{name}"] = (["merge", up, bad, "-o", str(out / f"merged-{name}.h5")], bad, fragment)
        cases[f"merge/like-{name}"] = (["merge", up, port, "--like", bad, "-o", str(out / "m.h5")], bad, fragment)
    other = str(f["other-model"])
    cases["first-drift/nothing-aligned"] = (["first-drift", up, other], "", "align")
    cases["align/nothing-aligned"] = (["align", up, other], "", "nothing aligned")
    cases["weights/nothing-aligned"] = (["weights", up, other], "", "align")
    cases["merge/different-models"] = (["merge", up, other, "-o", str(out / "mixed.h5")], "", "")
    for name, fragment in BAD_MAPS.items():
        bad = str(f[name])
        cases[f"first-drift/{name}"] = (["first-drift", up, port, "--map", bad], bad, fragment)
        cases[f"align/{name}"] = (["align", up, port, "--map", bad], bad, fragment)
        cases[f"weights/{name}"] = (["weights", up, port, "--map", bad], bad, fragment)
    for name, fragment in BAD_SPECS.items():
        spec = str(f[name])
        cases[f"run/{name}"] = (["run", spec, "--out", str(out / f"run-{name}"), "--no-progress"], spec, fragment)
        cases[f"bisect/{name}"] = (["bisect", spec], spec, fragment)
    nowhere = str(out / "no" / "such" / "dir")
    cases["first-drift/html-into-missing-folder"] = (
        ["first-drift", up, port, "--html", f"{nowhere}/r.html"], nowhere, "")
    cases["align/write-into-missing-folder"] = (["align", up, port, "--write", f"{nowhere}/m.toml"], nowhere, "")
    cases["merge/output-is-a-directory"] = (["merge", up, port, "-o", str(f["bad-directory"])], "", "")
    return cases


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, tuple[list[str], str, str, dict]]:
    root = tmp_path_factory.mktemp("bad-inputs")
    files = _files(root)
    cases = _cases(files, root)
    (root / "cases.json").write_text(json.dumps({key: argv for key, (argv, _, _) in cases.items()}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTVIDEO_TRACE_", "TRACEDIFF_"))}
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(REPO), str(root / "cases.json"), str(root / "results.json")],
        capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((root / "results.json").read_text())
    return {key: (*cases[key], results[key]) for key in cases}


def _case_ids() -> list[str]:
    # The ids are known without building the files: the case table does not depend on their content.
    fake = {name: Path(name) for name in
            ["upstream", "port", "other-model", *[f"bad-{n}" for n in BAD_TRACES],
             *BAD_MAPS, *BAD_SPECS]}
    return list(_cases(fake, Path("out")))


CASE_IDS = _case_ids()


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_gives_one_line_and_exit_2(matrix, case, tally) -> None:
    argv, path, fragment, result = matrix[case]
    shown = f"tracediff {' '.join(argv)}\nexit {result['code']}\nstderr:\n{result['stderr']}"
    assert result["code"] == 2, shown
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1, shown
    assert "Traceback" not in result["stderr"], shown
    line = lines[0]
    assert line.startswith(f"tracediff {argv[0]}: error: "), shown
    assert path in line, shown
    assert fragment.lower() in line.lower(), shown
    tally["bad_inputs"] += 1


def test_every_command_is_in_the_matrix() -> None:
    """A new command must join the matrix (add its bad inputs to ``_cases``)."""
    covered = {case.split("/")[0] for case in CASE_IDS}
    assert {name.replace("_", "-") for name in COMMANDS} <= covered


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["show", "{missing}"], ["no such file"]),
        (["first-drift", "{broken}", "{broken}"], [":3:", "invalid JSON"]),
        (["align", "{up}", "{up}", "--map", "{bad_toml}"], ["not valid TOML"]),
    ],
    ids=["show-missing", "first-drift-broken-jsonl", "align-bad-map"],
)
def test_bad_input_in_a_real_process(tmp_path, argv, fragments) -> None:
    """The same contract through ``python -m tracediff``, start to exit."""
    torch.manual_seed(0)
    up = _trace(TinyNet(), torch.randn(2, 4), tmp_path / "up.h5")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"module": "a", "abs_mean": 1}\n{"module": "b", "abs_mean": 1}\n{"module": \n')
    bad_toml = tmp_path / "map.toml"
    bad_toml.write_text("[pairs\n")
    names = {"missing": str(tmp_path / "nope.h5"), "broken": str(broken), "up": str(up), "bad_toml": str(bad_toml)}
    proc = run_cli(*[item.format(**names) for item in argv])
    assert_one_line_error(proc, *fragments)


def test_skip_bad_lines_continues_past_them_with_a_count(tmp_path) -> None:
    good = tmp_path / "good.jsonl"
    broken = tmp_path / "broken.jsonl"
    line = '{{"module": "blocks.{i}", "tensor": "out", "step": 0, "abs_mean": {v}, "sum": {v}}}\n'
    good.write_text("".join(line.format(i=i, v=1.0 + i) for i in range(4)))
    broken.write_text("".join(line.format(i=i, v=1.0 + i) for i in range(2)) + "{not json\n" + '["a list"]\n'
                      + "".join(line.format(i=i, v=1.0 + i) for i in range(2, 4)))
    refused = run_cli("first-drift", str(good), str(broken))
    assert_one_line_error(refused, f"{broken}:3:")
    proc = run_cli("first-drift", str(good), str(broken), "--skip-bad-lines")
    assert proc.returncode == 0, proc.stderr
    assert f"skipped 2 bad lines of {broken}" in proc.stderr
    assert "Traceback" not in proc.stderr
