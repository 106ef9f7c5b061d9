"""Local-error isolation (teacher forcing): each module's own error, in one forward pass.

The upstream model runs first and keeps the full outputs (and inputs) of the
aligned modules of one level. The port then runs with hooks that, after each of
those modules, measure the port's own output against the upstream's and hand the
*upstream's* output on to the rest of the network. Where a module's tensor
inputs have the same structure on both sides (count and shapes), its inputs are
replaced by the upstream's as well, so code that runs between two forced
modules (a parent's glue code) cannot leak its error into the next module's
figure: it shows up in the parent's local error instead.

A third pass runs the port freely to measure each module's *accumulated* error,
the one a first-drift report shows; ``accumulated / local`` is how much the
error reaching that module was amplified by everything before it.

Modules whose outputs are not structurally compatible (a different number of
tensors, different shapes, complex against real) are not isolatable: they are
reported with the reason and left unforced. A per-module transform may adapt the
upstream output to the port's layout first.

Where a module's inputs are captured, so is the ``torch.autocast`` state its
forward was called under (set by an ancestor's forward, or by the call function):
the operator level re-runs the module alone under the same autocast.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tracediff.bisect.metrics import Metrics, combine, compare
from tracediff.bisect.tree import replace_leaves, shapes, snapshot, tensor_leaves
from tracediff.tolerance import Tolerance

CallFn = Callable[[nn.Module, Any], Any]
#: The autocast a module was called under: ``(device type, dtype)`` per device type where it was enabled.
Autocast = tuple[tuple[str, torch.dtype], ...]
#: Device types whose autocast state is always checked (besides those of the inputs and parameters).
_AUTOCAST_DEVICES = ("cpu", "cuda")
#: ``upstream output -> the same output in the port's layout``, per port module.
Transform = Callable[[Any], Any]


@dataclass
class CallRecord:
    """One call of one module in one pass.

    Attributes:
        seq: when the call started, counted over all hooked calls of the pass.
        output: the output with tensors cloned (reference passes only).
        inputs: ``(args, kwargs)`` as the module consumed them, cloned (when captured).
        local: the port's own output against the reference (forced and free passes).
        input_drift: the port's own inputs against the reference's, before they were replaced.
        inputs_forced: whether the reference's inputs were handed to the module.
        reason: why the output could not be forced (empty when it was).
        autocast: the autocast the module was called under (when its inputs were captured).
    """

    seq: int
    output: Any = None
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    local: Metrics | None = None
    input_drift: Metrics | None = None
    inputs_forced: bool = False
    reason: str = ""
    autocast: Autocast = ()


@dataclass
class Pass:
    """What one forward pass recorded: the model output and each hooked module's calls."""

    output: Any
    calls: dict[str, list[CallRecord]] = field(default_factory=dict)


