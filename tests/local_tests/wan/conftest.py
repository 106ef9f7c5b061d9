"""The Wan family: diffusers' WanTransformer3DModel (upstream) against FastVideo's own (port).

These tests need diffusers and fastvideo (which needs torchvision), which the
project's main environment does not install; without them the folder is skipped,
with the reason. ``.ci/run`` runs this folder in the environment of the ViT family,
which has them (tests/local_tests/wan/README.md).
"""

from __future__ import annotations

import pytest

WHY = "the Wan parity family needs {}; .ci/run installs it in .venv-vit (see tests/local_tests/wan/README.md)"
pytest.importorskip("diffusers", reason=WHY.format("diffusers"))
pytest.importorskip("fastvideo", reason=WHY.format("fastvideo"))

import torch  # noqa: E402
import wan_models  # noqa: E402
from bug_table import write_summary  # noqa: E402
from torch import nn  # noqa: E402

#: What each bug test found, per tool: ``{(bug, tool): named module}``, printed at the end.
BUG_ROWS = pytest.StashKey[dict[str, dict[str, str | None]]]()


@pytest.fixture(scope="session")
def upstream() -> nn.Module:
    """diffusers' Wan DiT, tiny, every parameter re-drawn."""
    return wan_models.make_upstream(seed=0)


@pytest.fixture(scope="session")
def inputs() -> dict[str, torch.Tensor]:
    return wan_models.make_inputs(seed=1)


@pytest.fixture(scope="session")
def clean_port(upstream: nn.Module) -> nn.Module:
    """One clean converted port; run-time bugs monkeypatch it (undone after each test)."""
    return wan_models.make_port(upstream)


@pytest.fixture(scope="session")
def bug_rows(request: pytest.FixtureRequest) -> dict[str, dict[str, str | None]]:
    return request.config.stash.setdefault(BUG_ROWS, {})


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    from wan_table import render_table

    write_summary(terminalreporter, config, BUG_ROWS, "Wan planted bugs: who names the culprit", render_table)
