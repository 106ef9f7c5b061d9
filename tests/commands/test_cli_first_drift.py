"""``tracediff first-drift`` in real subprocesses: exit codes, headline, JSON, HTML.

Each subprocess pays for importing torch, so the fixture starts all of them at
once (a few at a time) and each test checks its own run.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import tracediff
from tests.cli_helpers import assert_one_line_error, report_lines, run_cli
from tests.conftest import TinyNet
from tests.store.test_jsonl import write_fastvideo_trace
from tracediff import TraceConfig
from tracediff.cli import main
from tracediff.demo import BUGS, make_inputs, make_port, make_upstream

WEIRD = "<b>&x"


class Weird(nn.Module):
    """TinyNet with a block whose name needs escaping in HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()
        self.add_module(WEIRD, nn.Linear(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(WEIRD)(self.net(x))


def _trace(model: nn.Module, path: Path, calls: list[dict], *, stats: str) -> Path:
    with tracediff.attach(model, side=path.stem, config=TraceConfig(stats=stats), output=path), torch.no_grad():
        for kwargs in calls:
            model(**kwargs)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    root = tmp_path_factory.mktemp("cli")
    stats = "abs_mean,sum,min,max,l2,sample"
    demo_calls = [make_inputs(0, step=0), make_inputs(0, step=10)]
    up = _trace(make_upstream(0), root / "up.h5", demo_calls, stats=stats)
    bug = _trace(make_port(0, bug="ln_eps"), root / "bug.h5", demo_calls, stats=stats)
    clean = _trace(make_port(0), root / "clean.h5", demo_calls, stats=stats)

    torch.manual_seed(0)
    weird_ref = Weird()
    weird_port = Weird()
    weird_port.load_state_dict(weird_ref.state_dict())
    with torch.no_grad():
        weird_port.get_submodule(WEIRD).bias += 0.1
    x = torch.randn(3, 4)
    weird_up = _trace(weird_ref, root / "weird_up.h5", [{"x": x}], stats=stats)
    weird_po = _trace(weird_port, root / "weird_port.h5", [{"x": x}], stats=stats)

    torch.manual_seed(1)
    tiny_ref, tiny_port = TinyNet(), TinyNet()
    tiny_port.load_state_dict(tiny_ref.state_dict())
    tiny_port.blocks[1].norm.eps = 0.5
    calls = [(0, {"x": x}), (1, {"x": 2 * x})]
    fv_up = write_fastvideo_trace(tiny_ref, root / "ref.jsonl", calls, stats=("abs_mean", "sum", "shape"))
    fv_po = write_fastvideo_trace(tiny_port, root / "port.jsonl", calls, stats=("abs_mean", "sum", "shape"))
    lonely = root / "lonely.jsonl"
    lonely.write_text(json.dumps({"module": "decoder.z", "tensor": "out", "step": 0, "abs_mean": 1.0,
                                  "shape": [7]}) + "\n")

    html = root / "report.html"
    commands = {
        "weird": (["first-drift", str(weird_up), str(weird_po), "--html", str(html)], html),
        "demo_json": (["first-drift", str(up), str(bug), "--json"], root),
        "demo_clean": (["first-drift", str(up), str(clean), "--preset", "single-block"], root),
        "missing": (["first-drift", str(up), str(root / "nope.h5")], root),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, *args, cwd=root) for name, (args, _) in commands.items()}
        out = {name: (future.result(), commands[name][1]) for name, future in futures.items()}
    out["files"] = {"up": up, "bug": bug, "fv_up": fv_up, "fv_po": fv_po, "lonely": lonely}  # type: ignore[assignment]
    return out


def in_process(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """The same command through ``tracediff.cli.main`` (no interpreter start-up to pay)."""
    monkeypatch.setenv("COLUMNS", "200")
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_drift_headline_and_html_with_escaped_names(runs: dict) -> None:
    proc, html = runs["weird"]
    assert proc.returncode == 1, proc.stderr
    lines = report_lines(proc.stdout)
    assert lines[0].startswith(f"first drift: {WEIRD} (upstream {WEIRD}), step 0, call 0, tensor out: abs error ")
    assert " > tol " in lines[0]
    assert "last good: net (upstream net), call 0, tensor out" in proc.stdout
    assert "drift curve" in proc.stdout and "▲ first drift" in proc.stdout
    assert f"HTML report: {html}" in proc.stdout
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "&lt;b&gt;&amp;x" in page and WEIRD not in page
    # Offline, one file: inline scripts only, nothing loaded from anywhere.
    assert "<script src" not in page and "src=" not in page and "href=" not in page


def test_json_names_the_planted_module(runs: dict) -> None:
    proc, _ = runs["demo_json"]
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is False
    first = data["first_drift"]
    assert (first["port"], first["upstream"]) == (BUGS["ln_eps"].port_module, BUGS["ln_eps"].upstream_module)
    assert (first["kind"], first["step"], first["call"], first["tensor"]) == ("drift", 0, 0, "out")
    assert first["value"] > first["limit"] > 0
    assert data["drifting_steps"] == [0, 1]
    assert data["headline"].startswith(f"first drift: {BUGS['ln_eps'].port_module} (upstream ")
    assert data["last_good"]["port"] == "transformer_blocks.1.attn2"
    assert data["tolerance"]["name"] == "fp32"
    assert any(row["port"] == BUGS["ln_eps"].port_module and row["failed"] for row in data["rows"])


def test_clean_pair_exits_zero(runs: dict) -> None:
    proc, _ = runs["demo_clean"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report_lines(proc.stdout)[0].startswith("no drift: ")
    assert "preset single-block" in proc.stdout


def test_missing_file_exits_2_with_one_line(runs: dict) -> None:
    proc, _ = runs["missing"]
    assert_one_line_error(proc, "tracediff first-drift: error:", "nope.h5: no such file")
    assert proc.stdout == ""


def test_fastvideo_jsonl_on_both_sides(runs: dict, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    files = runs["files"]
    code, out, err = in_process(capsys, monkeypatch, "first-drift", str(files["fv_up"]), str(files["fv_po"]),
                                "--step", "1")
    assert code == 1, err
    headline = report_lines(out)[0]
    assert headline.startswith("first drift: blocks.1.norm (upstream blocks.1.norm), step 1, call 0, tensor out: ")
    assert "abs_mean drift" in headline


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("fv_up", "lonely"), "nothing aligned"),
        (("up", "bug", "--override", "blocks=atol"), "--override 'blocks=atol'"),
        (("up", "bug", "--step", "9"), "step 9 is not in both traces"),
        (("up", "bug", "--fail-on", "drift,oops"), "unknown kind 'oops'"),
        (("up",), "the following arguments are required: port"),
    ],
)
def test_input_errors_exit_2_with_one_line(runs: dict, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...],
                                           fragment: str) -> None:
    files = runs["files"]
    argv = [str(files.get(a, a)) for a in args]
    code, out, err = in_process(capsys, monkeypatch, "first-drift", *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == ""
    assert len(lines) == 1 and fragment in lines[0], err
