"""``python -m tracediff align`` in a real subprocess: output, files written, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tracediff import TraceConfig, attach
from tracediff.cli import main
from tracediff.demo import make_inputs, make_port, make_upstream


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}  # wide enough that rich never folds a module name
    env = {k: v for k, v in env.items() if not k.startswith("FASTVIDEO_TRACE_")}
    return subprocess.run(
        [sys.executable, "-m", "tracediff", "align", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def record(model: nn.Module, path: Path, side: str, **inputs: torch.Tensor) -> Path:
    with attach(model, side=side, config=TraceConfig(stats="abs_mean,shape"), output=path), torch.no_grad():
        model(**inputs)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli_align")
    inputs = make_inputs(0)
    return (
        record(make_upstream(0), folder / "ref.h5", "ref", **inputs),
        record(make_port(0), folder / "port.h5", "port", **inputs),
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tracediff align: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_table_shows_pairs_coverage_and_unmatched(demo) -> None:
    result = run_cli(*demo)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    gelu = next(line for line in lines if "blocks.2.ffn.1 " in line)
    assert "transformer_blocks.2.ffn.act" in gelu and "structure" in gelu and "0.60" in gelu
    assert "upstream: 105/105 modules aligned (100%), 72/72 of those with parameters (100%)" in lines
    assert "port: 96/98 modules aligned (98%), 64/64 of those with parameters (100%)" in lines
    assert "unmatched port (2): patch_embed, condition_embedder" in lines
    assert any("blocks.0.self_attn.q" in line and "transformer_blocks.0.attn1.to_qkv" in line for line in lines)


def test_json_with_param_map_and_write_then_map_round_trip(
    demo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    written = tmp_path / "alignment.toml"
    result = run_cli(*demo, "--param-map", "tracediff.demo.convert:PARAM_NAMES_MAPPING", "--json", "--write", written)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"pairs", "groups", "unmatched_upstream", "unmatched_port", "coverage"} <= set(data)
    assert data["coverage"]["upstream"]["params_aligned"] == 72
    assert {"upstream": "blocks.0.self_attn.o", "port": "transformer_blocks.0.attn1.to_out", "source": "param_map",
            "confidence": 0.95, "note": ""} in data["pairs"]  # fmt: skip
    assert data["groups"][0]["upstream"] == ["blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v"]
    assert data["unmatched_port"] == ["patch_embed", "condition_embedder"]
    assert written.is_file()

    again = run_main(capsys, *demo, "--map", written, "--json")  # same code path, no second interpreter
    assert again.returncode == 0, again.stderr
    replay = json.loads(again.stdout)
    assert [(p["upstream"], p["port"]) for p in replay["pairs"]] == [(p["upstream"], p["port"]) for p in data["pairs"]]
    assert [g["upstream"] for g in replay["groups"]] == [g["upstream"] for g in data["groups"]]
    assert replay["unmatched_upstream"] == data["unmatched_upstream"]
    assert replay["unmatched_port"] == data["unmatched_port"]


def test_bad_mapping_file_is_one_line_and_exit_2(demo, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[pairs]\n"blocks.0" = "transformer_blocks.0"\n"blocks.1" = \n')
    assert_one_line_error(run_cli(*demo, "--map", bad), str(bad), "not valid TOML", "line 3")


# The remaining exit-2 paths run through the same ``main`` in-process: a fresh
# interpreter costs ~1.5 s of torch import each, and the subprocess tests above
# already prove the process boundary (exit code, stderr, no traceback).


def run_main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    code = main(["align", *map(str, args)])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_missing_or_non_trace_input_is_exit_2(demo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    assert_one_line_error(run_main(capsys, demo[0], text), str(text), "not a readable HDF5 file")
    assert_one_line_error(run_main(capsys, tmp_path / "gone.h5", demo[1]), "gone.h5: no such file")
    assert_one_line_error(run_main(capsys, *demo, "--param-map", "nope.json"), "nope.json: no such parameter map")


def test_nothing_aligned_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    first = record(nn.Sequential(nn.Linear(4, 3)), tmp_path / "a.h5", "ref", input=torch.randn(2, 4))
    second = record(nn.Sequential(nn.Linear(5, 2)), tmp_path / "b.h5", "port", input=torch.randn(2, 5))
    assert_one_line_error(run_main(capsys, first, second), "nothing aligned", "--map")
