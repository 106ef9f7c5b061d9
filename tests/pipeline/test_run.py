"""``python -m tracediff run``: the demo, spec files, isolated sides, unmodified scripts, bad specs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.cli_helpers import assert_one_line_error, report_lines, run_cli
from tracediff import open_trace
from tracediff.demo.models import BUGS


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_demo_names_the_planted_module(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = run_cli("run", "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    expected = BUGS["gelu_tanh"]
    first = report_lines(proc.stdout)[0]
    assert first.startswith(f"first drift: {expected.port_module} (upstream {expected.upstream_module}), step 0")
    assert {p.name for p in out.iterdir()} == {"upstream.h5", "port.h5", "report.json", "report.html"}
    report = _report(out)
    assert report["first_drift"]["port"] == expected.port_module
    assert report["run"]["steps"] == 3
    html = (out / "report.html").read_text()
    assert "<svg" in html and expected.port_module in html
    with open_trace(out / "port.h5") as trace:
        assert trace.side == "port" and trace.steps == [0, 1, 2]
    assert "upstream" in proc.stderr and "3/3" in proc.stderr  # the progress display


def test_demo_clean_reports_no_drift(tmp_path) -> None:
    proc = run_cli("run", "--demo", "clean", "--out", str(tmp_path / "clean"), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report_lines(proc.stdout)[0].startswith("no drift:")
    assert _report(tmp_path / "clean")["first_drift"] is None
    assert _report(tmp_path / "clean")["alignment_suspects"] == []
    aligned = run_cli("align", str(tmp_path / "clean" / "upstream.h5"), str(tmp_path / "clean" / "port.h5"), "--json")
    assert aligned.returncode == 0, aligned.stderr
    assert json.loads(aligned.stdout)["suspects"] == []


def test_demo_bug_in_a_modules_own_code_names_that_module(tmp_path) -> None:
    """rope_sign rotates q/k inside attn1's own forward: the first drifting record is to_out's input."""
    expected = BUGS["rope_sign"]
    proc = run_cli("run", "--demo", "rope_sign", "--out", str(tmp_path / "on"), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    assert report_lines(proc.stdout)[0].startswith(
        f"first drift: {expected.port_module} (upstream {expected.upstream_module}), step 0: its own code, "
        f"before it calls {expected.port_module}.to_out ")
    first = _report(tmp_path / "on")["first_drift"]
    assert (first["culprit"], first["port"], first["tensor"], first["before_call"]) == (
        expected.port_module, f"{expected.port_module}.to_out", "input[0]", True)

    off = run_cli("run", "--demo", "rope_sign", "--out", str(tmp_path / "off"), "--no-progress",
                  "--trace-inputs", "false")
    assert off.returncode == 1, off.stderr
    lines = report_lines(off.stdout)
    assert lines[0].startswith(f"first drift: {expected.port_module}.to_out ")
    assert any(line.strip().startswith(f"module inputs were not recorded: if {expected.port_module}.to_out's own "
                                       f"code is right, the error was made before it ran, in {expected.port_module}")
               for line in lines)
    with open_trace(tmp_path / "off" / "port.h5") as trace:
        assert trace.config["inputs"] is False


def test_bad_trace_inputs_value_is_one_line(tmp_path) -> None:
    proc = run_cli("run", "--trace-inputs", "maybe", "--out", str(tmp_path / "x"))
    assert_one_line_error(proc, "--trace-inputs")
    assert not (tmp_path / "x").exists()


def test_refuses_to_overwrite_without_force(tmp_path) -> None:
    out = tmp_path / "again"
    assert run_cli("run", "--demo", "clean", "--out", str(out), "--no-progress").returncode == 0
    before = (out / "upstream.h5").stat().st_mtime_ns
    proc = run_cli("run", "--demo", "clean", "--out", str(out), "--no-progress")
    assert_one_line_error(proc, "already holds", "--force")
    assert (out / "upstream.h5").stat().st_mtime_ns == before
    assert run_cli("run", "--demo", "clean", "--out", str(out), "--no-progress", "--force").returncode == 0


USER_MODELS = textwrap.dedent(
    """
    import torch
    from tracediff.demo.models import DemoConfig, make_inputs, make_port, make_upstream

    SMALL = DemoConfig(depth={depth})

    def build_upstream(seed):
        return make_upstream(seed, SMALL)

    def build_port(seed, bug=None):
        return make_port(seed, SMALL, bug=bug or None)

    def inputs(seed, step):
        return make_inputs(seed, SMALL, step)

    def broken(seed):
        raise RuntimeError("checkpoint shape mismatch")

    def wrong_inputs(seed, step):
        return {{"x": torch.zeros(1, 3)}}
    """
)


def _spec(tmp_path: Path, body: str, depth: int = 4) -> Path:
    (tmp_path / "models.py").write_text(USER_MODELS.format(depth=depth))
    spec = tmp_path / "parity.toml"
    spec.write_text(textwrap.dedent(body))
    return spec


GOOD_SPEC = """
    [upstream]
    factory = "models.py:build_upstream"

    [port]
    factory = "models.py:build_port"
    kwargs = { bug = "ln_eps" }

    [inputs]
    factory = "models.py:inputs"

    [run]
    steps = 2

    [tolerance]
    preset = "single-block"
