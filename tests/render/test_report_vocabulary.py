"""One vocabulary across the terminal, JSON and HTML reports (issue #19, problem 6).

Everything runs on real traces: the demo's, written by ``python -m tracediff run --out DIR`` in a
subprocess whose stdout is a pipe (a CI log), and a model whose submodule returns a sparse tensor, which
the recorder cannot reduce (PyTorch answers with a 14 kB list of dispatch keys).
"""

from __future__ import annotations

import json
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.cli_helpers import run_cli
from tracediff import TraceConfig, attach
from tracediff.render.report import failure_lines
from tracediff.store.load import load_trace
from tracediff.vocabulary import COLUMNS, LEGEND, TERMINAL_COLUMNS, error_summary, number

NARROW = {"COLUMNS": "80"}  # an 80-column setting, but stdout is a pipe: names must stay whole


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo run (planted bug, three steps), piped at COLUMNS=80: its stdout and the reports it wrote."""
    out = tmp_path_factory.mktemp("vocab") / "run"
    proc = run_cli("run", "--out", str(out), env=NARROW)
    assert proc.returncode == 1, proc.stderr
    return {
        "stdout": proc.stdout,
        "json": json.loads((out / "report.json").read_text()),
        "html": (out / "report.html").read_text(encoding="utf-8"),
        "out": out,
    }


def _table_lines(stdout: str) -> tuple[str, list[str], str]:
    """The terminal table's header line, its row lines, and the line right under it."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["#", "port", "module"])
    rows = []
    for line in lines[head + 2:]:
        if not line.strip():
            break
        rows.append(line)
    after = next(line for line in lines[head + 2 + len(rows):] if line.strip())
    return lines[head], rows, after


def test_headline_table_json_and_html_print_the_same_numbers(demo: dict) -> None:
    data, stdout = demo["json"], demo["stdout"]
    first = data["first_drift"]
    headline = next(line for line in stdout.splitlines() if line.startswith("first drift:"))
    assert headline == data["headline"]
    # the headline's value is the check's value, named for what it is, in the one number format
    error, tol = number(first["value"]), number(first["limit"])
    assert first["metric"] == "abs error"
    assert f"abs error {error} > tol {tol} at the worst element" in headline
    row = next(r for r in data["rows"] if (r["port"], r["tensor"], r["step"], r["call"]) ==
               (first["port"], first["tensor"], first["step"], first["call"]))
    assert f"max abs err {number(row['max_abs_err'])}" in headline and f"rel L2 err {number(row['rel_l2'])}" in headline
    # the terminal row of the same record: the same strings under the columns of the same names
    header, rows, _ = _table_lines(stdout)
    cells = next(re.split(r"\s{2,}", line.strip()) for line in rows if line.split()[0] == str(row["index"]))
    assert cells[1:5] == [first["port"], first["upstream"], str(first["call"]), first["tensor"]]
    assert cells[5:9] == ["elements", error, tol, f"{number(row['ratio'])} ✗"]
    assert cells[9] == number(row["rel_l2"])
    # the HTML row of the first drift: the same cells
    parser = _Rows()
    parser.feed(demo["html"])
    html_row = parser.rows["first"][0]
    headers = [c.header for c in COLUMNS]
    assert html_row[headers.index("error")] == error and html_row[headers.index("tol")] == tol
    assert html_row[headers.index("err/tol")] == f"{number(row['ratio'])} ✗"
    assert html_row[headers.index("max abs err")] == number(row["max_abs_err"])


def test_columns_have_one_name_everywhere_and_a_legend_line(demo: dict) -> None:
    header, _, after = _table_lines(demo["stdout"])
    assert re.split(r"\s{2,}", header.strip()) == [c.header for c in TERMINAL_COLUMNS]
    assert after.strip() == LEGEND  # one line of legend right under the table
    for old in ("tol used", "drift ", "rel. L2"):
        assert old not in header
    parser = _Rows()
    parser.feed(demo["html"])
    assert parser.headers[0] == [c.header for c in COLUMNS]
    assert "cosine" not in parser.headers[0]  # reads 1.00 for every small error: in the JSON only
    columns = demo["json"]["columns"]
    assert [c["column"] for c in columns] == [c.header for c in COLUMNS]
    row = demo["json"]["rows"][0]
    assert all(c["key"] in row for c in columns), [c["key"] for c in columns if c["key"] not in row]
    # the check is the same word in all three
    assert {r["check"] for r in demo["json"]["rows"] if r["check"]} == {"elements"}  # "" (JSON) = "-": unchecked
    assert all(cells[5] == "elements" for cells in parser.rows["failed"] + parser.rows["first"])


def test_detail_lines_say_what_was_not_checked_and_do_not_repeat_the_headline(demo: dict) -> None:
    stdout = demo["stdout"]
    assert "nothing comparable" not in stdout
    unchecked = demo["json"]["unchecked_inputs"]
    assert unchecked > 0
    assert f"{unchecked} module inputs not checked: shaped differently on the two sides" in stdout
    assert "note: drift at" not in stdout  # the first drift of each step, once more, under the headline
    last_good = demo["json"]["last_good"]
    assert f"tensor {last_good['tensor']}, err/tol {number(last_good['ratio'])}" in stdout


