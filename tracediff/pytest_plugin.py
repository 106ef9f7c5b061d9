"""The tracediff pytest plugin: parity tests that explain their own failures.

Thin by design (like syrupy's): options, the ``parity`` fixture, the
``tracediff_pair`` marker and one report hook, all handing the work to
:mod:`tracediff.parity`. Plugin state lives in ``config.stash`` and
``item.stash``. Tests that use neither the fixture nor the marker pay nothing:
torch and the rest of tracediff are imported only when a parity test runs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

from tracediff.config import ENV_INPUTS, parse_bool
from tracediff.errors import TraceConfigError

if TYPE_CHECKING:
    from tracediff.parity import PairSpec, Settings

MODES = ("off", "report", "bisect")
OPTIONS = pytest.StashKey[dict[str, Any]]()
PAIRS = pytest.StashKey[list["PairSpec"]]()
DIAGNOSED = pytest.StashKey[bool]()


def _settings(config: pytest.Config) -> Settings:
    from tracediff.parity import Settings  # lazy: torch only once a parity test runs

    return Settings.from_options(**config.stash[OPTIONS])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tracediff", "tracediff: diagnose failing parity tests")
    group.addoption("--tracediff", choices=MODES, default="report",
                    help="on a failing parity test: off = do nothing, report = trace both models and attach the "
                         "first-drift report (default), bisect = also drill down to the culprit")
    group.addoption("--tracediff-dir", default=".tracediff", metavar="DIR",
                    help="where traces and reports of failing tests go, one folder per test (default .tracediff)")
    group.addoption("--tracediff-layers", default=None, metavar="REGEX",
                    help="modules to trace (default: $FASTVIDEO_TRACE_LAYERS, else all)")
    group.addoption("--tracediff-stats", default=None, metavar="LIST",
                    help="stats to record (default: $FASTVIDEO_TRACE_STATS, else tracediff's default set)")
    group.addoption("--tracediff-inputs", choices=("on", "off"), default=None,
                    help="also trace every module's inputs, so a drift made in a module's caller is blamed on the "
                         "caller (default: $TRACEDIFF_TRACE_INPUTS, else on)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "tracediff_pair(upstream, port, inputs, **options): names the fixtures holding the two models and their "
        "inputs; if the test fails, tracediff diagnoses the pair and adds a 'tracediff' report section",
    )
    config.stash[OPTIONS] = {
        "mode": config.getoption("--tracediff"),
        "root": config.getoption("--tracediff-dir"),
        "layers": config.getoption("--tracediff-layers"),
        "stats": config.getoption("--tracediff-stats"),
        "inputs": _inputs_option(config.getoption("--tracediff-inputs")),
    }


def _inputs_option(option: str | None) -> bool:
    """``--tracediff-inputs``, else ``$TRACEDIFF_TRACE_INPUTS``, else on; a bad value stops the run at start."""
    if option is not None:
        return option == "on"
    try:
        return parse_bool(os.environ.get(ENV_INPUTS), source=ENV_INPUTS, default=True)
    except TraceConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


class Parity:
    """The ``parity`` fixture: ``compare`` two models, or ``register`` them for diagnosis."""

    def __init__(self, item: pytest.Item, settings: Settings) -> None:
        self._item = item
        self._settings = settings

    @property
    def out_dir(self) -> Any:
        from tracediff.parity import artifact_dir  # lazy: torch only once a parity test runs

        return artifact_dir(self._settings.root, self._item.nodeid)

    def compare(self, upstream: Any, port: Any, inputs: Any, **options: Any) -> None:
        """Assert both models give the same outputs; on failure, attach the first-drift report.

        Options: ``atol``/``rtol`` or ``preset``, ``map``, ``param_map``, ``call``
        (method name or ``fn(model, inputs)``), ``upstream_call``, ``port_call``.
        """
        __tracebackhide__ = True  # the failure points at the test's own parity.compare line, not at this frame
        from tracediff.parity import compare_outputs, diagnose, make_pair  # lazy: torch only in parity tests

        pair = make_pair(upstream, port, inputs, **options)
        failure = compare_outputs(pair)
        if failure is None:
            return
        if self._settings.mode == "off":
            raise AssertionError(failure)
        self._item.stash[DIAGNOSED] = True
        diagnosis = diagnose(pair, self.out_dir, self._settings)
        raise AssertionError(f"{failure}\n\n{diagnosis.section()}")

    def register(self, upstream: Any, port: Any, inputs: Any, **options: Any) -> None:
        """Diagnose this pair if the test fails for any reason (its own ``assert_close`` included)."""
        __tracebackhide__ = True
        from tracediff.parity import make_pair  # lazy: torch only once a parity test runs

        self._item.stash.setdefault(PAIRS, []).append(make_pair(upstream, port, inputs, **options))


@pytest.fixture
def parity(request: pytest.FixtureRequest) -> Parity:
    """Compare an upstream model with its port; failures come with tracediff's diagnosis."""
    return Parity(request.node, _settings(request.config))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or item.stash.get(DIAGNOSED, False):
        return
    marker = item.get_closest_marker("tracediff_pair")
    if item.config.stash[OPTIONS]["mode"] == "off" or (marker is None and not item.stash.get(PAIRS, [])):
        return
    from tracediff.parity import artifact_dir, diagnose  # lazy: torch only once a parity test fails

    settings = _settings(item.config)
    registered: list[PairSpec] = item.stash.get(PAIRS, [])
    pairs = list(registered)
    if marker is not None:
        try:
            pairs.append(_pair_from_marker(item, marker))
        except Exception as exc:
            report.sections.append(("tracediff", f"tracediff: cannot use the tracediff_pair marker: {exc}"))
    for index, pair in enumerate(pairs):
        out_dir = artifact_dir(settings.root, item.nodeid + (f"-{index}" if index else ""))
        diagnosis = diagnose(pair, out_dir, settings)
        report.sections.append(("tracediff", diagnosis.section()))


def _pair_from_marker(item: pytest.Item, marker: pytest.Mark) -> PairSpec:
    from tracediff.parity import make_pair  # lazy: torch only once a parity test runs

    names = dict(zip(("upstream", "port", "inputs"), marker.args, strict=False))
    names.update({key: marker.kwargs[key] for key in ("upstream", "port", "inputs") if key in marker.kwargs})
    missing = [key for key in ("upstream", "port", "inputs") if key not in names]
    if missing:
        raise TypeError(f"tracediff_pair needs fixture names for {', '.join(missing)}")
    funcargs = getattr(item, "funcargs", {})
    values = {}
    for key, fixture_name in names.items():
        if fixture_name not in funcargs:
            raise LookupError(f"{key}={fixture_name!r} is not a fixture this test uses")
        values[key] = funcargs[fixture_name]
    options = {k: v for k, v in marker.kwargs.items() if k not in ("upstream", "port", "inputs")}
    return make_pair(values["upstream"], values["port"], values["inputs"], **options)
