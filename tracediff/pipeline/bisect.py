"""Bisect a run spec: build both sides as ``tracediff run`` does, then drill down in-process.

Unlike ``run``, bisection needs both models in memory at once (the port is fed
the upstream's outputs), so ``--isolate-sides`` has no equivalent here.
"""

from __future__ import annotations

from typing import Any

from tracediff.bisect.drill import bisect_models
from tracediff.bisect.isolate import Transform
from tracediff.bisect.noise import DEFAULT_NOISE_FACTOR, compute_dtype
from tracediff.bisect.result import BisectResult
from tracediff.pipeline.spec import RunSpec
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
    from tracediff.errors import SpecError
    from tracediff.pipeline.analyse import spec_path, tolerance_from
    from tracediff.pipeline.runner import build_model, caller_for, clone_inputs, context_for, make_inputs, placement_for
    from tracediff.preflight import check_models

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
        tolerance=tolerance if tolerance is not None else tolerance_from(
            preset_name=spec.preset, atol=spec.atol, rtol=spec.rtol),
        upstream_call=upstream_call, port_call=calls["port"],
        upstream_context=context_for(spec, spec.upstream), port_context=context_for(spec, spec.port),
        noise_floor=noise_floor, noise_factor=noise_factor, transforms=transforms, max_depth=max_depth,
        low_memory=low_memory,
    )
    result.preflight = preflight
    return result
