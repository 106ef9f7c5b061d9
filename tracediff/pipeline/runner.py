"""Build both sides from a run spec, feed them identical inputs, record both traces.

Sides run one after the other and each model is released before the next is
built, so a run never holds two huge models at once; ``isolate_sides`` goes
further and runs each side in its own Python process (conflicting imports or
globals between the upstream and the port codebases).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tracediff.call_context import ContextFn, clone_inputs, default_call, with_context
from tracediff.config import TraceConfig, check_layers_match, parse_sample_size, parse_stats, parse_steps
from tracediff.errors import SpecError, TracediffError, debug_enabled, model_call_message
from tracediff.hooks import attach, trace_step
from tracediff.pipeline.checkpoint import find_safetensors, load_into, load_state_dict, resolve_hf
from tracediff.pipeline.factory import call_with_supported, check_kwargs, resolve
from tracediff.pipeline.run_folder import TRACE_FILES
from tracediff.pipeline.spec import SIDES, RunSpec, SideSpec
from tracediff.render.progress import RunProgress, StepCounter, forward_events
from tracediff.results import json_ready


@dataclass(frozen=True)
class SideResult:
    """What tracing one side produced. Truthy when every module was recorded (no recording failures)."""

    side: str
    trace: Path
    seconds: float
    records: int
    failures: dict[str, str]

    def __bool__(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return json_ready({"side": self.side, "trace": self.trace, "seconds": self.seconds, "records": self.records,
                           "failures": self.failures})


def trace_side(spec: RunSpec, side: str, out_dir: Path, *, progress: RunProgress | None = None) -> SideResult:
    """Build one side, run it for ``spec.steps`` steps under the recorder, close the trace."""
    side_spec = spec.side(side)
    device, dtype = placement_for(spec, side_spec)
    if progress:
        progress.phase("build", side)
    model = build_model(spec, side_spec, device=device, dtype=dtype, progress=progress)
    call = caller_for(spec, side_spec)
    config = trace_config_for(spec, side, model)
    inputs = (clone_inputs(make_inputs(spec, step), device=device, dtype=dtype) for step in range(spec.steps))
    with warnings.catch_warnings():
        # `run` prints every recording failure once, in its summary (SideResult.failures), not also as it happens.
        warnings.filterwarnings("ignore", message=r"tracediff: recording .* failed", category=RuntimeWarning)
        result = trace_model(model, side=side, steps=inputs, count=spec.steps, output=out_dir / TRACE_FILES[side],
                             config=config, call=call, progress=progress)
    del model
    return result


def trace_config_for(spec: RunSpec, side: str, model: nn.Module) -> TraceConfig:
    """What to record on one side: the spec's ``[trace]`` settings with that side's layer regex.

    Raises:
        TraceConfigError: a bad setting, or a layer regex that matches none of ``model``'s modules
            (named with the side and the per-side flag, instead of an empty trace).
    """
    layers, source = spec.layers_for(side)
    check_layers_match([name for name, _ in model.named_modules()], layers, side=side, source=source)
    return TraceConfig(
        layers=layers or None,
        stats=parse_stats(spec.stats, source="stats"),
        steps=parse_steps(spec.trace_steps, source="steps"),
        sample_size=parse_sample_size(spec.sample_size, source="sample_size"),
        layers_source=source,
        inputs=spec.trace_inputs,
    )


def trace_model(
    model: nn.Module,
    *,
    side: str,
    steps: Iterable[Any],
    output: Path,
    config: TraceConfig,
    call: Callable[[nn.Module, Any], Any] | None = None,
    count: int | None = None,
    progress: RunProgress | None = None,
    overwrite: bool = False,
) -> SideResult:
    """Run an in-memory model once per item of ``steps`` (its inputs), recording each as a step.

    The API behind ``run`` and the pytest plugin: the caller owns the model and
    the inputs; each side should get its own copy of the inputs. ``overwrite``
    lets the trace replace an existing file at ``output`` (otherwise refused).

    ``progress`` hears the phases, each step, and gets a reader of the records captured in
    the running step (the recorder's own counter: no per-call work is added for it).
    """
    call = call or (lambda m, inputs: default_call(m, inputs))
    start = time.perf_counter()
    total = count if count is not None else 0
    progress = progress or RunProgress()
    progress.phase("attach", side)
    with attach(model, side=side, config=config, output=output, overwrite=overwrite) as handle, torch.no_grad():
        progress.phase("trace", side)
        counter = StepCounter(lambda: handle.records_captured)
        progress.watch(side, counter.in_step)
        try:
            for step, inputs in enumerate(steps):
                total = max(total, step + 1)
                counter.begin()
                progress.step(side, step, total, counter.per_step)
                with trace_step(step):
                    _invoke(call, model, inputs, side=side, step=step)
                counter.end()
        finally:
            progress.watch(side, None)
    progress.step(side, total, total, counter.per_step)
    return SideResult(side, output, time.perf_counter() - start, handle.records_written, handle.failures)


def trace_both(
    spec: RunSpec, out_dir: Path, *, isolate_sides: bool = False, progress: RunProgress | None = None
) -> dict[str, SideResult]:
    """Trace upstream, then port; in this process or in one subprocess per side."""
    results: dict[str, SideResult] = {}
    if not isolate_sides:  # isolated sides keep the user's imports out of this process
        check_spec_kwargs(spec)
    for side in SIDES:
        if isolate_sides:
            results[side] = _trace_in_subprocess(spec, side, out_dir, progress)
        else:
            results[side] = trace_side(spec, side, out_dir, progress=progress)
    return results


# -- building --------------------------------------------------------------------
def build_model(spec: RunSpec, side: SideSpec, *, device: str, dtype: torch.dtype | None,
                progress: RunProgress | None = None) -> nn.Module:
    """Call the side's factory (seeded), load its weights, move it, set eval mode."""
    field = f"[{side.name}] factory"
    factory = resolve(side.factory or "", field=field, base=spec.base_dir)
    torch.manual_seed(spec.seed)
    offered = {"seed": spec.seed, "device": device, "dtype": dtype}
    model = call_with_supported(factory, offered, field=field, user=side.kwargs, user_field=kwargs_field(side.name))
    if not isinstance(model, nn.Module):
        raise SpecError(f"{field}={side.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    if side.weights or side.hf:
        if progress:
            progress.phase("convert" if side.convert else "weights", side.name)
        _load_weights(spec, side, model)
    try:
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    except (RuntimeError, AssertionError) as exc:
        raise SpecError(f"[{side.name}] device={device!r}: cannot move the model there ({exc})") from None
    return model.eval()


def _load_weights(spec: RunSpec, side: SideSpec, model: nn.Module) -> None:
    if side.hf:
        field = f"[{side.name}] hf"
        files = find_safetensors(resolve_hf(side.hf, side.revision, field=field), field=field)
    else:
        field = f"[{side.name}] weights"
        files = find_safetensors(side.weights or "", field=field, base=spec.base_dir)
    state = load_state_dict(files)
    if side.convert:
        convert = resolve(side.convert, field=f"[{side.name}] convert", base=spec.base_dir)
        try:
            state = convert(state)
        except TracediffError:
            raise
        except Exception as exc:
            raise SpecError(f"[{side.name}] convert={side.convert!r} raised {type(exc).__name__}: {exc}") from exc
    load_into(model, state, strict=side.strict, field=field)


def make_inputs(spec: RunSpec, step: int) -> Any:
    """The inputs of one step, built the same way for both sides (same seed)."""
    field = "[inputs] factory"
    factory = resolve(spec.inputs_factory or "", field=field, base=spec.base_dir)
    torch.manual_seed(spec.seed + step)
    return call_with_supported(factory, {"seed": spec.seed, "step": step}, field=field, user=spec.inputs_kwargs,
                               user_field=kwargs_field("inputs"))


def kwargs_field(section: str) -> str:
    """How errors name a section's ``kwargs``: the spec key and the flag that also sets it."""
    return f"[{section}] kwargs (--{section}-kwarg)"


def check_spec_kwargs(spec: RunSpec) -> None:
    """Refuse every factory keyword argument the factory cannot take, before either side is traced.

    Building the port may come minutes after the upstream was traced; a misspelt
    ``[port] kwargs`` key should not wait for that.

    Raises:
        SpecError: an unknown key (see :func:`~tracediff.pipeline.factory.check_kwargs`), or a reference that does
            not resolve.
    """
    for side in SIDES:
        side_spec = spec.side(side)
        if side_spec.kwargs:
            factory = resolve(side_spec.factory or "", field=f"[{side}] factory", base=spec.base_dir)
            check_kwargs(factory, side_spec.kwargs, field=kwargs_field(side))
    if spec.inputs_kwargs:
        factory = resolve(spec.inputs_factory or "", field="[inputs] factory", base=spec.base_dir)
        check_kwargs(factory, spec.inputs_kwargs, field=kwargs_field("inputs"))


def placement_for(spec: RunSpec, side: SideSpec) -> tuple[str, torch.dtype | None]:
    """The device and dtype a side runs in: its own setting, else the spec's ``[run]`` one."""
    device = side.device or spec.device
    name = side.dtype or spec.dtype
    if name is None:
        return device, None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SpecError(f"[{side.name}] dtype={name!r} is not a torch dtype; use float32, bfloat16, float16, float64")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"[{side.name}] device={device!r} but CUDA is not available on this machine; use cpu")
    return device, dtype


def caller_for(spec: RunSpec, side: SideSpec, *, in_context: bool = True) -> Callable[[nn.Module, Any], Any]:
    """How to call a side's model: its ``call`` (method name or ``module:function``), else ``model(**inputs)``,
    inside its ``context`` when it has one (``in_context=False``: the caller enters it, as bisection does)."""
    call = _plain_caller(spec, side)
    return with_context(call, context_for(spec, side)) if in_context else call


def context_for(spec: RunSpec, side: SideSpec) -> ContextFn | None:
    """A side's ``context`` function, resolved (``None`` without one)."""
    if not side.context:
        return None
    return resolve(side.context, field=f"[{side.name}] context", base=spec.base_dir)


def _plain_caller(spec: RunSpec, side: SideSpec) -> Callable[[nn.Module, Any], Any]:
    if not side.call:
        return lambda model, inputs: default_call(model, inputs)
    if ":" in side.call:
        return resolve(side.call, field=f"[{side.name}] call", base=spec.base_dir)
    method = side.call

    def call_method(model: nn.Module, inputs: Any) -> Any:
        bound = getattr(model, method, None)
        if not callable(bound):
            raise SpecError(f"[{side.name}] call={method!r}: {type(model).__name__} has no such method")
        return default_call(bound, inputs)

    return call_method


def _invoke(call: Callable[[nn.Module, Any], Any], model: nn.Module, inputs: Any, *, side: str, step: int) -> Any:
    try:
        return call(model, inputs)
    except TracediffError:
        raise
    except Exception as exc:
        raise _call_error(side, step, exc) from exc


def _call_error(side: str, step: int, exc: Exception) -> SpecError:
    return SpecError(model_call_message(side, step, exc))


# -- isolated sides ---------------------------------------------------------------
def spec_to_json(spec: RunSpec) -> str:
    data = dataclasses.asdict(spec)
    data["base_dir"] = str(spec.base_dir)
    return json.dumps(data)


def spec_from_json(text: str) -> RunSpec:
    data = json.loads(text)
    data["upstream"] = SideSpec(**data["upstream"])
    data["port"] = SideSpec(**data["port"])
    data["base_dir"] = Path(data["base_dir"])
    return RunSpec(**data)


def _trace_in_subprocess(spec: RunSpec, side: str, out_dir: Path, progress: RunProgress | None) -> SideResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_file = out_dir / f".{side}-spec.json"
    spec_file.write_text(spec_to_json(spec))
    result_file = out_dir / f".{side}-result.json"
    command = [sys.executable, "-m", "tracediff.pipeline.side_worker",
               str(spec_file), side, str(out_dir), str(result_file)]
    if progress:
        progress.phase("start", side)
    with _cleanup(spec_file, result_file):
        stderr, returncode = _run_worker(command, progress)
        if returncode != 0 or not result_file.exists():
            if debug_enabled():  # --debug: the side process's own traceback, then the one-line message
                sys.stderr.write(stderr)
            lines = [line for line in stderr.splitlines() if line.strip()]
            detail = lines[-1] if lines else f"exit code {returncode}"
            prefix = "tracediff-worker: "
            if detail.startswith(prefix):
                raise SpecError(detail[len(prefix):])
            raise SpecError(f"--isolate-sides: the {side} process failed: {detail}")
        data = json.loads(result_file.read_text())
    return SideResult(side, Path(data["trace"]), data["seconds"], data["records"], data["failures"])


def _run_worker(command: list[str], progress: RunProgress | None) -> tuple[str, int]:
    """Run a side worker; its progress events come back on a pipe of their own (stderr stays for errors)."""
    if progress is None:
        proc = subprocess.run(command, capture_output=True, text=True)
        return proc.stderr, proc.returncode
    read_fd, write_fd = os.pipe()
    try:
        worker = subprocess.Popen([*command, "--progress-fd", str(write_fd)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, pass_fds=(write_fd,))
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the worker holds its own copy; EOF on read_fd once it exits
    reader = threading.Thread(target=forward_events, args=(read_fd, progress), name="tracediff-worker-progress",
                              daemon=True)
    reader.start()
    try:
        _, stderr = worker.communicate()
    except BaseException:
        worker.kill()
        worker.wait()
        raise
    finally:
        reader.join(timeout=10)
    return stderr, worker.returncode


@contextlib.contextmanager
def _cleanup(*paths: Path) -> Iterator[None]:
    try:
        yield
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
