"""The context a model must run in (FastVideo's ``set_forward_context``), entered around every call tracediff makes.

Some frameworks only run a model inside a context manager the pipeline sets up:
FastVideo's modules assert that ``set_forward_context(...)`` is active. A user
gives tracediff a *context function*: called with the step's model inputs (or
with nothing, if it takes no argument), it returns that context manager.
tracediff enters it around every forward it runs: whole-model passes, traced
passes, and the single-module re-runs of bisection's operator level, which no
user ``call`` function could wrap.

It also holds the two other things every caller of a model shares: how inputs are passed (:func:`default_call`) and
each side's private copy of them (:func:`clone_inputs`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

ContextFn = Callable[..., AbstractContextManager[Any]]
CallFn = Callable[[Any, Any], Any]


def enter(context: ContextFn | None, inputs: Any) -> AbstractContextManager[Any]:
    """The context manager for one call on ``inputs`` (a no-op without a context function)."""
    if context is None:
        return contextlib.nullcontext()
    manager = context(inputs) if _takes_inputs(context) else context()
    if not hasattr(manager, "__enter__"):
        raise TypeError(f"context function {_name(context)} returned {type(manager).__name__}, "
                        "not a context manager (a function decorated with @contextlib.contextmanager, or "
                        "one returning e.g. set_forward_context(...))")
    return manager


def with_context(call: CallFn, context: ContextFn | None) -> CallFn:
    """``call(model, inputs)`` run inside ``context``'s manager for those inputs."""
    if context is None:
        return call

    def called_in_context(model: Any, inputs: Any) -> Any:
        with enter(context, inputs):
            return call(model, inputs)

    return called_in_context


def pick(context: ContextFn | None, side_context: ContextFn | None) -> ContextFn | None:
    """A side's own context function wins over the one given for both sides."""
    return side_context if side_context is not None else context


def _takes_inputs(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume it takes the inputs
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return bool(positional)


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def default_call(fn: Callable[..., Any], inputs: Any) -> Any:
    """``fn(**inputs)`` for a mapping, ``fn(*inputs)`` for a list or tuple, else ``fn(inputs)``."""
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    if isinstance(inputs, (list, tuple)):
        return fn(*inputs)
    return fn(inputs)


def clone_inputs(inputs: Any, *, device: str | None = None, dtype: torch.dtype | None = None) -> Any:
    """A private copy of the inputs for one side: tensors cloned (and moved, floats cast)."""
    if isinstance(inputs, torch.Tensor):
        moved = inputs.detach().clone()
        moved = moved.to(device) if device is not None else moved
        return moved.to(dtype) if dtype is not None and moved.is_floating_point() else moved
    if isinstance(inputs, Mapping):
        return {key: clone_inputs(value, device=device, dtype=dtype) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(clone_inputs(value, device=device, dtype=dtype) for value in inputs)
    return copy.deepcopy(inputs)
