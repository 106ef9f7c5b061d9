"""The recorder: forward hooks that turn module outputs into trace records.

Hooks do as little as possible while the model runs: they queue on-device
moment vectors and sample gathers (and, for ``full``, an asynchronous copy into
pinned host memory), and the recorder moves a whole step to the host in one
transfer per device when the step ends. An exception in a hook does not reach
the model: it warns once for that module and lets the forward go on.

On an accelerator nothing in a hook or at a step's end waits for the device:
the step's copies are queued behind the step's kernels, and a
:class:`~tracediff.store.background.BackgroundWriter` thread waits for them and
writes the step while the model runs on. Traces of CPU models are written
synchronously at each step's end, as there is no device to overlap with.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tracediff.config import TraceConfig
from tracediff.hooks import steps as step_state
from tracediff.hooks.flatten import iter_inputs, iter_tensors
from tracediff.hooks.stats import (
    copy_full_to_host,
    copy_stream,
    full_dtype,
    moments,
    producer_stream,
    take_sample,
    wait_for_producers,
)
from tracediff.store.background import BackgroundWriter
from tracediff.store.format import FULL_F32, FULL_F64, FULL_NONE, MAX_DIMS, RECORD_COLUMNS
from tracediff.store.writer import StepBatch, TraceWriter
from tracediff.vocabulary import error_summary

ROOT_INDEX = 0

_NO_CONTEXT = contextlib.nullcontext()
#: ``input[0]``, ``input[1]``, ...: the labels of positional arguments, made once
_INPUT_LABELS = tuple(f"input[{i}]" for i in range(64))
_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _input_label(position: int) -> str:
    return _INPUT_LABELS[position] if position < len(_INPUT_LABELS) else f"input[{position}]"


def _dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16`` (cached: ``str(dtype)`` costs a microsecond per record)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


@dataclass(slots=True)
class _Pending:
    seq: int
    step: int
    module: int
    call: int
    label: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    moments: torch.Tensor | None
    sample: torch.Tensor | None
    full: torch.Tensor | None  # on the host (pinned and maybe still being filled, for a CUDA tensor)
    full_device: torch.device | None = None
    #: the CUDA stream the hook queued ``moments``/``sample`` on: the flush waits for it
    stream: Any = None


@dataclass
class _CallStart:
    """Where a top-level call of the model began: what to roll back to if it raises."""

    pending: int
    seq: int
    step: int | None
    calls: dict[int, int]
    input_calls: dict[int, int]
    exception: BaseException | None  # the exception being handled when the call began (usually None)


#: Hook events between which only PyTorch's own code runs, never the model's: ``nn.Sequential.forward``
#: passes its input to its first child, each child's output to the next, and returns its last child's.
_Pair = tuple[str, int, str, int]


class Recorder:
    """Owns the hooks on one model and the writer of its trace file."""

    def __init__(self, model: nn.Module, *, config: TraceConfig, writer: TraceWriter, module_names: list[str]) -> None:
        self.config = config
        self.writer = writer
        self._background: BackgroundWriter | None = None
        self.module_names = module_names
        self.records_written = 0
        self.steps_written: list[int] = []
        self.failures: dict[str, str] = {}
        self._handles: list[RemovableHandle] = []
        self._lock = threading.RLock()
        self._pending: list[_Pending] = []
        self._calls: defaultdict[int, int] = defaultdict(int)
        self._input_calls: defaultdict[int, int] = defaultdict(int)
        #: id(tensor) -> (weak reference, version counter, reductions, hook event) of this step's captures
        self._reductions: dict[int, tuple[weakref.ref[torch.Tensor], int, tuple[Any, Any, Any], int]] = {}
        self._event_id = 0
        self._last_event: tuple[str, int, nn.Module | None, int] | None = None  # kind, module, object, thread
        self._reuse_from = 0  # captures made at or after this hook event may be reused
        self._safe_pairs: set[_Pair] = set()
        self._calls_open: list[_CallStart] = []
        #: top-level calls of the model that raised; their records were dropped (see :meth:`_drop_call`)
        self.failed_calls = 0
        self._seq = 0
        self._depth = 0
        self._auto_next = 0
        self._step: int | None = None
        self._call_start = (0, 0)
        self._stopped = False
        self._step_thread: int | None = None  # the thread whose hooks opened self._step
        self._closed = False
        #: a call opened by a submodule that ran outside any call of the attached model (a wrapper's
        #: ``wrapper.model(x)``): (index of the module whose return closes it, where it began)
        self._implicit: tuple[int, _CallStart] | None = None
        #: hooked module index -> its outermost hooked ancestor-or-self below the root that has a forward
        self._owners: dict[int, int] = {}
        self._model_name = type(model).__name__
        self._steps_skipped: set[int] = set()  # steps whose hooks fired but that config.steps leaves out
        self._want_sample = "sample" in config.stats
        self._want_full = "full" in config.stats
        self._want_moments = config.needs_moments
        self._sample_size = config.sample_size
        self._steps = config.steps  # None: every step (what config.wants_step tests, without the call)
        self._attach(model)
        step_state.register(self)

    # -- hook registration ---------------------------------------------------
    def _attach(self, model: nn.Module) -> None:
        #: selected modules that could not be hooked (a ``torch.jit.script``ed one, a module refusing
        #: hooks): name -> why; ``attach`` warns once and records them in the trace's ``untraced``
        self.untraced: dict[str, str] = {}
        self._handles.append(model.register_forward_pre_hook(self.begin_call, with_kwargs=True))
        # always_call: the hook also runs when the forward raises (with output None), so the call
        # depth returns to 0 and the failed call's records are dropped (see _root_hook).
        self._handles.append(model.register_forward_hook(self._root_hook, always_call=True))
        traced = {ROOT_INDEX}
        selected = [i for i, n in enumerate(self.module_names) if i != ROOT_INDEX and self.config.layer_predicate(n)]
        scripted = _scripted_modules(model, self.module_names)
        for index in selected:
            if index in scripted:
                self.untraced[self.module_names[index]] = scripted[index]
        selected = [index for index in selected if index not in scripted]
        self._owners = _call_owners(model, self.module_names, selected)
        for index in selected:
            module = model.get_submodule(self.module_names[index])
            registered: list[RemovableHandle] = []
            try:
                if self.config.inputs:
                    registered.append(module.register_forward_pre_hook(self._make_pre_hook(index), with_kwargs=True))
                # always_call: a child that raises (caught inside the model) still takes its call number,
                # so its input records and its later calls' outputs keep matching call indices.
                registered.append(module.register_forward_hook(self._make_hook(index), always_call=True))
            except Exception as exc:  # a module whose class refuses hooks: skip it, never fail the run
                for handle in registered:
                    handle.remove()
                self.untraced[self.module_names[index]] = _refusal(exc)
                continue
            self._handles.extend(registered)
            traced.add(index)
        for owner in sorted(set(self._owners.values()) - traced):
            # an untraced owner (the ``model`` of a wrapper when only its blocks are traced): its return
            # closes a call that its traced submodules opened
            module = model.get_submodule(self.module_names[owner])
            try:
                self._handles.append(module.register_forward_hook(self._make_owner_hook(owner), always_call=True))
            except Exception as exc:
                self.untraced.setdefault(self.module_names[owner], _refusal(exc))
        self._traced_count = len(traced)
        self._safe_pairs = _sequential_pairs(model, self.module_names, traced)

    def _make_hook(self, index: int) -> Any:
        owner = self._owners.get(index)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._depth:
                self._open_implicit(owner)
            self._guarded(index, self._record_output, index, output, module)
            if self._implicit is not None and self._implicit[0] == index:
                self._close_implicit(index)

        return hook

    def _make_pre_hook(self, index: int) -> Any:
        owner = self._owners.get(index)

        # A pre-hook, not the forward hook's ``args``: an in-place forward (ReLU(inplace=True))
        # would already have overwritten them.
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            if not self._depth:
                self._open_implicit(owner)
            self._guarded(index, self._record_module_inputs, index, args, kwargs, module)

        return hook

    def _make_owner_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._implicit is not None and self._implicit[0] == index:
                self._close_implicit(index)

        return hook

    @property
    def hook_count(self) -> int:
        return len(self._handles)

    # -- step tracking -------------------------------------------------------
    def begin_call(self, module: nn.Module, args: Any, kwargs: Any, *, record_inputs: bool = True) -> None:
        """A top-level call of the model starts: open its step (unless one is open) and record its inputs.

        Registered as the root's forward pre-hook; the script tracer calls it by hand for the
        one call during which it attached (see :meth:`record_late_inputs`).
        """
        with self._lock:
            if self._implicit is not None:
                # the root cannot run inside its own submodule: that call's owner never returned
                # (its submodule was called directly, bypassing it); commit what it recorded
                self._close_implicit(self._implicit[0], stale=True)
            self._calls_open.append(self._open_call())
        if record_inputs:
            self._guarded(ROOT_INDEX, self._record_module_inputs, ROOT_INDEX, args, kwargs, module)

    def _open_call(self) -> _CallStart:
        """A call starts: open its step (an implicit one when no ``trace_step`` is open and none is running)."""
        if self._depth == 0 and step_state.current_step() is None:
            self._begin_step(self._auto_next)
            self._auto_next += 1
        elif step_state.current_step() is not None and step_state.current_step() != self._step:
            self._begin_step(step_state.current_step())
        self._depth += 1
        self._call_start = (len(self._pending), self._seq)
        return _CallStart(
            len(self._pending), self._seq, self._step, dict(self._calls), dict(self._input_calls), sys.exc_info()[1]
        )

    def _open_implicit(self, owner: int | None) -> None:
        """A traced submodule runs while no call of the attached model is open: it opens the call itself.

        Attaching to a wrapper whose code calls ``wrapper.model(x)`` runs ``model`` but never the
        wrapper's own forward. The first hook event of such a run opens a call, numbered like a
        call of the attached model (one implicit step per such call, or the ``trace_step`` step);
        it is closed, committed, or dropped if it raised, when ``owner`` returns: the outermost
        module with a forward around that submodule (``model``).
        """
        with self._lock:
            if self._depth or owner is None or self._closed:
                return
            self._implicit = (owner, self._open_call())

    def _close_implicit(self, owner: int, *, stale: bool = False) -> None:
        """``owner`` returned (or raised): end the call that a submodule of it opened; see :meth:`_root_hook`."""
        with self._lock:
            if self._implicit is None or self._implicit[0] != owner:
                return
            start = self._implicit[1]
            self._implicit = None
            error = None if stale else sys.exc_info()[1]
            failed = error is not None and error is not start.exception
            if failed:
                self._drop_call(start)
            self._depth = max(self._depth - 1, 0)
            at_end = self._depth == 0 and step_state.current_step() is None and self._step is not None
            if at_end and (self._pending or not failed):
                self._flush(self._step)  # type: ignore[arg-type]

    def record_late_inputs(self, args: Any, kwargs: Any) -> None:
        """Record a top-level call's inputs after the fact, placed before that call's other records.

        For callers that could only start the step once the call was under way
        (the script tracer attaches to a model during its first call).
        """
        with self._lock:
            position, seq = self._call_start
            before = len(self._pending)
            self._guarded(ROOT_INDEX, self._record_module_inputs, ROOT_INDEX, args, kwargs, None, "late")
            late = self._pending[before:]
            del self._pending[before:]
            self._pending[position:position] = late
            for offset, item in enumerate(self._pending[position:]):
                item.seq = seq + offset

    def _root_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        """A top-level call returned, or raised (registered with ``always_call``; ``output`` is then None).

        A call raised when an exception is being handled that was not being handled when
        it began (torch runs always-call hooks inside its ``except`` block). Its records,
        partial by nature, are dropped and the call counters rolled back, as if the call
        had not been made; in implicit-step mode the step number it took stays unused.
        """
        with self._lock:
            start = self._calls_open.pop() if self._calls_open else None
        failed = start is not None and sys.exc_info()[1] is not None and sys.exc_info()[1] is not start.exception
        if not failed:
            self._guarded(ROOT_INDEX, self._record_output, ROOT_INDEX, output, module)
        with self._lock:
            if failed:
                self._drop_call(start)  # type: ignore[arg-type]
            self._depth = max(self._depth - 1, 0)
            # a failed call leaves no empty step behind
            at_end = self._depth == 0 and step_state.current_step() is None and self._step is not None
            if at_end and (self._pending or not failed):
                self._flush(self._step)  # type: ignore[arg-type]

    def _drop_call(self, start: _CallStart) -> None:
        """Forget the records of a top-level call that raised; its call numbers are given back."""
        self.failed_calls += 1
        if self._step != start.step or len(self._pending) < start.pending:
            return  # the call spanned a step boundary (trace_step inside the forward): keep what was committed
        del self._pending[start.pending :]
        self._seq = start.seq
        self._calls = defaultdict(int, start.calls)
        self._input_calls = defaultdict(int, start.input_calls)

    def _begin_step(self, step: int) -> None:
        if self._step is not None and self._step != step and self._pending:
            self._flush(self._step)
        self._step = step
        self._step_thread = threading.get_ident()
        self._calls.clear()
        self._input_calls.clear()

    def end_step(self, step: int) -> None:
        """Called when a ``trace_step`` block exits: commit that step."""
        with self._lock:
            # Only the thread running this step ends it: another thread's model may be at the same step number.
            if self._step == step and self._step_thread == threading.get_ident():
                self._flush(step)
                self._step = None

    def _current(self) -> int | None:
        explicit = step_state.current_step()
        if explicit is not None:
            if explicit != self._step:
                self._begin_step(explicit)
            return explicit
        return self._step

    # -- capture ---------------------------------------------------------------
    def _guarded(self, index: int, fn: Any, *args: Any) -> None:
        if self._stopped:
            return
        try:
            fn(*args)
        except Exception as exc:  # a hook must never break the model's forward
            name = self.module_names[index] or "<model>"
            if name not in self.failures:
                # One line: PyTorch's dispatch errors carry a 14 kB list of backends.
                self.failures[name] = error_summary(exc)
                warnings.warn(
                    f"tracediff: recording {name!r} failed ({self.failures[name]}); this module's records are "
                    "skipped, the model runs on unchanged",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _record_module_inputs(
        self, index: int, args: Any, kwargs: Any, module: nn.Module | None = None, kind: str = "pre"
    ) -> None:
        """One call's tensor arguments, numbered like the call's outputs (calls start and end in order).

        Labelled as :func:`~tracediff.hooks.flatten.iter_inputs` labels them; a bare tensor
        argument (the common case) skips the generic walk.
        """
        with self._lock:
            self._enter_event(kind, index, module)
            step = self._current()
            if step is None or (self._steps is not None and step not in self._steps):
                self._skipped(step)
                return
            call = self._input_calls[index]
            self._input_calls[index] = call + 1
            capture = self._capture
            for position, value in enumerate(args):
                if isinstance(value, torch.Tensor):
                    capture(step, index, call, _input_label(position), value)
                else:
                    for label, tensor in iter_tensors(value, f"input[{position}]"):
                        capture(step, index, call, label, tensor)
            if kwargs:
                for label, tensor in iter_inputs((), kwargs):
                    capture(step, index, call, label, tensor)

    def _record_output(self, index: int, output: Any, module: nn.Module | None = None) -> None:
        with self._lock:
            self._enter_event("post", index, module)
            step = self._current()
            if step is None or (self._steps is not None and step not in self._steps):
                self._skipped(step)
                return
            call = self._calls[index]
            self._calls[index] = call + 1
            if isinstance(output, torch.Tensor):  # the common case: no generic walk
                self._capture(step, index, call, "out", output)
                return
            for label, tensor in iter_tensors(output):
                self._capture(step, index, call, label, tensor)

    def _skipped(self, step: int | None) -> None:
        if step is not None and len(self._steps_skipped) < 1000:
            self._steps_skipped.add(step)

    def _capture(self, step: int, module: int, call: int, label: str, tensor: torch.Tensor) -> None:
        if tensor.is_meta:  # fail this module now; its stats would fail the whole step's flush
            raise ValueError("a meta tensor holds no data to record")
        stats, sample, full = self._reduced(tensor)
        self._pending.append(
            _Pending(
                self._seq,
                step,
                module,
                call,
                label,
                tuple(tensor.shape),
                _dtype_name(tensor.dtype),
                tensor.numel(),
                stats,
                sample,
                full,
                tensor.device,
                producer_stream(tensor) if tensor.is_cuda else None,
            )
        )
        self._seq += 1

    def _enter_event(self, kind: str, index: int, module: nn.Module | None) -> None:
        """A hook of ours fires: decide whether captures of the previous hook event may be reused.

        Reuse is safe only where no code but PyTorch's own can have run since that event.
        """
        self._event_id += 1
        previous, thread = self._last_event, threading.get_ident()
        safe = (
            previous is not None
            and previous[3] == thread
            and (previous[0], previous[1], kind, index) in self._safe_pairs
            and _only_our_hooks(previous[2], previous[0])
            and _only_our_hooks(module, kind)
        )
        self._reuse_from = self._event_id - 1 if safe else self._event_id
        self._last_event = (kind, index, module, thread)

    def _reduced(self, tensor: torch.Tensor) -> tuple[Any, Any, Any]:
        """Moments, sample and full copy of ``tensor``, reused when it was provably captured unchanged.

        With module inputs traced, most inputs are the previous module's output. The same
        tensor object at the same version counter is *not* proof of the same values:
        ``torch.distributed.all_reduce`` (tensor-parallel ports), writes through ``.data``
        and through ``.numpy()`` change values without bumping the version counter, and
        nothing short of reading the whole tensor again (what a reduction costs) can tell.
        So a capture is reused only within one hook event (a tensor passed twice) or from
        the hook event just before, when only PyTorch's own code ran in between:
        ``nn.Sequential`` handing a child's output to the next child (or its input to its
        first child, its last child's output back), with no hook but ours on either side
        (:func:`_sequential_pairs`, :func:`_only_our_hooks`). Anywhere the model's own
        forward runs in between, the tensor is reduced again: correct first, and cheap
        where reuse is provably safe. The weak reference proves it is that object still
        (an id alone could be a new tensor at a freed address); inference-mode tensors
        have no version counter and are always reduced.
        """
        cached = self._reductions.get(id(tensor))
        version = _version_of(tensor)
        if (
            cached is not None
            and version is not None
            and cached[0]() is tensor
            and cached[1] == version
            and cached[3] >= self._reuse_from
        ):
            self._reductions[id(tensor)] = (cached[0], version, cached[2], self._event_id)
            return cached[2]
        # no_grad only where grad is on: entering the context costs as much as a small reduction
        with torch.no_grad() if torch.is_grad_enabled() else _NO_CONTEXT:
            reduced = (
                moments(tensor) if self._want_moments else None,
                take_sample(tensor, self._sample_size) if self._want_sample else None,
                copy_full_to_host(tensor) if self._want_full else None,
            )
        if version is not None:
            self._reductions[id(tensor)] = (weakref.ref(tensor), version, reduced, self._event_id)
        return reduced

    # -- flushing ----------------------------------------------------------------
    def _flush(self, step: int) -> None:
        if self._stopped:  # an earlier write failed: never retry (one warning, not one per step)
            self._pending = []
            return
        pending, self._pending = self._pending, []
        self._reductions.clear()
        try:
            staged = _Staged(pending)
            if self._background is None and staged.on_accelerator:
                self._background = BackgroundWriter(self.writer)
            if self._background is None:
                self.writer.write_step(step, staged.finish())
                self._committed(step, len(pending))
            else:
                done = lambda: self._committed(step, len(pending))  # noqa: E731 - runs on the writer thread
                self._background.submit(step, staged.finish, nbytes=staged.nbytes, on_done=done)
        except Exception as exc:  # disk full, file removed: stop tracing, keep the model running
            self._write_failed(step, exc)

    def _committed(self, step: int, count: int) -> None:
        self.records_written += count
        self.steps_written.append(step)

    def _write_failed(self, step: int, exc: Exception) -> None:
        self._stopped = True
        failed = self._background.failed_step if self._background is not None else None
        at = step if failed is None else failed
        warnings.warn(
            f"tracediff: writing {self.writer.path} failed at step {at} ({exc!r}); tracing stopped, "
            f"steps {self.steps_written[:1] + self.steps_written[-1:]} and before remain readable",
            RuntimeWarning,
            stacklevel=3,
        )

    def drain(self) -> None:
        """Wait until every finished step is committed to the file (a no-op for CPU models)."""
        if self._background is not None:
            self._background.drain()

    def close(self) -> None:
        """Remove every hook, commit what is pending, close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._last_event = None
            step_state.unregister(self)
            if self._pending and not self._stopped:
                self._flush(self._step if self._step is not None else 0)
            sink = self._background if self._background is not None else self.writer
            if not self._stopped:
                try:
                    sink.set_attr("failures", self.failures)
                except Exception as exc:  # a queued step failed to write
                    self._write_failed(self._step if self._step is not None else 0, exc)
            try:
                sink.close()
            except Exception as exc:
                if not self._stopped:  # after a failed write, the warning about it was the one warning
                    warnings.warn(
                        f"tracediff: closing {self.writer.path} failed ({exc!r})", RuntimeWarning, stacklevel=2
                    )
            if not self._stopped and not self.failures and not self.failed_calls and self.records_written == 0:
                # (a write failure or a failing hook has warned already: not silent)
                warnings.warn(self._empty_message(), RuntimeWarning, stacklevel=3)

    def _empty_message(self) -> str:
        """Why a trace closed with no record although its hooks were attached (never a silent empty trace)."""
        head = (
            f"tracediff: {self.writer.path} has no records although {self._traced_count} module(s) of the "
            f"attached {self._model_name} were hooked"
        )
        if self._steps_skipped:
            steps = sorted(self.config.steps or ())
            ran = sorted(self._steps_skipped)
            return (
                f"{head}: traced modules ran in step(s) {', '.join(map(str, ran[:10]))}"
                f"{', ...' if len(ran) > 10 else ''}, but the steps to record ({', '.join(map(str, steps[:10]))}, "
                "FASTVIDEO_TRACE_STEPS or TraceConfig(steps=...)) matched none of them"
            )
        if self._event_id == 0:
            return (
                f"{head}: none of them ran while tracing was on. Likely causes: the model called was not the "
                f"attached {self._model_name} nor one of its submodules (attach the module whose forward runs, "
                "or call it before the trace is closed); a function compiled with torch.compile before attach, "
                "whose compiled code skips hooks added later (attach first, or torch.compiler.reset()); or no step "
                "matched FASTVIDEO_TRACE_STEPS"
            )
        return f"{head}: traced modules ran but none of them returned (or received) a tensor"


