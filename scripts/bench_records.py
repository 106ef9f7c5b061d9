"""How many records a traced forward must write, counted with plain PyTorch hooks (shared by the benchmarks).

A benchmark must not report the cost of a trace that failed or wrote fewer records than the forward
made: counting the module calls and their tensors independently of tracediff gives the expected number.
Plain hooks only, no tracediff internals.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def tensor_leaves(obj: Any, depth: int = 0) -> int:
    """Tensors inside a module's output or arguments (tuples, lists, mappings, dataclasses), as a tracer walks them."""
    if isinstance(obj, torch.Tensor):
        return 1
    if depth >= 16:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(tensor_leaves(item, depth + 1) for item in obj)
    if isinstance(obj, Mapping):
        return sum(tensor_leaves(item, depth + 1) for item in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_leaves(getattr(obj, f.name, None), depth + 1) for f in dataclasses.fields(obj))
    return 0


@dataclasses.dataclass
class CallCounts:
    """Per module name (``""``: the model): calls, output tensors and input tensors in one forward."""

    calls: dict[str, int]
    outputs: dict[str, int]
    inputs: dict[str, int]

    def selected(self, layers: str | None) -> list[str]:
        pattern = re.compile(layers) if layers else None
        return [n for n in self.calls if n and (pattern is None or pattern.search(n))]

    def expected_records(self, layers: str | None, inputs: bool) -> int:
        """Records one traced forward must add: the model's own inputs and output, each traced call's tensors."""
        names = self.selected(layers)
        total = self.inputs[""] + self.outputs[""] + sum(self.outputs[n] for n in names)
        return total + (sum(self.inputs[n] for n in names) if inputs else 0)

    def output_tensors(self, layers: str | None) -> int:
        """Output tensors of the traced calls (a JSON-lines tracer writes one line each)."""
        return sum(self.outputs[n] for n in self.selected(layers))

    def traced_calls(self, layers: str | None) -> int:
        return sum(self.calls[n] for n in self.selected(layers))


def count_calls(model: nn.Module, run: Callable[[], Any]) -> CallCounts:
    """Run ``run()`` once with plain PyTorch hooks on every module of ``model``, counting calls and tensors."""
    calls = {name: 0 for name, _ in model.named_modules()}
    outputs = dict.fromkeys(calls, 0)
    inputs = dict.fromkeys(calls, 0)
    handles = []
    for name, module in model.named_modules():

        def pre(module: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
            inputs[name] += tensor_leaves(args) + tensor_leaves(kwargs)

        def post(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
            calls[name] += 1
            outputs[name] += tensor_leaves(output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return CallCounts(calls, outputs, inputs)


class TraceRefused(RuntimeError):
    """The measured trace is broken: no figure may be reported for it."""


def check_trace(handle: Any, mode: str, expected: int) -> None:
    """Refuse a trace that failed or holds another number of records than the forwards made."""
    if handle.failures:
        raise TraceRefused(f"mode {mode!r}: the trace failed: {handle.failures}")
    if handle.records_written != expected:
        raise TraceRefused(
            f"mode {mode!r}: the trace holds {handle.records_written} records, expected {expected} "
            "from the module calls counted"
        )
