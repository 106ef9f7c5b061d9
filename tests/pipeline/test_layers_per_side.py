"""One layer regex per side: the sides of a port name their modules differently by definition.

The demo's upstream has ``blocks.N``, its port ``transformer_blocks.N``; a single
``--layers '^blocks\\.\\d+$'`` fits one side only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import assert_one_line_error, report_lines, run_cli
from tracediff import open_trace
from tracediff.commands.run import demo_spec
from tracediff.config import check_layers_match
from tracediff.demo.models import BUGS, make_port
from tracediff.errors import TraceConfigError
from tracediff.pipeline.spec import apply_overrides, spec_from_mapping

UPSTREAM_BLOCKS = r"^blocks\.\d+$"
PORT_BLOCKS = r"^transformer_blocks\.\d+$"


def test_per_side_flags_trace_each_sides_blocks_and_find_the_bug(tmp_path) -> None:
    out = tmp_path / "blocks"
    proc = run_cli("run", "--upstream-layers", UPSTREAM_BLOCKS, "--port-layers", PORT_BLOCKS, "--steps", "1",
                   "--out", str(out), "--no-progress")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    culprit_block = BUGS["gelu_tanh"].port_module.rsplit(".", 2)[0]  # transformer_blocks.2
    assert report_lines(proc.stdout)[0].startswith(f"first drift: {culprit_block} (upstream blocks.2)")
    with open_trace(out / "upstream.h5") as trace:
        assert set(trace.record_modules()) == {"", *(f"blocks.{i}" for i in range(4))}
        assert trace.config["layers"] == UPSTREAM_BLOCKS
    with open_trace(out / "port.h5") as trace:
        assert set(trace.record_modules()) == {"", *(f"transformer_blocks.{i}" for i in range(4))}
    report = json.loads((out / "report.json").read_text())
    assert report["first_drift"]["port"] == culprit_block


def test_one_regex_for_both_sides_fails_clearly_naming_the_side_and_the_flag(tmp_path) -> None:
    """Before: a message naming neither the side nor --port-layers, with unhelpful example names."""
    out = tmp_path / "one"
    proc = run_cli("run", "--layers", UPSTREAM_BLOCKS, "--out", str(out), "--no-progress")
    assert_one_line_error(proc, "[trace] layers='^blocks\\.\\d+$'", "matches no module of the port model",
                          "transformer_blocks.0", "--port-layers")
    assert not (out / "port.h5").exists() and not (out / "report.json").exists()


def test_a_sides_own_regex_that_matches_nothing_names_its_flag(tmp_path) -> None:
    proc = run_cli("run", "--upstream-layers", "^nope$", "--out", str(tmp_path / "x"), "--no-progress")
    assert_one_line_error(proc, "[upstream] layers='^nope$'", "matches no module of the upstream model",
                          "blocks.0", "fix --upstream-layers")


def test_spec_keys_and_precedence(tmp_path) -> None:
    data = {
        "upstream": {"factory": "m:up", "layers": UPSTREAM_BLOCKS},
        "port": {"factory": "m:port"},
        "inputs": {"factory": "m:inputs"},
        "trace": {"layers": "attn"},
    }
    spec = spec_from_mapping(data, source="parity.toml", base_dir=Path(tmp_path))
    assert spec.layers_for("upstream") == (UPSTREAM_BLOCKS, "[upstream] layers")
    assert spec.layers_for("port") == ("attn", "[trace] layers")
    # a flag wins over the file; an empty side regex traces every module of that side
    spec = apply_overrides(spec, {("port", "layers"): "", ("upstream", "layers"): None})
    assert spec.layers_for("port") == ("", "[port] layers")
    assert spec.layers_for("upstream") == (UPSTREAM_BLOCKS, "[upstream] layers")


def test_default_needs_no_filter() -> None:
    spec = demo_spec("clean")
    assert spec.layers_for("upstream") == ("", "[trace] layers")
    assert spec.layers_for("port") == ("", "[trace] layers")
    check_layers_match(["", "a"], "", side="port", source="[trace] layers")  # empty: everything, no error


def test_check_layers_match_on_a_real_model() -> None:
    names = [name for name, _ in make_port().named_modules()]
    check_layers_match(names, PORT_BLOCKS, side="port", source="[port] layers")
    with pytest.raises(TraceConfigError) as info:
        check_layers_match(names, UPSTREAM_BLOCKS, side="port", source="[trace] layers")
    message = str(info.value)
    assert message.startswith("[trace] layers='^blocks\\.\\d+$' matches no module of the port model (97 modules, "
                              "e.g. transformer_blocks.0, ")
    with pytest.raises(TraceConfigError, match=r"\[port\] layers='\(' is not a valid Python regex"):
        check_layers_match(names, "(", side="port", source="[port] layers")


def test_flags_are_listed_in_run_help() -> None:
    proc = run_cli("run", "--help")
    assert proc.returncode == 0
    assert "--upstream-layers" in proc.stdout and "--port-layers" in proc.stdout
