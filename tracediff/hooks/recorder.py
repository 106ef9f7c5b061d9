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
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tracediff.config import TraceConfig
from tracediff.hooks import steps as step_state
from tracediff.hooks.flatten import iter_inputs, iter_tensors
from tracediff.hooks.reuse import Reductions, ReuseCache, sequential_pairs
from tracediff.hooks.staging import Pending, Staged
from tracediff.hooks.stats import copy_full_to_host, moments, producer_stream, take_sample
from tracediff.hooks.wiring import ROOT_INDEX, call_owners, refusal, scripted_modules
from tracediff.modtree import display_name
from tracediff.store.background import BackgroundWriter
from tracediff.store.writer import TraceWriter
from tracediff.vocabulary import error_summary

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


@dataclass
class _CallStart:
    """Where a top-level call of the model began: what to roll back to if it raises."""

    pending: int
    seq: int
    step: int | None
    calls: dict[int, int]
    input_calls: dict[int, int]
    exception: BaseException | None  # the exception being handled when the call began (usually None)


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
        self._pending: list[Pending] = []
        self._calls: defaultdict[int, int] = defaultdict(int)
        self._input_calls: defaultdict[int, int] = defaultdict(int)
        self._reuse = ReuseCache()
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
        scripted = scripted_modules(model, self.module_names)
        for index in selected:
            if index in scripted:
                self.untraced[self.module_names[index]] = scripted[index]
        selected = [index for index in selected if index not in scripted]
        self._owners = call_owners(model, self.module_names, selected)
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
                self.untraced[self.module_names[index]] = refusal(exc)
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
                self.untraced.setdefault(self.module_names[owner], refusal(exc))
        self._traced_count = len(traced)
        self._reuse.safe_pairs = sequential_pairs(model, self.module_names, traced)

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

    @property
    def handles(self) -> list[RemovableHandle]:
        """The handles of every hook registered so far (removed on :meth:`close`)."""
        return self._handles

    @property
    def records_captured(self) -> int:
        """Records captured so far, including the running step's (not yet written)."""
        return self._seq

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
        explicit = step_state.current_step()
        if self._depth == 0 and explicit is None:
            self._begin_step(self._auto_next)
            self._auto_next += 1
        elif explicit is not None and explicit != self._step:
            self._begin_step(explicit)
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
            self._call_ended(failed)

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
            if start is not None and failed:
                self._drop_call(start)
            self._call_ended(failed)

    def _call_ended(self, failed: bool) -> None:
        """A call closed: commit its step if it was the outermost call of an implicit step."""
        self._depth = max(self._depth - 1, 0)
        step = self._step
        at_end = self._depth == 0 and step_state.current_step() is None
        # a failed call leaves no empty step behind
        if step is not None and at_end and (self._pending or not failed):
            self._flush(step)

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
            name = display_name(self.module_names[index])
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
            self._reuse.enter_event(kind, index, module)
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
            self._reuse.enter_event("post", index, module)
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
            Pending(
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

    def _reduced(self, tensor: torch.Tensor) -> Reductions:
        """Moments, sample and full copy of ``tensor``, reused when it was provably captured unchanged."""
        return self._reuse.reduced(tensor, self._reduce)

    def _reduce(self, tensor: torch.Tensor) -> Reductions:
        # no_grad only where grad is on: entering the context costs as much as a small reduction
        with torch.no_grad() if torch.is_grad_enabled() else _NO_CONTEXT:
            return (
                moments(tensor) if self._want_moments else None,
                take_sample(tensor, self._sample_size) if self._want_sample else None,
                copy_full_to_host(tensor) if self._want_full else None,
            )

    # -- flushing ----------------------------------------------------------------
    def _flush(self, step: int) -> None:
        if self._stopped:  # an earlier write failed: never retry (one warning, not one per step)
            self._pending = []
            return
        pending, self._pending = self._pending, []
        self._reuse.clear()
        try:
            staged = Staged(pending)
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
            self._reuse.detach()
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
        if self._reuse.events == 0:
            return (
                f"{head}: none of them ran while tracing was on. Likely causes: the model called was not the "
                f"attached {self._model_name} nor one of its submodules (attach the module whose forward runs, "
                "or call it before the trace is closed); a function compiled with torch.compile before attach, "
                "whose compiled code skips hooks added later (attach first, or torch.compiler.reset()); or no step "
                "matched FASTVIDEO_TRACE_STEPS"
            )
        return f"{head}: traced modules ran but none of them returned (or received) a tensor"