def _scripted_modules(model: nn.Module, names: list[str]) -> dict[int, str]:
    """Modules that run as TorchScript (``torch.jit.script``/``trace``), which never call Python hooks.

    Their submodules are TorchScript too; each is named with the outermost scripted module it sits in.
    """
    script_type = torch.jit.ScriptModule
    found: dict[int, str] = {}
    outer: list[str] = []
    for index, name in enumerate(names):
        if index == ROOT_INDEX or not isinstance(model.get_submodule(name), script_type):
            continue
        top = next((o for o in outer if name.startswith(o + ".")), None)
        if top is None:
            outer.append(name)
            found[index] = "a torch.jit ScriptModule: TorchScript runs no Python hooks"
        else:
            found[index] = f"inside the torch.jit ScriptModule {top}"
    return found


def _refusal(exc: Exception) -> str:
    """Why registering a hook failed, in one short line."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"refused a forward hook ({type(exc).__name__}{': ' + text if text else ''})"


def _call_owners(model: nn.Module, names: list[str], selected: list[int]) -> dict[int, int]:
    """For each traced module, the module whose return ends a call that the traced one opened.

    That is its outermost ancestor-or-self below the root that has a forward of its own (a
    ``ModuleList`` has none: ``blocks`` is never called, ``blocks.0`` is): for a wrapper
    attached whose code calls ``wrapper.model(x)``, ``model``.
    """
    index_of = {id(model.get_submodule(name)): i for i, name in enumerate(names)}
    owners: dict[int, int] = {}
    for index in selected:
        parts = names[index].split(".")
        owners[index] = index
        for end in range(1, len(parts) + 1):
            module = model.get_submodule(".".join(parts[:end]))
            if type(module).forward is not nn.Module.forward and id(module) in index_of:
                owners[index] = index_of[id(module)]
                break
    return owners


def _sequential_pairs(model: nn.Module, names: list[str], traced: set[int]) -> set[_Pair]:
    """Hook events of ``model`` between which only ``nn.Sequential.forward`` runs.

    ``(kind, module, kind, module)`` with kinds ``pre`` (inputs) and ``post`` (output):
    a plain ``nn.Sequential``'s inputs and its first child's, one child's output and the
    next child's inputs, its last child's output and its own. Only modules that occur
    once in the model: a shared module's events could come from another caller.
    """
    occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    index_of = {id(model.get_submodule(name)): i for i, name in enumerate(names) if i in traced}
    pairs: set[_Pair] = set()
    for index, name in enumerate(names):
        container = model.get_submodule(name)
        if index not in traced or type(container).forward is not nn.Sequential.forward:
            continue
        children = [index_of.get(id(c)) if c is not None and occurrences[id(c)] == 1 else None for c in container]
        if occurrences[id(container)] != 1 or not children:
            continue
        if children[0] is not None:
            pairs.add(("pre", index, "pre", children[0]))
        if children[-1] is not None:
            pairs.add(("post", children[-1], "post", index))
        for first, second in zip(children, children[1:], strict=False):
            if first is not None and second is not None:
                pairs.add(("post", first, "pre", second))
    return pairs


def _only_our_hooks(module: nn.Module | None, kind: str) -> bool:
    """Whether no hook but tracediff's can run on ``module``'s side of a transition (so no foreign code)."""
    if module is None:
        return False
    hooks = module._forward_pre_hooks if kind == "pre" else module._forward_hooks
    if len(hooks) != 1:
        return False
    from torch.nn.modules import module as torch_module

    for registry in (torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks):
        if registry and any(not str(getattr(h, "__module__", "")).startswith("tracediff.") for h in registry.values()):
            return False
    return True


def _version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; ``None`` for inference tensors, which have none."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


class _Staged:
    """One step's captures on their way to the host: one transfer per device per kind.

    Constructing it queues the transfers (into pinned memory, without waiting);
    :meth:`finish` waits for them and builds the :class:`StepBatch`. On a CPU
    model both happen at once.
    """

    def __init__(self, pending: list[_Pending]) -> None:
        self.pending = pending
        wait_for_producers(p.stream for p in pending)  # a forward on a side stream: copy after it computed
        self.events: list[torch.cuda.Event] = []
        devices: set[torch.device] = set()
        self.moments = _rows_to_host([p.moments for p in pending], devices)
        self.samples = _flat_to_host([p.sample for p in pending], devices)
        streams = [torch.cuda.current_stream(device) for device in devices]
        full_devices = {p.full_device for p in pending if p.full is not None and p.full.is_pinned()}
        streams += [copy_stream(device) for device in full_devices]  # type: ignore[arg-type]
        for stream in streams:
            event = torch.cuda.Event()
            event.record(stream)
            self.events.append(event)
        devices |= full_devices  # type: ignore[arg-type]
        self.on_accelerator = bool(devices)
        self.nbytes = sum({id(p.full): p.full.nbytes for p in pending if p.full is not None}.values())

    def finish(self) -> StepBatch:
        for event in self.events:
            event.synchronize()
        return _to_batch(self.pending, self.moments, self.samples)


def _to_batch(
    pending: list[_Pending], moments: list[tuple[list[int], torch.Tensor]], samples: _FlatParts | None
) -> StepBatch:
    """Columns of one step, from captures whose host copies have completed."""
    count = len(pending)
    columns = {name: np.zeros(count, dtype=dtype) for name, dtype in RECORD_COLUMNS.items()}
    # whole columns at once: a NumPy item assignment per field and record cost more than the rest of the step
    columns["seq"][:] = [p.seq for p in pending]
    columns["step"][:] = [p.step for p in pending]
    columns["module"][:] = [p.module for p in pending]
    columns["call"][:] = [p.call for p in pending]
    columns["numel"][:] = [p.numel for p in pending]
    columns["ndim"][:] = [len(p.shape) for p in pending]
    pad = (-1,) * MAX_DIMS
    shape = np.array([(p.shape + pad)[:MAX_DIMS] for p in pending], dtype=np.int64).reshape(count, MAX_DIMS)
    moment_rows = np.full((count, 7), np.nan)
    for indices, host in moments:
        moment_rows[indices] = host.numpy()
    counts = moment_rows[:, 5:7]
    counts[np.isnan(counts)] = 0
    if samples is not None:
        lengths = np.array([0 if p.sample is None else p.sample.numel() for p in pending], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        columns["sample_offset"][:] = np.where(lengths > 0, starts, 0)
        columns["sample_len"][:] = lengths
    f32_parts: list[np.ndarray] = []
    f64_parts: list[np.ndarray] = []
    f32_len = f64_len = 0
    stored: dict[int, tuple[int, int, int]] = {}  # id(host copy) -> (full_kind, full_offset, full_len)
    columns["full_kind"][:] = FULL_NONE
    for row, item in enumerate(pending):
        if item.full is None:
            continue
        if id(item.full) in stored:
            # the same captured tensor as an earlier record (a module's input that is the previous
            # module's output): point at the values already written instead of writing them twice
            kind, start, size = stored[id(item.full)]
            columns["full_kind"][row], columns["full_offset"][row], columns["full_len"][row] = kind, start, size
            continue
        # one host pass: convert (bf16 -> float32) and put a permuted layout in row-major order
        values = item.full.to(full_dtype(item.full), memory_format=torch.contiguous_format).reshape(-1).numpy()
        if values.dtype == np.float64:
            columns["full_kind"][row], columns["full_offset"][row] = FULL_F64, f64_len
            f64_parts.append(values)
            f64_len += values.size
        else:
            columns["full_kind"][row], columns["full_offset"][row] = FULL_F32, f32_len
            f32_parts.append(values)
            f32_len += values.size
        columns["full_len"][row] = values.size
        stored[id(item.full)] = (int(columns["full_kind"][row]), int(columns["full_offset"][row]), values.size)
    for position, name in enumerate(("sum", "abs_sum", "sumsq", "min", "max", "nan_count", "inf_count")):
        values = moment_rows[:, position]
        columns[name] = values.astype(columns[name].dtype) if name.endswith("count") else values
    return StepBatch(
        columns=columns,
        shape=shape,
        labels=[p.label for p in pending],
        dtypes=[p.dtype for p in pending],
        samples=samples.assemble() if samples is not None else None,
        full_f32=f32_parts or None,
        full_f64=f64_parts or None,
    )


def _to_host(tensor: torch.Tensor, devices: set[torch.device]) -> torch.Tensor:
    """Start copying ``tensor`` to the host; on CUDA into pinned memory, without waiting."""
    if not tensor.is_cuda:
        return tensor.to("cpu")
    devices.add(tensor.device)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _rows_to_host(rows: list[torch.Tensor | None], devices: set[torch.device]) -> list[tuple[list[int], torch.Tensor]]:
    """Stack per-record device vectors per device: ``(record indices, host tensor)`` pairs."""
    by_device: defaultdict[torch.device, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if row is not None:
            by_device[row.device].append(index)
    return [(indices, _to_host(torch.stack([rows[i] for i in indices]), devices)) for indices in by_device.values()]  # type: ignore[misc]


@dataclass
class _FlatParts:
    """Per-device concatenations of variable-length vectors, and how to put them back in record order."""

    host: dict[torch.device, torch.Tensor]
    starts: dict[torch.device, np.ndarray]
    order: list[tuple[torch.device, int]]

    def assemble(self) -> np.ndarray:
        arrays = {device: tensor.numpy() for device, tensor in self.host.items()}
        pieces = [arrays[d][self.starts[d][i] : self.starts[d][i + 1]] for d, i in self.order]
        return np.concatenate(pieces)


def _flat_to_host(parts: list[torch.Tensor | None], devices: set[torch.device]) -> _FlatParts | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    order: list[tuple[torch.device, int]] = []
    for part in present:
        order.append((part.device, len(by_device[part.device])))
        by_device[part.device].append(part)
    # one conversion per device (float32 parts are promoted exactly), not one per record
    host = {device: _to_host(torch.cat(items).to(torch.float64), devices) for device, items in by_device.items()}
    starts = {device: np.cumsum([0] + [t.numel() for t in items]) for device, items in by_device.items()}
    return _FlatParts(host, starts, order)
