"""What bisection found: per-module local errors, the levels it drilled through, the operator.

Plain data classes; :mod:`tracediff.render.bisect` puts them into words and
every decision was made by :mod:`tracediff.bisect.drill`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tracediff.bisect.metrics import Metrics
from tracediff.preflight.result import PreflightResult
from tracediff.results import json_ready
from tracediff.tolerance import Tolerance


@dataclass(frozen=True)
class ModuleMeasurement:
    """One aligned module call, measured three ways: its local, accumulated and noise-floor errors.

    Attributes:
        port, upstream: module names on each side.
        step: index of the step (input set) measured; ``call``: which call of the module in it.
        order: position of the call in the port's execution order within the pass.
        local: the port's output when fed the reference's inputs, against the reference
            (``None`` when the module is not isolatable).
        accumulated: the port's output when it runs freely, against the reference.
        noise: the upstream's own local error under a harmless precision change
            (``None`` without noise-floor calibration).
        reason: why the module is not isolatable (empty when it is).
        inputs_forced: whether the module was also handed the reference's inputs.
        input_drift: the port's own inputs against the reference's (when compatible).
        transformed: whether a user transform adapted the reference output's layout.
        drifts: whether this module adds error (local error over tolerance, or over
            ``noise_factor`` times its noise floor when calibrated).
        noise_ratio: local relative L2 error over the noise floor (calibrated runs only).
    """

    port: str
    upstream: str
    step: int
    call: int
    order: int
    local: Metrics | None
    accumulated: Metrics | None
    noise: Metrics | None = None
    reason: str = ""
    inputs_forced: bool = False
    input_drift: Metrics | None = None
    transformed: bool = False
    drifts: bool = False
    noise_ratio: float | None = None

    @property
    def isolatable(self) -> bool:
        return self.local is not None

    @property
    def amplification(self) -> float | None:
        """Accumulated over local relative L2 error: how much the error reaching it was amplified."""
        if self.local is None or self.accumulated is None:
            return None
        local, acc = self.local.rel_l2, self.accumulated.rel_l2
        if local == 0:
            return math.inf if acc > 0 else 1.0
        return acc / local

    def to_json(self) -> dict[str, Any]:
        return json_ready({
            "port": self.port,
            "upstream": self.upstream,
            "step": self.step,
            "call": self.call,
            "isolatable": self.isolatable,
            "reason": self.reason or None,
            "drifts": self.drifts,
            "local": self.local,
            "accumulated": self.accumulated,
            "amplification": self.amplification,
            "noise": self.noise,
            "noise_ratio": self.noise_ratio,
            "inputs_forced": self.inputs_forced,
            "input_drift": self.input_drift,
            "transformed": self.transformed,
        })


@dataclass
class Level:
    """One level of the drill-down: the aligned modules just below ``parent``.

    Attributes:
        depth: 0 for the top level (the blocks), then 1, 2, ... below the culprit.
        parent, parent_upstream: the module whose children were measured (``""`` = model).
        step: the step measured.
        modules: every measured call, in port execution order.
        culprit: the first call that adds error, or ``None`` when all are clean.
        forward_passes: full-model forward passes this level took.
    """

    depth: int
    parent: str
    parent_upstream: str
    step: int
    modules: list[ModuleMeasurement]
    culprit: ModuleMeasurement | None
    forward_passes: int

    def to_json(self) -> dict[str, Any]:
        return json_ready({
            "depth": self.depth,
            "parent": self.parent,
            "parent_upstream": self.parent_upstream,
            "step": self.step,
            "culprit": self.culprit.port if self.culprit else None,
            "forward_passes": self.forward_passes,
            "modules": self.modules,
        })


@dataclass(frozen=True)
class Source:
    """Where an operator was called: the first frame outside torch and tracediff's own code."""

    file: str
    line: int
    function: str
    code: str



