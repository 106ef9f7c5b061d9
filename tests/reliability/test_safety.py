"""Safety: nothing is unpickled, HTML escapes every name, and no trace is overwritten by accident."""

from __future__ import annotations

import ast
import os
import pickle
import sys
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import TinyNet
from tracediff import TraceConfig, TraceConfigError, attach, open_trace
from tracediff.parity import Settings, diagnose, make_pair

PACKAGE = Path(__file__).resolve().parents[2] / "tracediff"
REPO = PACKAGE.parent

# -- no unpickling ---------------------------------------------------------------------------


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                found.append((f"{func.value.id}.{func.attr}", node))
            elif isinstance(func, ast.Name):
                found.append((func.id, node))
    return found


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def test_the_package_never_unpickles() -> None:
    """No pickle-family module anywhere; torch.load only with weights_only=True; np.load never with pickles."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for module in modules:
                    if module.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve",
                                                "joblib"):
                        problems.append(f"{where}:{node.lineno}: imports {module}")
        for name, call in _calls(tree):
            if name == "torch.load" and _keyword(call, "weights_only") is not True:
                problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") is not False:
                problems.append(f"{where}:{call.lineno}: np.load without allow_pickle=False")
            if name in ("yaml.load", "yaml.unsafe_load"):
                problems.append(f"{where}:{call.lineno}: {name}")
    assert not problems, "\n".join(problems)


class _Boom:
    """Unpickling this writes a marker file: proof that something unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (Path(self.marker), "unpickled!"))


def test_pickles_inside_a_trace_stay_inert(tmp_path, tiny_net) -> None:
    path = tmp_path / "t.h5"
    with attach(tiny_net, config=TraceConfig(stats="abs_mean,sum"), output=path):
        tiny_net(torch.randn(2, 4))
    marker = tmp_path / "marker"
    payload = np.void(pickle.dumps(_Boom(str(marker))))  # opaque bytes, as a pickle would be stored
    with h5py.File(path, "a") as handle:
        handle.attrs["config"] = payload  # where the reader expects JSON
        handle.attrs["failures"] = payload
        handle.attrs["pickled"] = payload
        handle["records"].attrs["extra"] = payload
        handle.create_dataset("opaque", data=payload)
    with open_trace(path) as trace:
        assert len(trace.records) > 0
    for argv in (["show", str(path)], ["first-drift", str(path), str(path)], ["weights", str(path), str(path)]):
        proc = run_cli(*argv)
        assert proc.returncode in (0, 1), proc.stderr
    assert not marker.exists()


# -- HTML escaping -----------------------------------------------------------------------------

NASTY = [
    "<script>alert('module')</script>",
    '"><img src=x onerror=alert(1)>',
    "a&b</code></p><iframe src=javascript:alert(1)>",
    "[red]markup[/red] [/] {braces}",
]
NASTY_LABEL = "<b onmouseover=alert(2)>label</b>"


class Nasty(nn.Module):
    """Module names and output labels that are HTML (or rich markup) if anyone forgets to escape."""

    def __init__(self, bump: float) -> None:
        super().__init__()
        for name in NASTY:
            self.add_module(name, nn.Linear(4, 4))
        self.bump = bump

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for module in self.children():
            x = module(x) + self.bump
        return {NASTY_LABEL: x}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)
        self.attributes.update(f"value:{value}" for _, value in attrs if value and "javascript" in value)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "ul", "li", "code", "br", "svg",
                "rect", "line", "text", "polyline", "circle", "table", "thead", "tbody", "tr", "th", "td", "details",
                "summary", "g", "span", "b", "strong", "em", "div", "small", "a", "path",
                # the interactive report (inline script, data as JSON): controls and the details panel
                "script", "select", "option", "input", "label", "button", "h3", "dl", "dt", "dd"}


