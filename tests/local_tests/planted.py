"""Planted bugs: the ``Bug`` record and the plant helpers the FastVideo families (wan, umt5) share.

Nothing installed is edited: a run-time bug (``plant``) sets an attribute or
wraps one module's ``forward`` through pytest's ``monkeypatch`` (undone after
the test); a conversion bug (``convert``) edits the state dict the port is
loaded from, the way a wrong converter would (a fresh port is loaded for it).

Each bug names the port module where it lives, and how far a correct answer
may stray from it:

* ``scope="module"``: the bug is in that module's *own* code or parameters;
  only that module is the right answer.
* ``scope="subtree"``: the whole module computes differently (bf16), so it or
  any module inside it is right.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch
from torch import nn

Plant = Callable[[nn.Module, pytest.MonkeyPatch], None]
Convert = Callable[[dict[str, torch.Tensor]], None]
Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True)
class Bug:
    """One planted bug in the port.

    Attributes:
        name: short id (the table's row key).
        what: one line for the table.
        expected: the port module a correct tool names.
        scope: ``"module"`` (exactly ``expected``) or ``"subtree"`` (``expected`` or inside it).
        plant: applied to a loaded port (run-time bugs).
        convert: edits, in place, the state dict the port is loaded from (conversion bugs).
        why: why ``expected`` is the answer, when it is not obvious.
    """

    name: str
    what: str
    expected: str
    scope: Literal["module", "subtree"] = "module"
    plant: Plant | None = None
    convert: Convert | None = None
    why: str = ""

    def named_correctly(self, module: str | None) -> bool:
        if module is None:
            return False
        if self.scope == "subtree":
            return module == self.expected or module.startswith(self.expected + ".")
        return module == self.expected

    def apply(self, clean_port: nn.Module, monkeypatch: pytest.MonkeyPatch,
              load: Callable[[Convert], nn.Module]) -> nn.Module:
        """The port with this bug: ``load(convert)`` (a fresh port) for a conversion bug, else ``clean_port``
        with the bug planted (``monkeypatch`` undoes it after the test)."""
        if self.convert is not None:
            return load(self.convert)
        assert self.plant is not None
        self.plant(clean_port, monkeypatch)
        return clean_port


def set_attribute(path: str, attribute: str, value: Any) -> Plant:
    """Set ``attribute`` of the module at ``path``."""

    def plant(port: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(port.get_submodule(path), attribute, value)

    return plant


def wrap_forward(path: str, wrap: Wrap) -> Plant:
    """Replace the ``forward`` of the module at ``path`` by ``wrap(forward)``."""

    def plant(port: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        module = port.get_submodule(path)
        monkeypatch.setattr(module, "forward", functools.wraps(module.forward)(wrap(module.forward)))

    return plant


def bf16_autocast(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` run under CPU bf16 autocast: its matmuls in bf16, its output bf16."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original(*args, **kwargs)

    return forward


def in_bf16(path: str) -> Plant:
    """Run the module at ``path`` under CPU bf16 autocast."""
    return wrap_forward(path, bf16_autocast)