"""


def test_spec_file_run_and_flag_overrides(tmp_path) -> None:
    spec = _spec(tmp_path, GOOD_SPEC)
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "a"), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    assert _report(tmp_path / "a")["first_drift"]["port"] == BUGS["ln_eps"].port_module
    # a flag wins over the file: no bug, one step, blocks only
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "b"), "--no-progress", "--port-kwarg", "bug=false",
                   "--steps", "1", "--layers", r"^(transformer_)?blocks\.\d+$")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open_trace(tmp_path / "b" / "port.h5") as trace:
        assert trace.steps == [0]
        assert set(trace.record_modules()) == {"", *(f"transformer_blocks.{i}" for i in range(4))}


def test_isolate_sides_gives_the_same_result(tmp_path) -> None:
    spec = _spec(tmp_path, GOOD_SPEC)
    same = run_cli("run", str(spec), "--out", str(tmp_path / "same"), "--no-progress")
    apart = run_cli("run", str(spec), "--out", str(tmp_path / "apart"), "--no-progress", "--isolate-sides")
    assert same.returncode == apart.returncode == 1, apart.stderr
    one, two = _report(tmp_path / "same"), _report(tmp_path / "apart")
    assert one["first_drift"] == two["first_drift"]
    assert [r["drift"] for r in one["rows"]] == [r["drift"] for r in two["rows"]]
    assert sorted(p.name for p in (tmp_path / "apart").iterdir()) == ["port.h5", "report.html", "report.json",
                                                                      "upstream.h5"]


SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from tracediff.demo.models import make_inputs, make_port

    model = make_port(0, bug=sys.argv[1] if len(sys.argv) > 1 else None)
    with torch.no_grad():
        for step in range(2):
            model(**make_inputs(0, step=step))
    print("script finished")
    """
)


