"""The HTML report in a real headless browser (issue #19, problem 7).

Loads the report.html a real demo run wrote (three steps, planted bug) into Chromium through
playwright, offline, and checks what a reader does with it: the chart fills the window at 800 and
1600 px, the x-axis names the blocks, the step selector switches the data, zoom narrows the view,
clicking a point or a table row shows that record's details in the report's own vocabulary.

Needs ``pip install playwright`` and a Chromium (``apt-get install chromium``, or the path in
``TRACEDIFF_CHROMIUM``); without them every test here is skipped, saying which is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import run_cli
from tracediff.vocabulary import number


def _chromium() -> str | None:
    for candidate in (os.environ.get("TRACEDIFF_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium, or set TRACEDIFF_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("html") / "run"
    proc = run_cli("run", "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    return {"html": out / "report.html", "json": json.loads((out / "report.json").read_text())}


@pytest.fixture
def open_page(browser: Any, report: dict) -> Iterator[Any]:
    """Open the report at a given window width; fails on a script error or any request leaving the file."""
    pages: list[tuple[Any, list[str], list[str]]] = []

    def opener(width: int) -> Any:
        page = browser.new_page(viewport={"width": width, "height": 900})
        errors: list[str] = []
        fetched: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("request", lambda req: fetched.append(req.url) if not req.url.startswith("file://") else None)
        page.goto(report["html"].as_uri())
        page.wait_for_selector("#chart .point")
        pages.append((page, errors, fetched))
        return page

    yield opener
    for page, errors, fetched in pages:
        page.close()
        assert errors == [], errors
        assert fetched == [], f"the report must work offline as one file, but asked for {fetched}"


def _range(page: Any) -> tuple[int, int, int, int]:
    """``(from, to, records, step)`` as the page says them."""
    text = page.inner_text("#range")
    words = text.replace("–", " ").replace("(", " ").replace(")", " ").split()
    return int(words[1]), int(words[2]), int(words[4]), int(words[6])


def _details(page: Any) -> dict[str, str]:
    terms = page.locator("#details dt").all_inner_texts()
    values = page.locator("#details dd").all_inner_texts()
    return dict(zip(terms, values, strict=True))


@pytest.mark.parametrize("width", [800, 1600])
def test_chart_is_as_wide_as_the_window(open_page: Any, width: int) -> None:
    page = open_page(width)
    box = page.locator("#chart").bounding_box()
    viewport = page.evaluate("document.documentElement.clientWidth")
    assert box["x"] >= 0 and box["x"] + box["width"] <= viewport  # nothing clipped on either side
    assert box["width"] >= viewport - 80  # the body's margins, nothing more
    # drawn at its real width (text not stretched): the viewBox is the box
    view_width = float(page.get_attribute("#chart", "viewBox").split()[2])
    assert abs(view_width - box["width"]) <= 1
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport  # no sideways scrolling


def test_x_axis_names_the_blocks(open_page: Any, report: dict) -> None:
    page = open_page(1600)
    labels = page.locator("#chart text.block-label").all_text_contents()
    for block in ("<model>", "transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2",
                  "transformer_blocks.3"):
        assert block in labels, labels
    chart = page.locator("#chart").bounding_box()
    for label in page.locator("#chart text.block-label").all():
        box = label.bounding_box()
        assert box["x"] >= chart["x"] - 1 and box["y"] + box["height"] <= chart["y"] + chart["height"] + 1


def test_step_selector_switches_the_data(open_page: Any, report: dict) -> None:
    page = open_page(1200)
    steps = report["json"]["steps"]
    assert page.locator("#step option").all_inner_texts() == [f"step {s} ✗" for s in steps]  # all drift
    first = page.get_attribute("#chart polyline", "points")
    assert _range(page)[3] == steps[0]
    page.select_option("#step", index=1)
    assert _range(page)[3] == steps[1]
    assert page.get_attribute("#chart polyline", "points") != first  # another step's values
    assert f"of step {steps[1]}" in page.inner_text("#details h3")
    assert page.locator("#first-ring").count() == 1  # that step's first drift, ringed
    page.select_option("#step", index=0)
    assert page.get_attribute("#chart polyline", "points") == first


def test_clicking_a_point_or_a_row_shows_the_record(open_page: Any, report: dict) -> None:
    page = open_page(1200)
    data = report["json"]
    rows = data["rows"]  # the first drift's step, which the page opens on
    # opened on the first drift
    first = data["first_drift"]
    heading = page.inner_text("#details h3")
    assert heading.endswith("(first drift)")
    shown = _details(page)
    assert (shown["port module"], shown["upstream module"], shown["tensor"]) == (
        first["port"], first["upstream"], first["tensor"])
    assert shown["error"] == number(first["value"]) and shown["tol"] == number(first["limit"])
    # a point
    i = next(r["index"] for r in rows if r["index"] > 10 and r["ratio"] and r["tensor"] == "out")
    page.click(f'#chart circle.point[data-i="{i}"]', force=True)
    assert page.inner_text("#details h3").startswith(f"record #{i} of step {data['curve_step']}")
    shown = _details(page)
    row = rows[i]
    assert (shown["port module"], shown["upstream module"], shown["call"], shown["tensor"]) == (
        row["port"], row["upstream"], str(row["call"]), row["tensor"])
    for column, key in (("error", "value"), ("tol", "limit"), ("rel L2 err", "rel_l2"), ("max abs err", "max_abs_err")):
        assert shown[column] == number(row[key]), column  # digit for digit the terminal's format
    assert shown["shape"] == "×".join(map(str, row["port_shape"]))
    # a table row
    j = i + 3
    page.click(f'#records-body tr[data-i="{j}"]')
    assert page.inner_text("#details h3").startswith(f"record #{j} ")
    assert _details(page)["port module"] == rows[j]["port"]
    assert "selected" in page.get_attribute(f'#records-body tr[data-i="{j}"]', "class")


def test_zoom_by_wheel_drag_and_fields(open_page: Any, report: dict) -> None:
    page = open_page(1200)
    lo, hi, n, _ = _range(page)
    assert (lo, hi) == (0, n - 1)
    box = page.locator("#chart").bounding_box()
    y = box["y"] + 60
    page.mouse.move(box["x"] + box["width"] * 0.6, y)
    page.mouse.wheel(0, -300)
    lo2, hi2, _, _ = _range(page)
    assert hi2 - lo2 < hi - lo  # zoomed in around the mouse
    page.click("#reset")
    assert _range(page)[:2] == (0, n - 1)
    # drag a range: from a quarter to the middle of the plot
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
    page.mouse.up()
    lo3, hi3, _, _ = _range(page)
    assert 0 < lo3 < hi3 < n - 1 and hi3 - lo3 < n / 2
    table = [int(i) for i in page.locator("#records-body tr").evaluate_all("rs => rs.map(r => r.dataset.i)")]
    assert table == list(range(lo3, hi3 + 1))  # the table follows the view
    assert page.locator("#chart text.block-label").count() >= 1  # the block the view starts in is named
    # exact fields
    page.fill("#from", "100")
    page.dispatch_event("#from", "change")
    page.fill("#to", "150")
    page.dispatch_event("#to", "change")
    assert _range(page)[:2] == (100, 150)
