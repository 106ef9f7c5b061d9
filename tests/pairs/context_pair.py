"""A plain-torch stand-in for FastVideo's forward context: modules that only run inside ``forward_context()``.

FastVideo's attention layers call ``get_forward_context()``, which asserts that
``set_forward_context(...)`` is active; this pair does the same with a context
variable, so tests of tracediff's ``context=`` need no FastVideo install. The
real FastVideo Wan DiT is exercised in tests/local_tests/wan.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_CONTEXT: contextvars.ContextVar[float | None] = contextvars.ContextVar("forward_context", default=None)


@contextlib.contextmanager
def forward_context(timestep: float = 0.0) -> Iterator[None]:
    token = _CONTEXT.set(timestep)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def context_of(inputs: Any) -> contextlib.AbstractContextManager[None]:
    """The context function a user gives tracediff: the step's inputs in, the context manager out."""
    return forward_context(float(inputs["t"]))


class NeedsContext(nn.Module):
    """Scales by the context's timestep: fails outside ``forward_context``, like FastVideo's attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        timestep = _CONTEXT.get()
        if timestep is None:
            raise AssertionError("Forward context is not set. Please use `forward_context` to set it.")
        return x * (1.0 + timestep)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.core = NeedsContext()
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.core(torch.tanh(self.fc(x))))


class Model(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def make_pair(*, bug: bool = False) -> tuple[Model, Model, dict[str, torch.Tensor]]:
    """Two copies with the same weights; ``bug``: the port's block 1 uses tanh's cousin in its own forward."""
    torch.manual_seed(0)
    upstream = Model().eval()
    port = Model().eval()
    port.load_state_dict(upstream.state_dict())
    if bug:
        block = port.blocks[1]
        block.forward = lambda x: x + block.out(block.core(torch.sigmoid(block.fc(x))))  # type: ignore[method-assign]
    return upstream, port, {"x": torch.randn(2, 8), "t": torch.tensor(0.5)}


def build_upstream() -> Model:
    return make_pair()[0]


def build_port(bug: bool = False) -> Model:
    return make_pair(bug=bug)[1]


def make_inputs() -> dict[str, torch.Tensor]:
    return make_pair()[2]
