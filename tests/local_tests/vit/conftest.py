"""The ViT family: timm (upstream) against transformers and torchvision (ports).

These tests need timm, transformers and torchvision, which the project's main
environment does not install (torchvision from PyPI does not import beside the
pinned CPU torch 2.13.0). Without them the whole folder is skipped, with the
reason, so a run of the main suite reports it as skipped, never as passed.
``.ci/run`` builds a second environment that has them and runs this folder there.
"""

from __future__ import annotations

import pytest

WHY = "the ViT parity family needs {}; .ci/run installs it in .venv-vit (see tests/local_tests/vit/README.md)"
timm = pytest.importorskip("timm", reason=WHY.format("timm"))
transformers = pytest.importorskip("transformers", reason=WHY.format("transformers"))
torchvision = pytest.importorskip("torchvision", reason=WHY.format("torchvision"))

from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import vit_models  # noqa: E402
from torch import nn  # noqa: E402
from vit_ports import PORTS  # noqa: E402

from tracediff.parity import Settings, diagnose, make_pair  # noqa: E402
from tracediff.pipeline.analyse import Analysis  # noqa: E402

PRESET = "fp32"


#: What each (port, bug) test found: ``{"first drift": name, "bisect": name}``, printed at the end.
BUG_ROWS = pytest.StashKey[dict[tuple[str, str], dict[str, str | None]]]()


@pytest.fixture(scope="session")
def upstream() -> nn.Module:
    """timm's ViT, tiny, every parameter re-drawn."""
    return vit_models.make_timm(seed=0)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    return vit_models.make_inputs(seed=1)


@pytest.fixture(scope="session")
def clean_ports(upstream: nn.Module) -> dict[str, nn.Module]:
    """One clean converted instance of each port; tests that plant a bug monkeypatch it (undone after)."""
    return {name: port.build(upstream) for name, port in PORTS.items()}


@pytest.fixture(scope="session")
def clean_analysis(
    upstream: nn.Module,
    images: torch.Tensor,
    clean_ports: dict[str, nn.Module],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str, str], Analysis]:
    """``get(port, how)``: tracediff's diagnosis of a clean pair (traced, aligned, diffed), computed once.

    ``how`` is ``"inferred"`` (no help) or ``"param_map"`` (the converter's ``param_names_mapping``).
    """
    cache: dict[tuple[str, str], Analysis] = {}

    def get(port_name: str, how: str) -> Analysis:
        if (port_name, how) not in cache:
            port = PORTS[port_name]
            pair = make_pair(upstream, clean_ports[port_name], images, preset=PRESET, port_call=port.call,
                             param_map=port.mapping if how == "param_map" else None)
            diagnosis = diagnose(pair, tmp_path_factory.mktemp(f"{port_name}-{how}"), Settings())
            assert diagnosis.analysis is not None, diagnosis.error
            cache[(port_name, how)] = diagnosis.analysis
        return cache[(port_name, how)]

    return get


@pytest.fixture(scope="session")
def bug_rows(request: pytest.FixtureRequest) -> dict[tuple[str, str], dict[str, str | None]]:
    return request.config.stash.setdefault(BUG_ROWS, {})


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    rows = config.stash.get(BUG_ROWS, {})
    if not rows:
        return
    from vit_table import render_table

    terminalreporter.write_sep("=", "ViT planted bugs: who names the culprit")
    terminalreporter.write_line(render_table(rows))
