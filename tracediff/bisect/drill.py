"""Automatic drill-down: from the top-level blocks to the module, and the operator, that adds the error.

Each level isolates only its own modules (teacher forcing, see
:mod:`tracediff.bisect.isolate`): the top level is the model's blocks and the
aligned modules around them; the next level is the aligned children of the
first module that adds error, with every module already ruled out kept forced to
the upstream's output so the culprit's children see exactly the reference's
inputs. The drill stops at a module with no aligned children, or at a module
whose children are all clean (the bug is in its own forward code), where the
operator-level trace (:mod:`tracediff.bisect.ops`) takes over.

Only the first step that drifts at the top level is drilled into, and each
level hooks only its own modules: a level costs three forward passes (upstream
reference, forced port, free port) plus two with noise-floor calibration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from tracediff.align.aligner import align_models
from tracediff.align.alignment import Alignment
from tracediff.bisect.isolate import (
    Autocast,
    CallFn,
    Hooks,
    Pass,
    Transform,
    describe_autocast,
    incompatible,
    resolve_transforms,
    run_pass,
)
from tracediff.bisect.metrics import Metrics, combine, compare
from tracediff.bisect.noise import (
    DEFAULT_NOISE_FACTOR,
    compute_dtype,
    floor_minimum,
    noise_ratio,
    precise_copy,
    precise_inputs,
    reference_dtype,
)
from tracediff.bisect.ops import is_builtin, module_settings, operator_level
from tracediff.bisect.result import BisectResult, Level, ModuleMeasurement, OpFinding
from tracediff.bisect.tree import frontier, snapshot, tensor_leaves, to_device_of, top_level
from tracediff.call_context import ContextFn, clone_inputs, default_call, enter, pick, with_context
from tracediff.errors import TracediffError
from tracediff.modtree import ROOT, is_within, join_name
from tracediff.tolerance import DEFAULT_PRESET, PRESETS, Tolerance, preset

#: How an operator-level finding that could not be traced begins its note.
SKIPPED = "operator level skipped"


class BisectError(TracediffError):
    """Bisection cannot run: nothing aligned, no inputs, a step out of range."""


def bisect_models(
    upstream: nn.Module,
    port: nn.Module,
    inputs: Any = None,
    *,
    step_inputs: Sequence[Any] | None = None,
    step: int | None = None,
    alignment: Alignment | None = None,
    mapping: Any = None,
    param_map: Any = None,
    tolerance: Tolerance | str | None = None,
    call: CallFn | None = None,
    upstream_call: CallFn | None = None,
    port_call: CallFn | None = None,
    context: ContextFn | None = None,
    upstream_context: ContextFn | None = None,
    port_context: ContextFn | None = None,
    transforms: Mapping[str, Transform] | None = None,
    noise_floor: bool = False,
    noise_factor: float = DEFAULT_NOISE_FACTOR,
    operators: bool = True,
    max_depth: int | None = None,
    low_memory: bool = False,
) -> BisectResult:
    """Find the module (and operator) where the port first adds error, by teacher forcing and drill-down.

    Args:
        upstream: the reference model.
        port: the model under test (same weights).
        inputs: one step's inputs (``model(**inputs)`` for a mapping, see ``call``).
        step_inputs: the inputs of several steps instead; the first step whose
            top level drifts is drilled into.
        step: bisect only this index of ``step_inputs``.
        alignment: which upstream module is which port module; default
            :func:`tracediff.align.aligner.align_models` with ``mapping`` and ``param_map``.
        mapping, param_map: passed to the aligner when ``alignment`` is not given.
        tolerance: what local errors are held to (a :class:`Tolerance` or a preset name).
        call: ``call(model, inputs)`` for both sides; ``upstream_call``/``port_call`` per side.
        context: a function of the step's inputs returning the context manager every forward of both
            sides must run in (FastVideo's ``set_forward_context``); ``upstream_context``/``port_context``
            per side. Entered around whole-model passes and around each single-module re-run.
        transforms: port module name (or regex) -> function turning the upstream
            module's output into the port's layout, for modules that differ in layout.
        noise_floor: calibrate each module's noise floor against a higher-precision
            upstream and judge local errors as multiples of it (see :mod:`tracediff.bisect.noise`).
        noise_factor: how many times its floor a module may add before it drifts.
        operators: trace operators inside the culprit when it drifts on its own.
        max_depth: stop drilling after this many levels below the top.
        low_memory: keep the upstream outputs and inputs recorded for teacher forcing in CPU
            memory instead of on the models' device, moving each back when it is used: for a
            pair that barely fits on the accelerator. Same passes and same result; slower by
            the copies (see docs/bisection.md).

    Returns:
        A :class:`BisectResult`, truthy when no module adds error and the outputs agree.

    Raises:
        BisectError: no inputs, a bad step, or nothing aligned to isolate.
    """
    if (inputs is None) == (step_inputs is None):
        raise BisectError("give the inputs of one step (inputs=...) or of several (step_inputs=[...]), not both")
    all_inputs = list(step_inputs) if step_inputs is not None else [inputs]
    if not all_inputs:
        raise BisectError("step_inputs is empty: nothing to run")
    if step is not None and not 0 <= step < len(all_inputs):
        raise BisectError(f"step {step} is out of range: {len(all_inputs)} step input(s) given")
    session = _open_session(
        upstream, port, alignment=alignment, mapping=mapping, param_map=param_map, tolerance=tolerance, call=call,
        upstream_call=upstream_call, port_call=port_call, context=context, upstream_context=upstream_context,
        port_context=port_context, transforms=transforms, noise_floor=noise_floor, noise_factor=noise_factor,
        low_memory=low_memory,
    )
    steps = [step] if step is not None else list(range(len(all_inputs)))
    return session.bisect(all_inputs, steps, operators=operators, max_depth=max_depth)


def isolate_models(
    upstream: nn.Module,
    port: nn.Module,
    inputs: Any,
    *,
    modules: Sequence[str] | None = None,
    **options: Any,
) -> Level:
    """Local, accumulated and amplification figures of one level of modules, in one step.

    Args:
        modules: port module names to isolate (none may contain another); default
            the top level (the blocks and the aligned modules around them).
        options: how the models are aligned, called and compared: ``alignment``, ``mapping``,
            ``param_map``, ``tolerance``, ``call``, ``upstream_call``, ``port_call``, ``context``,
            ``upstream_context``, ``port_context``, ``transforms``, ``noise_floor``, ``noise_factor``,
            ``low_memory``, as for :func:`bisect_models`.

    Returns:
        The :class:`Level` (``depth`` 0, ``culprit`` the first module that adds error).
    """
    session = _open_session(upstream, port, **options)
    names = list(modules) if modules is not None else session.top_level()
    unknown = [name for name in names if name not in session.aligned]
    if unknown:
        raise BisectError(f"cannot isolate {unknown[0]!r}: it is not an aligned port module "
                          f"({len(session.aligned)} aligned modules, e.g. {', '.join(list(session.aligned)[:3])})")
    measured = session.measure(inputs, 0, names, [])
    return measured.level(0, ROOT, "", session.passes)


def _open_session(
    upstream: nn.Module, port: nn.Module, *, alignment: Alignment | None = None, mapping: Any = None,
    param_map: Any = None, tolerance: Tolerance | str | None = None, call: CallFn | None = None,
    upstream_call: CallFn | None = None, port_call: CallFn | None = None, context: ContextFn | None = None,
    upstream_context: ContextFn | None = None, port_context: ContextFn | None = None,
    transforms: Mapping[str, Transform] | None = None, noise_floor: bool = False,
    noise_factor: float = DEFAULT_NOISE_FACTOR, low_memory: bool = False,
) -> _Session:
    """The session both entry points share: the user's options resolved (alignment, tolerance, calls, contexts)."""
    if alignment is None:
        alignment = align_models(upstream, port, mapping=mapping, param_map=param_map)
    return _Session(
        upstream, port, alignment, _tolerance(tolerance),
        upstream_call=upstream_call or call, port_call=port_call or call,
        upstream_context=pick(context, upstream_context), port_context=pick(context, port_context),
        transforms=transforms, noise_floor=noise_floor, noise_factor=noise_factor, low_memory=low_memory,
    )


def _tolerance(tolerance: Tolerance | str | None) -> Tolerance:
    if tolerance is None:
        return PRESETS[DEFAULT_PRESET]
    return preset(tolerance) if isinstance(tolerance, str) else tolerance


@dataclass
class _Measured:
    """One level measured in one step, with what the operator level may need later."""

    errors: list[ModuleMeasurement]
    output: Metrics | None
    output_problem: str
    reference: Pass
    forced: Pass
    output_floor: Metrics | None = None

    def culprit(self) -> ModuleMeasurement | None:
        return next((e for e in self.errors if e.drifts), None)

    def level(self, depth: int, parent: str, parent_upstream: str, passes: int) -> Level:
        errors = self.errors
        return Level(depth, parent, parent_upstream, errors[0].step if errors else 0, errors, self.culprit(), passes)


class _Session:
    """Both models, their alignment and settings, and the forward-pass count."""

    def __init__(
        self,
        upstream: nn.Module,
        port: nn.Module,
        alignment: Alignment,
        tolerance: Tolerance,
        *,
        upstream_call: CallFn | None,
        port_call: CallFn | None,
        upstream_context: ContextFn | None = None,
        port_context: ContextFn | None = None,
        transforms: Mapping[str, Transform] | None,
        noise_floor: bool,
        noise_factor: float,
        low_memory: bool = False,
    ) -> None:
        self.upstream, self.port = upstream, port
        #: where recorded outputs and inputs are kept: the CPU with ``low_memory``, else where computed
        self.keep_on: str | None = "cpu" if low_memory else None
        self.up_modules = dict(upstream.named_modules())
        self.port_modules = dict(port.named_modules())
        self.suspects = list(alignment.suspects)
        self.aligned = {
            pair.port: pair.upstream for pair in alignment.pairs
            if pair.port != ROOT and pair.upstream != ROOT
            and pair.port in self.port_modules and pair.upstream in self.up_modules
        }
        if not self.aligned:
            raise BisectError("nothing to isolate: no port module is aligned with an upstream module "
                              "(give a mapping or a param_map)")
        self.tolerance = tolerance
        self.up_context, self.port_context = upstream_context, port_context
        self.up_call: CallFn = with_context(upstream_call or (lambda m, x: default_call(m, x)), upstream_context)
        self.port_call: CallFn = with_context(port_call or (lambda m, x: default_call(m, x)), port_context)
        self.transforms = resolve_transforms(transforms, self.aligned)
        self.noise_floor = noise_floor
        self.noise_factor = noise_factor
        self.dtype = compute_dtype(upstream)
        self._precise: nn.Module | None = None
        self._output_floor: Metrics | None = None
        self.passes = 0
        self.module_calls = 0

    def top_level(self) -> list[str]:
        return top_level(self.port_modules, self.aligned)

    def tol(self, port_name: str) -> Tolerance:
        return self.tolerance.for_module(port_name, self.aligned.get(port_name))

    # -- one level ---------------------------------------------------------------------------------

    def measure(self, inputs: Any, step: int, level: list[str], forced_extra: list[str]) -> _Measured:
        """Isolate ``level``'s modules with ``forced_extra`` also forced; free pass for accumulated error."""
        counterpart = {name: self.aligned[name] for name in (*level, *forced_extra)}
        up_level = [counterpart[name] for name in level]
        up_all = list(dict.fromkeys(counterpart.values()))
        reference = run_pass(self.upstream, self.up_call, clone_inputs(inputs),
                             Hooks(self.upstream, record=up_all, capture_inputs=up_level, keep_on=self.keep_on))
        forced = run_pass(self.port, self.port_call, clone_inputs(inputs), Hooks(
            self.port, reference=reference.calls, measure=level, force=[*level, *forced_extra],
            force_inputs=level, capture_inputs=level, counterpart=counterpart, transforms=self.transforms,
            tolerance=self.tol, keep_on=self.keep_on))
        free = run_pass(self.port, self.port_call, clone_inputs(inputs), Hooks(
            self.port, reference=reference.calls, measure=level, counterpart=counterpart,
            transforms=self.transforms, tolerance=self.tol))
        self.passes += 3
        noise, precise = self._noise(inputs, up_level, up_all) if self.noise_floor else (None, None)
        errors = []
        for name in level:
            upstream = counterpart[name]
            for call, record in enumerate(forced.calls.get(name, [])):
                free_calls = free.calls.get(name, [])
                acc = free_calls[call].local if call < len(free_calls) else None
                floor = None
                if noise is not None:
                    noise_calls = noise.calls.get(upstream, [])
                    floor = noise_calls[call].local if call < len(noise_calls) else None
                errors.append(self._measurement(name, upstream, step, call, record, acc, floor))
        errors.sort(key=lambda e: e.order)
        output, problem = self._output(free, reference)
        # The model output's own floor: the upstream's free pass against the higher-precision one.
        floor = self._output(reference, precise)[0] if precise is not None else None
        return _Measured(errors, output, problem, reference, forced, floor)

    def _measurement(self, name: str, upstream: str, step: int, call: int, record: Any,
                      accumulated: Metrics | None, floor: Metrics | None) -> ModuleMeasurement:
        local = record.local
        reason = record.reason if local is None else ""
        ratio = None
        if local is None:
            drifts = False
            reason = reason or "its output could not be compared"
        elif self.noise_floor:
            ratio = noise_ratio(local.rel_l2, floor.rel_l2 if floor else None, self.dtype)
            drifts = ratio > self.noise_factor
        else:
            drifts = local.failed
        return ModuleMeasurement(
            port=name, upstream=upstream, step=step, call=call, order=record.seq, local=local,
            accumulated=accumulated, noise=floor, reason=reason, inputs_forced=record.inputs_forced,
            input_drift=record.input_drift, transformed=name in self.transforms, drifts=drifts, noise_ratio=ratio,
        )

    def _noise(self, inputs: Any, up_level: list[str], up_all: list[str]) -> tuple[Pass, Pass]:
        """The upstream against a higher-precision copy of itself, forced the same way; and that copy's pass."""
        precise_dtype = reference_dtype(self.dtype)
        if self._precise is None:
            self._precise = precise_copy(self.upstream, precise_dtype)
        reference = run_pass(self._precise, self.up_call, precise_inputs(inputs, precise_dtype),
                             Hooks(self._precise, record=up_all, capture_inputs=up_level, keep_on=self.keep_on))
        measured = run_pass(self.upstream, self.up_call, clone_inputs(inputs), Hooks(
            self.upstream, reference=reference.calls, measure=up_level, force=up_all, force_inputs=up_level,
            tolerance=lambda name: self.tolerance.for_module(None, name), keep_on=self.keep_on))
        self.passes += 2
        return measured, reference

    def _output_drifts(self, measured: _Measured) -> bool:
        """Outputs break tolerance; with calibration, they exceed ``noise_factor`` times their own floor."""
        output = measured.output
        if output is None:
            return False
        if not self.noise_floor:
            return output.failed
        floor = measured.output_floor.rel_l2 if measured.output_floor is not None else None
        return noise_ratio(output.rel_l2, floor, self.dtype) > self.noise_factor

    def _output(self, free: Pass, reference: Pass) -> tuple[Metrics | None, str]:
        own, theirs = list(tensor_leaves(free.output)), list(tensor_leaves(reference.output))
        problem = incompatible(theirs, own)
        if problem:
            return None, problem
        tol = self.tolerance.for_module(ROOT, ROOT)
        return combine([compare(o, t, tol) for o, t in zip(own, theirs, strict=True)]), ""

    # -- the drill ----------------------------------------------------------------------------------

    def bisect(self, all_inputs: list[Any], steps: list[int], *, operators: bool,
               max_depth: int | None) -> BisectResult:
        level_names = self.top_level()
        notes: list[str] = []
        measured: _Measured | None = None
        checked = 0
        for step in steps:
            measured = self.measure(all_inputs[step], step, level_names, [])
            checked += 1
            if measured.culprit() is not None or self._output_drifts(measured):
                break
        assert measured is not None
        measured_top = measured
        step = steps[checked - 1]
        inputs = all_inputs[step]
        output, output_problem = measured.output, measured.output_problem
        if output_problem:
            notes.append(f"model outputs not compared: {output_problem}")
        path: list[Level] = []
        parent, parent_up = ROOT, ROOT
        parent_measured: _Measured | None = None
        parent_error: ModuleMeasurement | None = None
        forced_extra: list[str] = []
        passes_before = 0
        depth = 0
        autocasts: list[tuple[ModuleMeasurement, Autocast, Autocast]] = []  # per level's culprit: port's, upstream's
        while True:
            level = measured.level(depth, parent, parent_up, self.passes - passes_before)
            passes_before = self.passes
            path.append(level)
            _note_unisolatable(level, notes)
            culprit = level.culprit
            if culprit is None:
                break
            autocasts.append((culprit, *_autocasts(measured, culprit)))
            children = frontier(self.port_modules, self.aligned, culprit.port)
            if not children or (max_depth is not None and depth >= max_depth):
                parent_measured, parent_error = measured, culprit
                parent, parent_up = culprit.port, culprit.upstream
                break
            forced_extra = [*forced_extra, *(name for name in level_names if name != culprit.port)]
            parent_measured, parent_error = measured, culprit
            parent, parent_up = culprit.port, culprit.upstream
            level_names, depth = children, depth + 1
            measured = self.measure(inputs, step, level_names, forced_extra)

        _note_autocast(autocasts, notes)
        output_drifts = self._output_drifts(measured_top)
        self._output_floor = measured_top.output_floor
        if parent_error is None and not output_drifts:
            return self._result(path, None, None, None, output, False, step, checked, notes)
        if parent_error is None:
            notes.append("the model outputs differ but no isolatable top-level module adds error: the difference "
                         "is in the model's own forward code, or in modules that are unaligned or not isolatable "
                         "(the operator level below compares their outputs too)")
        finding = None
        if operators:
            finding = self._operators(parent_error, parent_measured, inputs)
            if finding is not None and finding.note.startswith(SKIPPED):
                notes.append(finding.note)
        blamed, blamed_up, found_in = parent, parent_up, None
        if finding is not None and finding.port_op is not None and finding.port_op.module:
            # The first differing operator ran in a child with no counterpart (the operator trace
            # looks through those): that child's forward is the narrowest place to name.
            found_in = parent
            blamed = join_name(parent, finding.port_op.module)
            blamed_up = join_name(parent_up, finding.upstream_op.module if finding.upstream_op else "")
        flagged = [s for s in self.suspects if found_in is not None and s.port in self.port_modules
                   and is_within(s.port, parent, strict=True)]
        if flagged:
            # The aligner could not vouch for a module inside the culprit (its values or its stacked weights
            # contradict its counterpart): that module, not the one the operator trace stopped in, comes first.
            notes.append(f"{flagged[0].port} is an alignment suspect ({flagged[0].reason}); named before "
                         f"{blamed}, where the first differing operator ran")
            blamed, blamed_up = flagged[0].port, flagged[0].upstream
        result = self._result(path, blamed, blamed_up, parent_error, output, output_drifts, step, checked, notes,
                              finding)
        result.found_in = found_in
        return result

    def _operators(self, culprit: ModuleMeasurement | None, measured: _Measured | None,
                   inputs: Any) -> OpFinding | None:
        port_name = culprit.port if culprit else ROOT
        up_name = culprit.upstream if culprit else ROOT
        port_module, up_module = self.port_modules[port_name], self.up_modules[up_name]
        if culprit is not None and is_builtin(port_module) and is_builtin(up_module):
            return OpFinding(
                module=port_name, upstream_module=up_name, settings=module_settings(port_module, up_module),
                note=f"{type(port_module).__name__} and {type(up_module).__name__} are torch.nn layers used as "
                     "they are: compare their settings")
        port_keys = _child_keys(self.port_modules, port_name, self.aligned)
        up_keys = _child_keys(self.up_modules, up_name, {u: u for u in self.aligned.values()})
        tol = self.tol(port_name)
        if self.noise_floor:  # operators of a low-precision run differ by round-off: allow a few epsilons
            eps = 4 * floor_minimum(self.dtype)
            tol = replace(tol, atol=max(tol.atol, eps), rtol=max(tol.rtol, eps))
        if culprit is None or measured is None:
            # The model itself: run it whole, through the user's call functions, under the current autocast.
            def port_call(m: nn.Module, a: Any, k: Any) -> Any:
                self.module_calls += 1
                return self.port_call(m, clone_inputs(inputs))

            def up_call(m: nn.Module, a: Any, k: Any) -> Any:
                self.module_calls += 1
                return self.up_call(m, clone_inputs(inputs))

            return self._trace(port_module, up_module, ((), {}), ((), {}), tol, port_name=port_name,
                               upstream_name=up_name, port_keys=port_keys, upstream_keys=up_keys,
                               port_call=port_call, upstream_call=up_call)
        port_calls = measured.forced.calls.get(port_name, [])
        up_calls = measured.reference.calls.get(up_name, [])
        call = culprit.call
        if call >= len(port_calls) or call >= len(up_calls) or port_calls[call].inputs is None \
                or up_calls[call].inputs is None:
            return OpFinding(module=port_name, upstream_module=up_name, note="the module's inputs were not captured")

        def counted_in(context: ContextFn | None) -> Any:
            def counted(m: nn.Module, a: Any, k: Any) -> Any:
                self.module_calls += 1
                with enter(context, inputs):  # the context the whole model ran in, for this module alone
                    return m(*a, **k)

            return counted

        # Each module runs alone under the autocast it was called under in the model (an
        # ancestor's ``with torch.autocast(...)``): its captured inputs may be in that dtype.
        port_inputs, up_inputs = snapshot(port_calls[call].inputs), snapshot(up_calls[call].inputs)
        if self.keep_on is not None:  # kept off the device (low_memory): back where each module runs
            port_inputs, up_inputs = to_device_of(port_inputs, port_module), to_device_of(up_inputs, up_module)
        return self._trace(port_module, up_module, port_inputs, up_inputs,
                           tol, port_name=port_name, upstream_name=up_name, port_keys=port_keys,
                           upstream_keys=up_keys, port_call=counted_in(self.port_context),
                           upstream_call=counted_in(self.up_context),
                           port_autocast=port_calls[call].autocast, upstream_autocast=up_calls[call].autocast)

    @staticmethod
    def _trace(port_module: nn.Module, up_module: nn.Module, port_inputs: Any, up_inputs: Any, tol: Tolerance,
               **options: Any) -> OpFinding:
        """:func:`operator_level`; a module that cannot be re-run alone skips it with a note instead of raising."""
        try:
            return operator_level(port_module, up_module, port_inputs, up_inputs, tol, **options)
        except Exception as exc:  # the user's forward, run out of its context: any error means "cannot re-run"
            port_name, up_name = options["port_name"], options["upstream_name"]
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return OpFinding(
                module=port_name, upstream_module=up_name, settings=module_settings(port_module, up_module),
                note=f"{SKIPPED}: {port_name or 'the model'} (upstream {up_name or 'the model'}) could not be re-run "
                     f"alone on its captured inputs: {type(exc).__name__}: {message}".rstrip(": "))

    def _result(self, path: list[Level], culprit: str | None, culprit_up: str | None, error: ModuleMeasurement | None,
                output: Metrics | None, output_drifts: bool, step: int, checked: int, notes: list[str],
                finding: OpFinding | None = None) -> BisectResult:
        return BisectResult(
            tolerance=self.tolerance, path=path, culprit=culprit, culprit_upstream=culprit_up, culprit_error=error,
            operator=finding, output=output, output_drifts=output_drifts, step=step, steps_checked=checked,
            forward_passes=self.passes, module_calls=self.module_calls, noise_floor=self.noise_floor,
            noise_factor=self.noise_factor, notes=notes, output_floor=self._output_floor,
        )


def _child_keys(modules: Mapping[str, nn.Module], parent: str, keys: Mapping[str, str]) -> dict[str, str]:
    """Descendants of ``parent`` that have a counterpart, by name relative to ``parent``, with a shared key."""
    prefix = f"{parent}." if parent else ""
    return {name[len(prefix):]: keys[name] for name in modules if is_within(name, parent, strict=True) and name in keys}


def _autocasts(measured: _Measured, error: ModuleMeasurement) -> tuple[Autocast, Autocast]:
    """The autocast the port module and its upstream counterpart were called under, in that call."""
    port = measured.forced.calls.get(error.port, [])
    upstream = measured.reference.calls.get(error.upstream, [])
    return (port[error.call].autocast if error.call < len(port) else (),
            upstream[error.call].autocast if error.call < len(upstream) else ())


def _note_autocast(autocasts: list[tuple[ModuleMeasurement, Autocast, Autocast]], notes: list[str]) -> None:
    """Name the first culprit on the path called under another autocast than upstream's, and where it starts."""
    for depth, (error, port, upstream) in enumerate(autocasts):
        if port == upstream:
            continue
        where = (f"inside {autocasts[depth - 1][0].port}'s forward" if depth
                 else "outside the top-level modules (the model's forward or the call function)")
        notes.append(f"{error.port} runs under {describe_autocast(port)} in the port, upstream "
                     f"{error.upstream} under {describe_autocast(upstream)}: the autocast changes {where}")
        return


def _note_unisolatable(level: Level, notes: list[str]) -> None:
    skipped = [m for m in level.modules if not m.isolatable]
    if skipped:
        first = skipped[0]
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        notes.append(f"not isolatable at depth {level.depth}: {first.port} (upstream {first.upstream}): "
                     f"{first.reason}{more}")


__all__ = ["BisectError", "bisect_models", "isolate_models"]

