"""Bisection of a run spec: build both sides as ``tracediff run`` does, drill down in-process, print the result.

Used by ``tracediff bisect`` and by ``tracediff run --bisect`` after its report. Unlike ``run``, bisection needs
both models in memory at once (the port is fed the upstream's outputs), so ``--isolate-sides`` has no equivalent
here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from tracediff.bisect.drill import bisect_models
from tracediff.bisect.isolate import Transform
from tracediff.bisect.noise import DEFAULT_NOISE_FACTOR, compute_dtype
from tracediff.bisect.result import BisectResult
from tracediff.errors import SpecError, TracediffError
from tracediff.pipeline.run_folder import BISECT_JSON
from tracediff.pipeline.runner import build_model, caller_for, clone_inputs, context_for, make_inputs, placement_for
from tracediff.pipeline.spec import RunSpec, spec_path
from tracediff.preflight import check_models
from tracediff.render.bisect import dumps, render_terminal
from tracediff.render.report import wide_console
from tracediff.tolerance import Tolerance


def bisect_spec(
    spec: RunSpec,
    *,
    step: int | None = None,
    tolerance: Tolerance | str | None = None,
    noise_floor: bool = False,
    noise_factor: float = DEFAULT_NOISE_FACTOR,
    transforms: dict[str, Transform] | None = None,
    max_depth: int | None = None,
    low_memory: bool = False,
) -> BisectResult:
    """Build both sides of ``spec``, make the inputs of its steps, and bisect.

    Args:
        spec: a validated run spec.
        step: bisect only this step (default: the first step whose top level drifts).
        tolerance: overrides the spec's ``[tolerance]``.
        noise_floor, noise_factor, transforms, max_depth, low_memory: see :func:`tracediff.bisect.bisect_models`.

    Raises:
        SpecError: a side cannot be built or called, a step out of range.
        BisectError: nothing aligned.
    """
    if step is not None and not 0 <= step < spec.steps:
        raise SpecError(f"--step {step} is out of range: the spec runs {spec.steps} step(s) (0..{spec.steps - 1})")
    models: dict[str, Any] = {}
    calls: dict[str, Any] = {}
    placements: dict[str, Any] = {}
    for side in ("upstream", "port"):
        side_spec = spec.side(side)
        device, dtype = placement_for(spec, side_spec)
        placements[side] = (device, dtype)
        models[side] = build_model(spec, side_spec, device=device, dtype=dtype)
        calls[side] = caller_for(spec, side_spec, in_context=False)  # bisection enters the context itself
    device, dtype = placements["port"]
    step_inputs = [clone_inputs(make_inputs(spec, index), device=device, dtype=dtype) for index in range(spec.steps)]
    up_device, up_dtype = placements["upstream"]

    def upstream_call(model: Any, inputs: Any) -> Any:
        # Cast to the model's own dtype, not the spec's: the noise-floor copy runs in higher precision.
        cast = compute_dtype(model) if up_dtype is not None else None
        return calls["upstream"](model, clone_inputs(inputs, device=up_device, dtype=cast))

    mapping, param_map = spec_path(spec.map, spec.base_dir), spec_path(spec.param_map, spec.base_dir)
    preflight = check_models(models["upstream"], models["port"], mapping=mapping, param_map=param_map)
    result = bisect_models(
        models["upstream"], models["port"], step_inputs=step_inputs, step=step,
        mapping=mapping, param_map=param_map,
        tolerance=tolerance if tolerance is not None else spec.tolerance(),
        upstream_call=upstream_call, port_call=calls["port"],
        upstream_context=context_for(spec, spec.upstream), port_context=context_for(spec, spec.port),
        noise_floor=noise_floor, noise_factor=noise_factor, transforms=transforms, max_depth=max_depth,
        low_memory=low_memory,
    )
    result.preflight = preflight
    return result


def print_bisection(result: BisectResult, *, as_json: bool, stream: TextIO | None = None) -> None:
    """Print a bisection result to ``stream`` (stdout): JSON, or the rich terminal report."""
    stream = stream or sys.stdout
    if as_json:
        stream.write(dumps(result))
        return
    render_terminal(result, wide_console(stream))


def bisect_after_run(spec: RunSpec, out_dir: Path, *, as_json: bool, stream: TextIO) -> int:
    """The end of ``tracediff run --bisect``: bisect the same spec, write ``bisect.json``, print.

    A bisection that cannot run never hides the first-drift report printed before it.

    Returns:
        0 when nothing adds error, 1 when a culprit or differing outputs were found, 2 when
        the bisection itself could not run (the first-drift report above stands).
    """
    try:
        result = bisect_spec(spec)
    except TracediffError as exc:
        print(f"tracediff run --bisect: error: {exc}", file=sys.stderr)
        return 2
    path = out_dir / BISECT_JSON
    path.write_text(dumps(result))
    if not as_json:
        stream.write("\n")
        print_bisection(result, as_json=False, stream=stream)
        stream.write(f"bisection: {path}\n")
    return 0 if result else 1