@dataclass(frozen=True)
class OpRef:
    """One operator output on one side."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    source: Source | None
    #: the child with no counterpart it ran in, relative to the traced module ("" = the module's own code)
    module: str = ""

    def to_json(self) -> dict[str, Any]:
        return json_ready({
            "index": self.index,
            "op": self.name,
            "shape": self.shape,
            "dtype": self.dtype,
            "source": self.source,
            "module": self.module,
        })


@dataclass
class OpFinding:
    """The operator-level answer inside a module that drifts while its aligned children do not.

    Attributes:
        module, upstream_module: the module traced on each side.
        port_op, upstream_op: the first port operator whose output differs from its
            upstream counterpart, and that counterpart (``None`` when none was found).
        metrics: how far apart they are (compared up to a permutation of dimensions).
        last_match: the last port operator before it whose output matched upstream.
        suspects: port operators feeding ``port_op`` with no upstream counterpart
            (the bug is in one of them, or in ``port_op`` itself), in execution order.
        port_ops, upstream_ops: how many operator outputs were recorded on each side.
        matched: how many port outputs matched an upstream output.
        note: why no operator could be named, when none was.
        settings: differing ``extra_repr()`` of the two modules (``(port, upstream)``), if any.
    """

    module: str
    upstream_module: str
    port_op: OpRef | None = None
    upstream_op: OpRef | None = None
    metrics: Metrics | None = None
    last_match: tuple[OpRef, OpRef] | None = None
    suspects: list[OpRef] = field(default_factory=list)
    port_ops: int = 0
    upstream_ops: int = 0
    matched: int = 0
    note: str = ""
    settings: tuple[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        return json_ready({
            "module": self.module,
            "upstream_module": self.upstream_module,
            "port_op": self.port_op,
            "upstream_op": self.upstream_op,
            "metrics": self.metrics,
            "last_match": self.last_match or None,
            "suspects": self.suspects,
            "port_ops": self.port_ops,
            "upstream_ops": self.upstream_ops,
            "matched": self.matched,
            "note": self.note or None,
            "settings": {"port": self.settings[0], "upstream": self.settings[1]} if self.settings else None,
        })


@dataclass
class BisectResult:
    """Outcome of :func:`tracediff.bisect.bisect_models`; truthy when nothing drifts.

    Attributes:
        tolerance: what local errors were held to.
        path: the levels drilled through, top first.
        culprit, culprit_upstream: the module that adds the error (``""`` is the model's
            own forward), or ``None`` when nothing drifts.
        culprit_error: its measurement (``None`` for the model itself).
        operator: the operator-level finding inside the culprit, when one was traced.
        output: the port's model output against upstream's, in the bisected step.
        output_drifts: whether that output breaks tolerance.
        step: the step bisected (index into the inputs given).
        steps_checked: steps measured at the top level before one drifted.
        forward_passes: full-model forward passes, both sides, calibration included.
        module_calls: single-module calls made by the operator-level trace.
        noise_floor: whether local errors (and the outputs) were judged against a calibrated noise floor.
        noise_factor: how many times its noise floor a module's local error may be.
        notes: things worth knowing that are not findings.
        output_floor: the model output's own noise floor (calibrated runs only).
        found_in: when the culprit is a module with no upstream counterpart, the isolated
            module whose operator trace found it running inside (``None`` otherwise).
        preflight: the weights check of the two live models (a
            :class:`~tracediff.preflight.PreflightResult`), when the caller ran one: a conversion
            mistake is named there, where bisection alone would blame the module that uses the weight.
    """

    tolerance: Tolerance
    path: list[Level]
    culprit: str | None
    culprit_upstream: str | None
    culprit_error: ModuleMeasurement | None
    operator: OpFinding | None
    output: Metrics | None
    output_drifts: bool
    step: int
    steps_checked: int
    forward_passes: int
    module_calls: int = 0
    noise_floor: bool = False
    noise_factor: float = 0.0
    notes: list[str] = field(default_factory=list)
    output_floor: Metrics | None = None
    found_in: str | None = None
    preflight: PreflightResult | None = None

    def __bool__(self) -> bool:
        return self.culprit is None and not self.output_drifts

    @property
    def chain(self) -> list[ModuleMeasurement]:
        """The culprit of each level, top first: the path from the model root to the culprit."""
        return [level.culprit for level in self.path if level.culprit is not None]

    def to_json(self) -> dict[str, Any]:
        """Every figure as plain data (:func:`tracediff.render.bisect.to_json` adds the words)."""
        return {
            "ok": bool(self),
            "culprit": self.culprit,
            "culprit_upstream": self.culprit_upstream,
            "found_in": self.found_in,
            "step": self.step,
            "steps_checked": self.steps_checked,
            "forward_passes": self.forward_passes,
            "module_calls": self.module_calls,
            "tolerance": self.tolerance.to_dict(),  # as the user gave it, an infinite limit included
            "noise_floor": self.noise_floor,
            "noise_factor": self.noise_factor if self.noise_floor else None,
            "output": json_ready(self.output),
            "output_drifts": self.output_drifts,
            "output_floor": json_ready(self.output_floor),
            "path": json_ready(self.chain),
            "levels": json_ready(self.path),
            "operator": json_ready(self.operator),
            "notes": self.notes,
            "preflight": json_ready(self.preflight),
        }