class Hooks:
    """Forward hooks on a set of modules of one model for one pass; removed on exit.

    Args:
        model: the model to hook.
        record: module names whose outputs are cloned and kept (reference passes).
        capture_inputs: module names whose inputs are cloned and kept.
        reference: per module name, the reference pass's calls: their outputs are
            what measured modules are compared with and forced modules are given.
        measure: module names whose own output is compared with ``reference``.
        force: module names whose output is replaced by ``reference``'s.
        force_inputs: module names whose inputs are replaced by ``reference``'s when compatible.
        counterpart: module name -> name of its counterpart in ``reference``.
        transforms: module name -> transform of the reference output into this model's layout.
        tolerance: module name -> tolerance used for its metrics.
        keep_on: where recorded outputs and inputs are kept (``"cpu"`` for ``low_memory``);
            default the device they were computed on. Kept tensors are moved back one at a
            time where they are compared or handed on.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        record: Iterable[str] = (),
        capture_inputs: Iterable[str] = (),
        reference: Mapping[str, list[CallRecord]] | None = None,
        measure: Iterable[str] = (),
        force: Iterable[str] = (),
        force_inputs: Iterable[str] = (),
        counterpart: Mapping[str, str] | None = None,
        transforms: Mapping[str, Transform] | None = None,
        tolerance: Callable[[str], Tolerance] | None = None,
        keep_on: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.keep_on = keep_on
        self.record = set(record)
        self.capture = set(capture_inputs)
        self.reference = reference or {}
        self.measure = set(measure)
        self.force = set(force)
        self.force_inputs = set(force_inputs)
        self.counterpart = dict(counterpart or {})
        self.transforms = dict(transforms or {})
        self.tolerance = tolerance or (lambda name: Tolerance())
        self.calls: dict[str, list[CallRecord]] = {}
        self._stack: dict[str, list[int]] = {}
        self._seq = 0
        self._handles: list[Any] = []

    def __enter__(self) -> Hooks:
        names = self.record | self.capture | self.measure | self.force | self.force_inputs
        modules = dict(self.model.named_modules())
        for name in sorted(names):
            module = modules.get(name)
            if module is None:
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks ------------------------------------------------------------------------

    def _ref_call(self, name: str, call: int) -> CallRecord | None:
        ref = self.reference.get(self.counterpart.get(name, name), [])
        return ref[call] if call < len(ref) else None

    def _pre(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            calls = self.calls.setdefault(name, [])
            record = CallRecord(seq=self._seq)
            self._seq += 1
            calls.append(record)
            self._stack.setdefault(name, []).append(len(calls) - 1)
            replaced = None
            ref = self._ref_call(name, len(calls) - 1) if name in self.force_inputs else None
            if ref is not None and ref.inputs is not None:
                own = list(tensor_leaves((args, kwargs)))
                theirs = _on_devices_of(list(tensor_leaves(ref.inputs)), own)
                if not incompatible(theirs, own):
                    tol = self.tolerance(name)
                    record.input_drift = combine([compare(o, t, tol) for o, t in zip(own, theirs, strict=True)])
                    replaced = replace_leaves((args, kwargs), iter(_cast_like(theirs, own)))
                    record.inputs_forced = True
            if name in self.capture:
                captured = replaced if replaced is not None else (args, kwargs)
                record.inputs = snapshot(captured, self.keep_on)
                record.autocast = autocast_state(device_types(module, captured))
            return replaced

        return hook

    def _post(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            call = self._stack[name].pop()
            record = self.calls[name][call]
            if name in self.record:
                record.output = snapshot(output, self.keep_on)
            if name not in self.measure and name not in self.force:
                return None
            ref = self._ref_call(name, call)
            if ref is None:
                record.reason = f"its upstream counterpart ran fewer than {call + 1} time(s) in this step"
                return None
            expected = ref.output
            transform = self.transforms.get(name)
            if transform is not None:
                expected = transform(expected)
            own = list(tensor_leaves(output))
            theirs = _on_devices_of(list(tensor_leaves(expected)), own)
            problem = incompatible(theirs, own)
            if problem:
                record.reason = problem
                return None
            if name in self.measure:
                tol = self.tolerance(name)
                record.local = combine([compare(o, t, tol) for o, t in zip(own, theirs, strict=True)])
            if name in self.force:
                return replace_leaves(output, iter(_cast_like(theirs, own)))
            return None

        return hook


def incompatible(reference: list[torch.Tensor], own: list[torch.Tensor]) -> str:
    """Why ``reference`` cannot stand in for ``own`` (empty string when it can)."""
    if len(reference) != len(own):
        return f"upstream gives {len(reference)} tensor(s) [{shapes(reference)}], the port {len(own)} [{shapes(own)}]"
    if not own:
        return "its output holds no tensor"
    for index, (theirs, mine) in enumerate(zip(reference, own, strict=True)):
        if theirs.shape != mine.shape:
            return (f"tensor {index}: upstream shape {tuple(theirs.shape)} vs port {tuple(mine.shape)} "
                    "(a transform can adapt the layout)")
        if theirs.is_complex() != mine.is_complex() or theirs.is_floating_point() != mine.is_floating_point():
            return f"tensor {index}: upstream dtype {theirs.dtype} vs port {mine.dtype}"
    return ""


def _on_devices_of(values: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Kept tensors moved to the devices of the live ones they stand for (a no-op unless kept elsewhere)."""
    if len(values) != len(like):
        return values
    return [v if v.device == o.device else v.to(o.device) for v, o in zip(values, like, strict=True)]


def _cast_like(values: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [v.to(device=o.device, dtype=o.dtype).clone() for v, o in zip(values, like, strict=True)]


def device_types(module: nn.Module, inputs: Any) -> list[str]:
    """Device types whose autocast may matter to ``module`` run on ``inputs``: cpu, cuda and their own."""
    found = dict.fromkeys(_AUTOCAST_DEVICES)
    for tensor in tensor_leaves(inputs):
        found[tensor.device.type] = None
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        found[tensor.device.type] = None
        break
    return list(found)


def _autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` right now, ``None`` where it is off (or unknown)."""
    try:
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    except (RuntimeError, ValueError, TypeError):  # a device type autocast does not know (meta, ...)
        return None


def autocast_state(devices: Iterable[str]) -> Autocast:
    """The autocast enabled now on ``devices``: ``(device type, dtype)`` per device where it is on."""
    state = []
    for device in devices:
        dtype = _autocast_dtype(device)
        if dtype is not None:
            state.append((device, dtype))
    return tuple(state)


@contextlib.contextmanager
def autocast_as(state: Autocast, devices: Iterable[str]) -> Iterator[None]:
    """Run under exactly the autocast ``state`` on ``devices`` (and ``state``'s own), entering or leaving it."""
    wanted = dict(state)
    with contextlib.ExitStack() as stack:
        for device in dict.fromkeys([*wanted, *devices]):
            dtype = wanted.get(device)
            if dtype != _autocast_dtype(device):
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=dtype is not None))
        yield


def describe_autocast(state: Autocast) -> str:
    """``torch.autocast('cpu', dtype=torch.bfloat16)``, or ``no autocast``."""
    if not state:
        return "no autocast"
    return " and ".join(f"torch.autocast({device!r}, dtype={dtype})" for device, dtype in state)


def run_pass(model: nn.Module, call: CallFn, inputs: Any, hooks: Hooks) -> Pass:
    """One forward pass under ``hooks``; the model output is cloned."""
    with hooks, torch.no_grad():
        output = call(model, inputs)
    return Pass(output=snapshot(output), calls=hooks.calls)


def resolve_transforms(transforms: Mapping[str, Transform] | None, names: Iterable[str]) -> dict[str, Transform]:
    """Per-module transforms: keys are port module names or regexes (``re.fullmatch``)."""
    if not transforms:
        return {}
    out: dict[str, Transform] = {}
    for name in names:
        if name in transforms:
            out[name] = transforms[name]
            continue
        for pattern, transform in transforms.items():
            if re.fullmatch(pattern, name):
                out[name] = transform
                break
    return out
