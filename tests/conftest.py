"""Shared test models: small, real ``nn.Module``s with known structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tracediff.config import (
    ENV_ACTIVATIONS,
    ENV_INPUTS,
    ENV_LAYERS,
    ENV_OUTPUT,
    ENV_OVERWRITE,
    ENV_RANKS,
    ENV_RANKS_FASTVIDEO,
    ENV_SAMPLE_SIZE,
    ENV_STATS,
    ENV_STEPS,
)

pytest_plugins = ["pytester"]

TRACE_ENV = (
    ENV_ACTIVATIONS, ENV_LAYERS, ENV_STATS, ENV_STEPS, ENV_OUTPUT, ENV_SAMPLE_SIZE, ENV_RANKS, ENV_RANKS_FASTVIDEO,
    ENV_OVERWRITE, ENV_INPUTS,
)


class Block(nn.Module):
    """A residual MLP block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(self.norm(x)))


class TinyNet(nn.Module):
    """Embedding, a stack of blocks, a head: the shape of every DiT, in miniature."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture(autouse=True)
def _clean_trace_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never inherit tracing variables from the shell that runs them."""
    for name in TRACE_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()
