"""Parity checks that diagnose themselves: compare two models, and on failure say where they part.

This is the work behind the pytest plugin's ``parity`` fixture; the plugin
module itself only wires options, fixtures and hooks to it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tracediff.bisect.drill import bisect_models
from tracediff.call_context import ContextFn, clone_inputs, default_call, pick, with_context
from tracediff.config import ENV_LAYERS, ENV_STATS, TraceConfig, parse_stats
from tracediff.hooks.flatten import iter_tensors
from tracediff.pipeline.analyse import Analysis, analyse
from tracediff.pipeline.run_folder import BISECT_JSON, TRACE_FILES
from tracediff.pipeline.runner import trace_model
from tracediff.pipeline.spec import DEFAULT_STATS
from tracediff.render.bisect import dumps, text
from tracediff.results import json_ready
from tracediff.tolerance import Tolerance, ToleranceChoiceError, resolve

#: what a failing parity test gets: nothing, the first-drift report, or the report and a bisection
Mode = Literal["off", "report", "bisect"]
CallFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class Settings:
    """Session-wide plugin settings (from ``--tracediff*`` options and the environment)."""

    mode: Mode = "report"
    root: Path = Path(".tracediff")
    layers: str | None = None
    stats: str = DEFAULT_STATS
    #: record module inputs too (``--tracediff-inputs``/``TRACEDIFF_TRACE_INPUTS``)
    inputs: bool = True

    @classmethod
    def from_options(cls, *, mode: Mode, root: str, layers: str | None, stats: str | None,
                     inputs: bool = True) -> Settings:
        return cls(
            mode=mode,
            root=Path(root),
            layers=layers if layers is not None else (os.environ.get(ENV_LAYERS) or None),
            stats=stats or os.environ.get(ENV_STATS) or DEFAULT_STATS,
            inputs=inputs,
        )


@dataclass
class PairSpec:
    """Two models, their inputs, how to call them, and how to align and judge them."""

    upstream: nn.Module
    port: nn.Module
    inputs: Any
    upstream_call: CallFn | None = None
    port_call: CallFn | None = None
    mapping: Any = None
    param_map: Any = None
    tolerance: Tolerance = field(default_factory=Tolerance)
    #: context functions entered around every call of each side (``tracediff.call_context``)
    upstream_context: ContextFn | None = None
    port_context: ContextFn | None = None


@dataclass
class Diagnosis:
    """What the automatic diagnosis found, or why it could not run."""

    out_dir: Path
    analysis: Analysis | None = None
    error: str | None = None
    #: the drill-down's report (``--tracediff=bisect`` only)
    bisection: str | None = None

    def __bool__(self) -> bool:
        """True when the diagnosis ran and found the two models in agreement."""
        return self.analysis is not None and bool(self.analysis)

    def to_json(self) -> dict[str, Any]:
        return json_ready({"out_dir": self.out_dir, "analysis": self.analysis, "error": self.error,
                           "bisection": self.bisection})

    def section(self) -> str:
        """The text appended to a failing test's output."""
        if self.analysis is None:
            return (f"tracediff: the diagnosis itself failed: {self.error}\n"
                    f"(the test's own failure above is unaffected; artifacts, if any: {self.out_dir})")
        lines = [self.analysis.text().rstrip(), f"tracediff artifacts: {self.out_dir}/ "
                 "(upstream.h5, port.h5, report.json, report.html)"]
        if self.bisection:
            lines.append(self.bisection.rstrip())
        return "\n".join(lines)


def run_pair(pair: PairSpec) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """Run both models once on private copies of the inputs; return their labelled output tensors."""
    with torch.no_grad():
        up = _call(with_context(pair.upstream_call or _default, pair.upstream_context), pair.upstream,
                   clone_inputs(pair.inputs))
        port = _call(with_context(pair.port_call or _default, pair.port_context), pair.port, clone_inputs(pair.inputs))
    return list(iter_tensors(up)), list(iter_tensors(port))


def compare_outputs(pair: PairSpec) -> str | None:
    """``torch.testing.assert_close`` of every output tensor; the failure message, or None."""
    upstream, port = run_pair(pair)
    up_labels = [label for label, _ in upstream]
    port_labels = [label for label, _ in port]
    if up_labels != port_labels:
        return f"outputs differ in structure: upstream gives {up_labels}, port gives {port_labels}"
    tol = pair.tolerance
    for (label, expected), (_, actual) in zip(upstream, port, strict=True):
        try:
            torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol, check_dtype=False,
                                       check_device=False)
        except AssertionError as exc:
            return f"port output {label!r} differs from upstream (atol={tol.atol:g}, rtol={tol.rtol:g}):\n{exc}"
    return None