def test_html_report_escapes_every_module_name_and_label(tmp_path) -> None:
    torch.manual_seed(0)
    upstream, port = Nasty(0.0), Nasty(0.0)
    port.load_state_dict(upstream.state_dict())
    port.bump = 0.5  # a real drift, so the report names these modules as culprits
    for side, model in (("upstream", upstream), ("port", port)):
        with attach(model, side=side, config=TraceConfig(stats="abs_mean,sum,sample"), output=tmp_path / f"{side}.h5"):
            model(torch.randn(3, 4))
    html_path = tmp_path / "report.html"
    proc = run_cli("first-drift", str(tmp_path / "upstream.h5"), str(tmp_path / "port.h5"), "--html", str(html_path))
    assert proc.returncode == 1, proc.stderr  # drift found, and no traceback from markup in names
    assert "Traceback" not in proc.stderr
    page = html_path.read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    assert parser.tags <= ALLOWED_TAGS, parser.tags - ALLOWED_TAGS
    assert not any(name.startswith("on") for name in parser.attributes), parser.attributes
    assert not any(name.startswith("value:") for name in parser.attributes), parser.attributes
    text = "".join(parser.text)
    for name in [*NASTY, NASTY_LABEL]:
        if any(char in name for char in "<>&\"'"):
            assert name not in page  # raw HTML never appears as such...
        assert name in text  # ...but as text, exactly
    assert "[red]markup[/red]" in proc.stdout  # the terminal shows markup-like names literally


# -- never overwrite a trace by accident ---------------------------------------------------------


def test_attach_refuses_to_overwrite_an_existing_trace(tmp_path, tiny_net) -> None:
    out = tmp_path / "yesterday.h5"
    with attach(tiny_net, config=TraceConfig(), output=out):
        tiny_net(torch.randn(2, 4))
    before = out.read_bytes()
    with pytest.raises(TraceConfigError) as err:
        attach(tiny_net, config=TraceConfig(), output=out)
    message = str(err.value)
    assert str(out) in message and "overwrite=True" in message and "TRACEDIFF_OVERWRITE=1" in message
    assert "--force" in message
    assert out.read_bytes() == before  # not touched, not even truncated
    assert not tiny_net._forward_hooks and not tiny_net.embed._forward_hooks  # no hook left behind
    assert not list(tmp_path.glob(".yesterday.h5*")) and not (tmp_path / "yesterday.h5.lock").exists()


def test_overwriting_is_allowed_when_asked(tmp_path, tiny_net, monkeypatch) -> None:
    out = tmp_path / "t.h5"
    for allow in ({"overwrite": True}, {"config": TraceConfig(overwrite=True)}, {"env": True}):
        out.write_bytes(b"an old trace")
        config = allow.get("config", TraceConfig())
        if "env" in allow:
            monkeypatch.setenv("FASTVIDEO_TRACE_ACTIVATIONS", "1")
            monkeypatch.setenv("TRACEDIFF_OVERWRITE", "1")
            config = TraceConfig.from_env()
        with attach(tiny_net, config=config, output=out, overwrite=allow.get("overwrite")):
            tiny_net(torch.randn(2, 4))
        with open_trace(out) as trace:
            assert trace.steps == [0]
    out.write_bytes(b"")  # an empty file (mktemp) holds nothing to lose
    with attach(tiny_net, config=TraceConfig(), output=out):
        tiny_net(torch.randn(2, 4))


def test_the_pytest_diagnosis_folder_is_reused_on_purpose(tmp_path) -> None:
    """A failing parity test re-run writes its diagnosis into the same folder: that overwrite is intended."""
    torch.manual_seed(0)
    upstream = TinyNet()
    port = TinyNet()
    port.load_state_dict(upstream.state_dict())
    with torch.no_grad():
        port.head.weight.mul_(1.5)
    pair = make_pair(upstream, port, torch.randn(2, 4), atol=1e-6, rtol=1e-6)
    for _ in range(2):
        result = diagnose(pair, tmp_path / "diag", Settings())
        assert result.error is None and result.analysis is not None


SCRIPT = """
import torch
from tests.conftest import TinyNet
torch.manual_seed(0)
TinyNet()(torch.randn(2, 4))
"""


def test_script_mode_refuses_to_overwrite_without_force(tmp_path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    first = run_cli("run", "--side", "ref", "--out", str(out), "--", sys.executable, str(script), env=env)
    assert first.returncode == 0, first.stderr
    again = run_cli("run", "--side", "ref", "--out", str(out), "--", sys.executable, str(script), env=env)
    assert_one_line_error(again, "already holds", "--force")
    forced = run_cli("run", "--side", "ref", "--out", str(out), "--force", "--", sys.executable, str(script), env=env)
    assert forced.returncode == 0, forced.stderr


def test_no_stray_files_after_a_refused_attach(tmp_path, tiny_net) -> None:
    """A refusal leaves the folder as it was: no lock file, no half-written sibling."""
    out = tmp_path / "t.h5"
    out.write_bytes(b"keep me")
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TraceConfigError):
        attach(tiny_net, config=TraceConfig(), output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
