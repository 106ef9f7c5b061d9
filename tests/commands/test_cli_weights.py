"""``tracediff weights UPSTREAM PORT``, and the pre-flight block of ``first-drift``, as a user runs them."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import TinyNet
from tests.preflight.test_preflight import MISSING, TRANSPOSED, broken_port
from tests.printed_numbers import mask_floats, number_after
from tests.store.test_jsonl import write_fastvideo_trace
from tracediff import TraceConfig
from tracediff.cli import main
from tracediff.demo import make_inputs, make_port, make_upstream
from tracediff.pipeline.runner import trace_model

STATS = "abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample"
BROKEN_COUNTS = "123 parameters compared: 120 identical, 1 transposed, 1 scaled, 1 missing in port"
DEMO_MAP = "tracediff.demo.convert:PARAM_NAMES_MAPPING"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_weights")
    out = {}
    for name, model in (("up", make_upstream(0)), ("clean", make_port(0)), ("broken", broken_port())):
        out[name] = root / f"{name}.h5"
        trace_model(model, side=name, steps=[make_inputs(0, step=0)], output=out[name],
                    config=TraceConfig(stats=STATS))
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    out["jsonl"] = write_fastvideo_trace(TinyNet(), root / "ref.jsonl", [(0, {"x": x})])
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def runs(files: dict[str, Path]) -> dict[str, object]:
    up, clean, broken = str(files["up"]), str(files["clean"]), str(files["broken"])
    commands = {
        "clean": ["weights", up, clean, "--param-map", DEMO_MAP],
        "broken": ["weights", up, broken],
        "json": ["weights", up, broken, "--json", "--param-map", DEMO_MAP],
        "missing": ["weights", up, str(files["root"] / "nope.h5")],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, *args, cwd=files["root"]) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def test_clean_pair_exits_zero_with_the_count(runs) -> None:
    proc = runs["clean"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["123 parameters compared: 123 identical",
                                        "inputs identical (3 tensors, step 0)"]


def test_findings_exit_one_with_a_table_and_the_counts(runs) -> None:
    proc = runs["broken"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-2:] == [BROKEN_COUNTS, "inputs identical (3 tensors, step 0)"]
    assert lines[0].split() == ["check", "port", "upstream", "finding"]
    rows = [line.rstrip().split(None, 3) for line in lines[2:5]]
    assert rows[0] == ["weight", "-", "blocks.0.cross_attn.k.bias",
                       "missing in port (its counterpart transformer_blocks.0.attn2.to_k has no 'bias')"]
    assert rows[1] == ["weight", "transformer_blocks.1.attn2.to_out.weight", "blocks.1.cross_attn.o.weight",
                       "transposed: holds upstream's transpose (64×64 -> 64×64)"]
    assert rows[2][:3] == ["weight", "transformer_blocks.2.ffn.fc_in.weight", "blocks.2.ffn.0.weight"]
    assert mask_floats(rows[2][3]).startswith("scaled by # (max-abs #")
    assert number_after(rows[2][3], "scaled by ") == pytest.approx(0.5, rel=1e-3)


def test_json_lists_every_verdict(runs) -> None:
    proc = runs["json"]
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is False and data["source"] == "traces"
    assert data["counts_line"] == BROKEN_COUNTS
    assert len(data["params"]) == 123 and data["counts"]["identical"] == 120
    assert TRANSPOSED in data["findings"]
    assert data["findings"][0] == ("upstream blocks.0.cross_attn.k.bias missing in port (the param map sends it to "
                                   "'transformer_blocks.0.attn2.to_k.bias', which the port does not have)")
    assert data["notes"][0].startswith("modules aligned without the parameter map, which the aligner refused")


def test_missing_file_exits_two_with_one_line(runs) -> None:
    assert_one_line_error(runs["missing"], "tracediff weights: error:", "nope.h5: no such file")


def test_a_trace_without_module_table_is_refused(files, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["weights", str(files["jsonl"]), str(files["jsonl"])])
    err = capsys.readouterr().err
    assert code == 2
    assert "ref.jsonl: holds no module table" in err


def test_all_lists_identical_parameters_too(files, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["weights", str(files["up"]), str(files["clean"]), "--all"]) == 0
    out = capsys.readouterr().out
    assert "patch_embed.proj.weight" in out and "identical to upstream patch_embedding.weight" not in out
    assert out.count("\nweight ") == 123


def test_first_drift_shows_the_preflight_before_the_headline(files, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["first-drift", str(files["up"]), str(files["broken"])]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"pre-flight: 3 findings; {BROKEN_COUNTS}; inputs identical (3 tensors, step 0)\n")
    assert MISSING.split(" (")[0] not in out.split("first drift:")[1]  # the block sits before the headline
    assert out.index("pre-flight:") < out.index("first drift:")
    assert main(["first-drift", str(files["up"]), str(files["clean"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["preflight"]["summary"] == ("pre-flight: clean; 123 parameters compared: 123 identical; "
                                            "inputs identical (3 tensors, step 0)")