def test_unmodified_script_mode_then_first_drift(tmp_path) -> None:
    script = tmp_path / "generate.py"
    script.write_text(SCRIPT)
    ref = run_cli("run", "--side", "ref", "--out", str(tmp_path / "ref"), "--", "python", str(script))
    assert ref.returncode == 0, ref.stderr
    assert "script finished" in ref.stdout
    port = run_cli("run", "--side", "port", "--out", str(tmp_path / "port"), "--", "python", str(script), "gelu_tanh")
    assert port.returncode == 0, port.stderr
    ref_trace = tmp_path / "ref" / "ref.VideoDiTTransformer.h5"
    port_trace = tmp_path / "port" / "port.VideoDiTTransformer.h5"
    with open_trace(ref_trace) as trace:
        assert trace.steps == [0, 1]
        root_inputs = [str(label) for label in trace.record_labels()[trace.record_modules() == ""]]
        assert root_inputs == ["input.x", "input.t", "input.context", "out"] * 2
        assert trace.config["inputs"] is True  # module inputs, as in every run mode
    proc = run_cli("first-drift", str(ref_trace), str(port_trace), "--preset", "single-block")
    assert proc.returncode == 1
    assert report_lines(proc.stdout)[0].startswith(f"first drift: {BUGS['gelu_tanh'].port_module}")


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ("[port]\nfactory = 'models.py:build_port'\n[inputs]\nfactory = 'models.py:inputs'\n",
         ["[upstream] factory is required"]),
        (GOOD_SPEC + "\n[run2]\nx = 1\n", ["unknown section [run2]", "valid sections"]),
        (GOOD_SPEC.replace('factory = "models.py:inputs"', 'factroy = "models.py:inputs"'),
         ["unknown key 'factroy' in [inputs]", "valid keys: factory, kwargs"]),
        (GOOD_SPEC.replace("models.py:build_upstream", "no_such_pkg.models:build"),
         ["[upstream] factory='no_such_pkg.models:build'", "cannot import 'no_such_pkg.models'"]),
        (GOOD_SPEC.replace("models.py:build_upstream", "models.py:broken"),
         ["[upstream] factory", "raised RuntimeError: checkpoint shape mismatch"]),
        (GOOD_SPEC.replace("models.py:inputs", "models.py:wrong_inputs"),
         ["[inputs] factory", "calling the upstream model at step 0 failed", "do the inputs fit"]),
        (GOOD_SPEC.replace("steps = 2", "steps = 'two'"), ["[run] steps='two' must be an integer"]),
        (GOOD_SPEC + "\n[upstream\n", ["not valid TOML"]),
    ],
    ids=["missing-factory", "unknown-section", "unknown-key", "not-importable", "factory-raises",
         "incompatible-inputs", "wrong-type", "bad-toml"],
)
def test_bad_specs_exit_2_with_one_line_and_no_report(tmp_path, body, fragments) -> None:
    spec = _spec(tmp_path, body)
    out = tmp_path / "out"
    proc = run_cli("run", str(spec), "--out", str(out), "--no-progress")
    assert_one_line_error(proc, *fragments)
    assert not (out / "report.json").exists() and not (out / "report.html").exists()


def test_missing_weights_name_where_it_looked(tmp_path) -> None:
    spec = _spec(tmp_path, GOOD_SPEC.replace('factory = "models.py:build_upstream"',
                                             'factory = "models.py:build_upstream"\nweights = "ckpt/"'))
    assert_one_line_error(run_cli("run", str(spec), "--out", str(tmp_path / "o"), "--no-progress"),
                          "[upstream] weights='ckpt/'", "no such file or folder", str(tmp_path / "ckpt"))
    spec = _spec(tmp_path, GOOD_SPEC.replace('factory = "models.py:build_upstream"',
                                             'factory = "models.py:build_upstream"\nhf = "acme/not-cached"'))
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "o"), "--no-progress",
                   env={"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "[upstream] hf='acme/not-cached' is not in the local Hugging Face cache",
                          str(tmp_path / "hf"))


def test_weights_from_safetensors_folder(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from tracediff.demo.models import make_upstream

    state = {k: v.contiguous() for k, v in make_upstream(0).state_dict().items()}
    (tmp_path / "ckpt").mkdir()
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    # the upstream is built with seed 1 but must end up with seed 0's weights from the file
    body = GOOD_SPEC.replace('factory = "models.py:build_upstream"',
                             'factory = "models.py:build_upstream"\nkwargs = { seed = 1 }\nweights = "ckpt"')
    body = body.replace('kwargs = { bug = "ln_eps" }', "")
    spec = _spec(tmp_path, body)
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "o"), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _ = torch


def test_script_mode_errors(tmp_path) -> None:
    assert_one_line_error(run_cli("run", "--side", "ref", "--out", str(tmp_path), "--", "bash", "x.sh"),
                          "can only trace Python commands")
    assert_one_line_error(run_cli("run", "--side", "ref", "--out", str(tmp_path), "--", "python", "nope.py"),
                          "script 'nope.py' does not exist")
    assert_one_line_error(run_cli("run", "--side", "ref", "--", "python", "x.py"), "needs --out DIR")