def test_piped_reports_never_cut_module_names(demo: dict) -> None:
    stdout = demo["stdout"]
    assert "…" not in stdout
    _, rows, _ = _table_lines(stdout)
    names = {r["port"] for r in demo["json"]["rows"]}
    for line in rows:
        assert line.split()[1] in names  # whole, on one line
    trace = demo["out"] / "port.h5"
    listing = json.loads(run_cli("show", str(trace), "--limit", "0", "--json").stdout)["modules"]
    proc = run_cli("show", str(trace), "--limit", "0", env=NARROW)
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    tokens = set(proc.stdout.split())
    for module in {row["module"] for row in listing}:
        assert module in tokens, module  # whole, not folded over two lines nor cut


class Sparse(nn.Module):
    """Returns a sparse tensor: the recorder's reductions refuse it with PyTorch's dispatch-key dump."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to_sparse()


class WithSparse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.sparse = Sparse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse(self.lin(x)).to_dense()


def test_a_recording_failure_is_one_short_line_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    failures = {}
    for side in ("upstream", "port"):
        model = WithSparse()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with attach(model, side=side, config=TraceConfig(stats="abs_mean,sum"), output=tmp_path / f"{side}.h5"):
                model(x)
                model(x)  # the same failure again: still one warning
        ours = [str(w.message) for w in caught if "tracediff: recording" in str(w.message)]
        assert len(ours) == 1, ours
        message = ours[0]
        assert "\n" not in message and len(message) < 400, message
        assert "recording 'sparse' failed (NotImplementedError: Could not run 'aten::" in message
        assert "PrivateUse1" not in message and "registered at" not in message  # no dispatch-key list
        with load_trace(tmp_path / f"{side}.h5") as trace:
            failures[side] = dict(trace.meta["failures"])
    assert failures["upstream"] == failures["port"]
    lines = failure_lines(failures)
    assert len(lines) == 1  # both sides, same module, same error: one line
    assert lines[0].startswith("upstream and port: recording 'sparse' failed (NotImplementedError: Could not run")
    proc = run_cli("show", str(tmp_path / "port.h5"), env=NARROW)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stdout.splitlines() if "recording 'sparse' failed" in line]
    assert len(warned) == 1 and "PrivateUse1" not in warned[0], proc.stdout


SPARSE_MODELS = """
import torch
from torch import nn


class Sparse(nn.Module):
    def forward(self, x):
        return x.to_sparse()


class WithSparse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.sparse = Sparse()

    def forward(self, x):
        return self.sparse(self.lin(x)).to_dense()


def build():
    return WithSparse()


def inputs():
    return {"x": torch.randn(2, 4)}
"""


def test_run_reports_a_recording_failure_once_in_all_its_output(tmp_path: Path) -> None:
    """``run`` used to warn on stderr as it happened and again in its summary, with the dispatch-key dump."""
    (tmp_path / "sparse_models.py").write_text(SPARSE_MODELS)
    spec = tmp_path / "parity.toml"
    spec.write_text('[upstream]\nfactory = "sparse_models.py:build"\n[port]\nfactory = "sparse_models.py:build"\n'
                    '[inputs]\nfactory = "sparse_models.py:inputs"\n[run]\nsteps = 2\n')
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "o"), "--no-progress", env=NARROW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    mentions = [line for line in output.splitlines() if "recording 'sparse' failed" in line]
    assert len(mentions) == 1, output
    assert mentions[0].startswith("warning: upstream and port: recording 'sparse' failed (NotImplementedError")
    assert "PrivateUse1" not in output and "Traceback" not in output


def test_error_summary_keeps_type_and_first_sentence() -> None:
    try:
        torch.linalg.vector_norm(torch.randn(3).to_sparse())
    except NotImplementedError as exc:
        assert len(str(exc)) > 2000  # the dump this is about
        line = error_summary(exc)
    assert line.startswith("NotImplementedError: Could not run 'aten::linalg_vector_norm' with arguments from the")
    assert "\n" not in line and len(line) <= 200
    assert error_summary(ValueError("bad\nsecond line")) == "ValueError: bad"


def test_one_number_format() -> None:
    assert number(0.000129) == number(1.29e-4) == "1.29e-04"
    assert number(0.00411) == "0.00411" and number(4.69) == "4.69" and number(19.0) == "19"
    assert number(999.6) == number(1000.4) == "1.00e+03"
    assert (number(None), number(float("nan")), number(float("inf")), number(0.0)) == ("-", "-", "inf", "0")


class _Rows(HTMLParser):
    """The HTML report's static tables: header rows, and body rows' cells by row class."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[list[str]] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._cells: list[str] | None = None
        self._class = ""
        self._text: list[str] | None = None
        self._head = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "thead":
            self._head = True
        elif tag == "tr":
            self._cells, self._class = [], dict(attrs).get("class") or ""
        elif tag in ("td", "th"):
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "thead":
            self._head = False
        elif tag in ("td", "th") and self._cells is not None and self._text is not None:
            self._cells.append("".join(self._text))
            self._text = None
        elif tag == "tr" and self._cells is not None:
            if self._head:
                self.headers.append(self._cells)
            else:
                self.rows.setdefault(self._class, []).append(self._cells)
            self._cells = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)
