"""The UMT5 family: transformers' UMT5 encoder (upstream) against FastVideo's (port).

These tests need transformers and FastVideo (which needs torchvision), which the
project's main environment does not install. Without them the whole folder is
skipped, with the reason, so a run of the main suite reports it as skipped,
never as passed. They run in ``.venv-vit`` (see README.md).
"""

from __future__ import annotations

import pytest

WHY = "the UMT5 parity family needs {}; it runs in .venv-vit (see tests/local_tests/umt5/README.md)"
transformers = pytest.importorskip("transformers", reason=WHY.format("transformers"))
fastvideo = pytest.importorskip("fastvideo", reason=WHY.format("fastvideo (and torchvision)"))

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import umt5_models  # noqa: E402
from bug_table import write_summary  # noqa: E402
from torch import nn  # noqa: E402

from tracediff.parity import Settings, diagnose, make_pair  # noqa: E402
from tracediff.pipeline.analyse import Analysis  # noqa: E402

PRESET = "fp32"

#: What each bug test found: ``{"first drift": name, "bisect": name}``, printed at the end.
BUG_ROWS = pytest.StashKey[dict[str, dict[str, str | None]]]()


@pytest.fixture(scope="session")
def upstream() -> nn.Module:
    """transformers' UMT5 encoder, tiny, every parameter re-drawn."""
    return umt5_models.make_upstream(seed=0)


@pytest.fixture(scope="session")
def upstream_state(upstream: nn.Module) -> dict[str, torch.Tensor]:
    """The upstream's state dict as a checkpoint holds it (the tied token table under both names)."""
    return dict(upstream.state_dict())


@pytest.fixture(scope="session")
def inputs() -> dict[str, torch.Tensor]:
    return umt5_models.make_inputs(seed=1)


@pytest.fixture(scope="session")
def clean_port(upstream_state: dict[str, torch.Tensor]) -> nn.Module:
    """FastVideo's UMT5 encoder loaded through its own ``load_weights``; bug tests monkeypatch it (undone after)."""
    return umt5_models.make_port(upstream_state)


@pytest.fixture(scope="session")
def param_map(upstream_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The port loader's name table in ``param_names_mapping`` form (see ``umt5_models.param_names_mapping``)."""
    return umt5_models.param_names_mapping(upstream_state)


@pytest.fixture(scope="session")
def clean_analysis(
    upstream: nn.Module,
    inputs: dict[str, torch.Tensor],
    clean_port: nn.Module,
    param_map: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], Analysis]:
    """``get(how)``: tracediff's diagnosis of the clean pair (traced, aligned, diffed), computed once.

    ``how`` is ``"inferred"`` (no help) or ``"param_map"`` (the port loader's name table).
    """
    cache: dict[str, Analysis] = {}

    def get(how: str) -> Analysis:
        if how not in cache:
            pair = make_pair(upstream, clean_port, inputs, preset=PRESET, upstream_call=umt5_models.upstream_call,
                             port_call=umt5_models.port_call, param_map=param_map if how == "param_map" else None)
            diagnosis = diagnose(pair, tmp_path_factory.mktemp(f"umt5-clean-{how}"), Settings())
            assert diagnosis.analysis is not None, diagnosis.error
            cache[how] = diagnosis.analysis
        return cache[how]

    return get


@pytest.fixture(scope="session")
def bug_rows(request: pytest.FixtureRequest) -> dict[str, dict[str, str | None]]:
    return request.config.stash.setdefault(BUG_ROWS, {})


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    from umt5_table import render_table

    write_summary(terminalreporter, config, BUG_ROWS, "UMT5 planted bugs: who names the culprit", render_table)