def diagnose(pair: PairSpec, out_dir: Path, settings: Settings) -> Diagnosis:
    """Trace both models on the same inputs, align, diff, write reports; never raises."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        config = TraceConfig(layers=settings.layers, stats=parse_stats(settings.stats, source="stats"),
                             layers_source="--tracediff-layers",
                             inputs=settings.inputs)
        sides = (("upstream", pair.upstream, with_context(pair.upstream_call or _default, pair.upstream_context)),
                 ("port", pair.port, with_context(pair.port_call or _default, pair.port_context)))
        for side, model, call in sides:
            # The diagnosis folder belongs to this test: a re-run replaces its traces on purpose.
            trace_model(model, side=side, steps=[clone_inputs(pair.inputs)], output=out_dir / TRACE_FILES[side],
                        config=config, call=call, overwrite=True)
        analysis = analyse(out_dir / TRACE_FILES["upstream"], out_dir / TRACE_FILES["port"], mapping=pair.mapping,
                           param_map=pair.param_map, tolerance=pair.tolerance, out_dir=out_dir,
                           models=(pair.upstream, pair.port))  # weights compared exactly, not by fingerprint
        diagnosis = Diagnosis(out_dir=out_dir, analysis=analysis)
        if settings.mode == "bisect":
            diagnosis.bisection = bisect_pair(pair, out_dir, alignment=analysis.alignment)
        return diagnosis
    except Exception as exc:  # the diagnosis must never hide the test's own failure
        return Diagnosis(out_dir=out_dir, error=f"{type(exc).__name__}: {exc}")


def make_pair(upstream: nn.Module, port: nn.Module, inputs: Any, *, atol: float | None = None,
              rtol: float | None = None, preset: str | None = None, map: Any = None, param_map: Any = None,
              call: CallFn | str | None = None, upstream_call: CallFn | str | None = None,
              port_call: CallFn | str | None = None, context: ContextFn | None = None,
              upstream_context: ContextFn | None = None, port_context: ContextFn | None = None) -> PairSpec:
    """Validate the arguments of ``parity.compare``/``parity.register`` into a :class:`PairSpec`."""
    __tracebackhide__ = True  # a bad argument is reported at the test's call, not inside tracediff
    for name, model in (("upstream", upstream), ("port", port)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"parity: {name} must be a torch.nn.Module, got {type(model).__name__}")
    try:
        tolerance = resolve(preset_name=preset, atol=atol, rtol=rtol)
    except ToleranceChoiceError as exc:
        raise TypeError(f"parity: {exc}") from None
    return PairSpec(
        upstream=upstream,
        port=port,
        inputs=inputs,
        upstream_call=_as_call(upstream_call or call),
        port_call=_as_call(port_call or call),
        mapping=map,
        param_map=param_map,
        tolerance=tolerance,
        upstream_context=_as_context(pick(context, upstream_context), "upstream_context"),
        port_context=_as_context(pick(context, port_context), "port_context"),
    )


def bisect_pair(pair: PairSpec, out_dir: Path | None = None, *, alignment: Any = None) -> str:
    """Bisect a pair after its first-drift report (``--tracediff=bisect``); the report as text. Never raises.

    With ``out_dir``, the JSON result is written to ``out_dir/bisect.json`` too. ``alignment``: the one
    first-drift found from both traces (values and execution order pair modules without weights, which
    the live models' definition order cannot); default: aligned from the live models.
    """
    try:
        result = bisect_models(
            pair.upstream, pair.port, pair.inputs, mapping=pair.mapping, param_map=pair.param_map,
            tolerance=pair.tolerance, upstream_call=pair.upstream_call, port_call=pair.port_call,
            upstream_context=pair.upstream_context, port_context=pair.port_context, alignment=alignment,
        )
    except Exception as exc:  # the plugin's diagnosis must survive a bisection that cannot run
        return f"tracediff bisect: could not bisect this pair: {type(exc).__name__}: {exc}"
    if out_dir is not None:
        (out_dir / BISECT_JSON).write_text(dumps(result))
    return "tracediff bisect (local error, teacher forcing):\n" + text(result)


def artifact_dir(root: Path, nodeid: str) -> Path:
    """``.tracediff/<test id>/`` with the id made filesystem-safe."""
    return root / re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")


def _as_call(call: CallFn | str | None) -> CallFn | None:
    if call is None or callable(call):
        return call
    method = call
    return lambda model, inputs: default_call(getattr(model, method), inputs)


def _default(model: nn.Module, inputs: Any) -> Any:
    return default_call(model, inputs)


def _as_context(context: Any, name: str) -> ContextFn | None:
    if context is not None and not callable(context):
        raise TypeError(f"parity: {name} must be a function returning a context manager "
                        f"(e.g. lambda inputs: set_forward_context(...)), got {type(context).__name__}")
    return context


def _call(call: CallFn | None, model: nn.Module, inputs: Any) -> Any:
    return call(model, inputs) if call is not None else default_call(model, inputs)
