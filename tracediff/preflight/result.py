"""What a pre-flight check found: one verdict per parameter, one per model input.

Kept free of torch, of the comparison code and of wording, so reports, JSON and
the CLI can read a result without knowing how it was computed (live tensors or
trace fingerprints); :mod:`tracediff.render.preflight` puts it into words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tracediff.modtree import ROOT, is_within, parent
from tracediff.results import json_ready

#: Every parameter verdict, in the order counts are listed.
PARAM_STATUSES: tuple[str, ...] = (
    "identical",
    "close",
    "padded",
    "tied",
    "computed",
    "transposed",
    "reshaped",
    "scaled",
    "permuted",
    "swapped",
    "different",
    "shape_mismatch",
    "missing_in_port",
    "missing_in_upstream",
    "unverified",
)
#: Verdicts that are not findings: the port holds upstream's values, or nothing needed converting. ``padded``: one
#: side's table is the other's followed by zero rows (a vocabulary padded to a
#: multiple); ``tied``: a tensor on one side only that is the same tensor as (or holds
#: the identical values of) a paired tensor of its own side; ``computed``: a buffer on one
#: side only that is not in its model's ``state_dict()`` (a non-persistent buffer, computed
#: at construction, which no checkpoint conversion carries). All three are listed as notes.
CLEAN_PARAM: frozenset[str] = frozenset({"identical", "close", "padded", "tied", "computed"})
#: Verdicts worth listing that do not make the check fail: a deliberate layout
#: change (a Conv3d kernel kept as a Linear weight) or a fused piece whose order
#: the fingerprints cannot confirm.
NOTE_PARAM: frozenset[str] = frozenset({"reshaped", "unverified"})
#: Input verdicts that are not findings.
CLEAN_INPUT: frozenset[str] = frozenset({"identical", "close"})


@dataclass(frozen=True)
class ParamCheck:
    """The verdict on one upstream parameter (or buffer) and its port counterpart.

    Attributes:
        status: see :data:`PARAM_STATUSES`.
        upstream, port: full parameter names (``blocks.0.ffn.0.weight``); ``None`` on the side that lacks it.
        upstream_module, port_module: owning modules; for a one-sided parameter the other
            side's module is the partner of its owner, when known.
        kind: ``parameter`` or ``buffer`` (the upstream's kind when both exist).
        upstream_shape, port_shape, upstream_dtype, port_dtype: as stored.
        port_rows, upstream_rows: ``(start, stop)`` along dim 0 when one side's tensor is a
            fused concatenation and only that slice was compared.
        max_abs, rel: largest absolute difference and relative L2 error ``||port - up|| / ||up||``
            (over the sampled values when ``exact`` is false).
        scale: the constant factor of a ``scaled`` verdict.
        exact: compared from the tensors themselves (live models) rather than fingerprints.
        detail: the rest of the story, in words.
    """

    status: str
    upstream: str | None
    port: str | None
    upstream_module: str | None = None
    port_module: str | None = None
    kind: str = "parameter"
    upstream_shape: tuple[int, ...] | None = None
    port_shape: tuple[int, ...] | None = None
    upstream_dtype: str | None = None
    port_dtype: str | None = None
    port_rows: tuple[int, int] | None = None
    upstream_rows: tuple[int, int] | None = None
    max_abs: float | None = None
    rel: float | None = None
    scale: float | None = None
    exact: bool = False
    detail: str = ""

    @property
    def finding(self) -> bool:
        """Whether this verdict is worth a user's attention (anything but the same values)."""
        return self.status not in CLEAN_PARAM

    @property
    def failing(self) -> bool:
        """Whether it makes the pre-flight fail (findings minus layout notes)."""
        return self.finding and self.status not in NOTE_PARAM

    @property
    def port_label(self) -> str:
        """The port parameter as shown: ``to_qkv.weight[64:128]`` for a fused slice."""
        return _label(self.port, self.port_rows)

    @property
    def upstream_label(self) -> str:
        return _label(self.upstream, self.upstream_rows)

    def to_json(self) -> dict[str, Any]:
        return json_ready({
            "status": self.status,
            "finding": self.finding,
            "upstream": self.upstream,
            "port": self.port,
            "upstream_module": self.upstream_module,
            "port_module": self.port_module,
            "kind": self.kind,
            "upstream_shape": self.upstream_shape,
            "port_shape": self.port_shape,
            "upstream_dtype": self.upstream_dtype,
            "port_dtype": self.port_dtype,
            "port_rows": self.port_rows,
            "upstream_rows": self.upstream_rows,
            "max_abs": self.max_abs,
            "rel": self.rel,
            "scale": self.scale,
            "exact": self.exact,
            "detail": self.detail,
        })


@dataclass(frozen=True)
class InputCheck:
    """The verdict on one tensor the two models received at a top-level call.

    Attributes:
        status: ``identical``, ``close`` (equal up to a dtype cast), ``different``,
            ``shape_mismatch``, ``missing_in_port`` or ``missing_in_upstream``.
        step, call: the denoising step and the top-level call within it.
        label, upstream_label: record labels (``input.context``, ``input[0]``); they differ when
            the two forwards name an argument differently.
        max_abs, rel: as for parameters; ``None`` when only moments were recorded.
        compared: what the numbers come from (``all 256 elements``, ``256 sampled of 4096 elements``).
    """

    status: str
    step: int
    call: int
    label: str | None
    upstream_label: str | None
    shape: tuple[int, ...] | None = None
    upstream_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    upstream_dtype: str | None = None
    max_abs: float | None = None
    rel: float | None = None
    compared: str = ""
    detail: str = ""

    @property
    def finding(self) -> bool:
        return self.status not in CLEAN_INPUT

    @property
    def name(self) -> str:
        """The argument as the user wrote it: ``context`` for ``input.context``."""
        return input_name(self.label if self.label is not None else self.upstream_label)

    def to_json(self) -> dict[str, Any]:
        return json_ready({
            "status": self.status,
            "finding": self.finding,
            "step": self.step,
            "call": self.call,
            "name": self.name,
            "label": self.label,
            "upstream_label": self.upstream_label,
            "shape": self.shape,
            "upstream_shape": self.upstream_shape,
            "dtype": self.dtype,
            "upstream_dtype": self.upstream_dtype,
            "max_abs": self.max_abs,
            "rel": self.rel,
            "compared": self.compared,
            "detail": self.detail,
        })


#: How a finding explains a first drift: differing inputs at its step; a weight of the drifting module itself;
#: one of a module inside it; one of an unaligned module beside it (whose output the diff never saw).
CauseKind = Literal["inputs", "own", "inside", "near"]


@dataclass(frozen=True)
class Cause:
    """The pre-flight finding that explains a first drift, and how (``more``: further own-weight findings)."""

    kind: CauseKind
    check: ParamCheck | InputCheck
    more: int = 0


@dataclass
class PreflightResult:
    """Weights and inputs of two models, checked before any layer is blamed. Truthy when clean.

    Attributes:
        params: one verdict per upstream parameter/buffer, plus port-only ones.
        inputs: one verdict per input tensor per step and call (empty when not checked).
        source: ``models`` (live tensors, exact) or ``traces`` (fingerprints).
        weights_checked: False when a side had no module table (a FastVideo JSONL import).
        inputs_checked: False when neither trace holds the model's inputs.
        notes: what limited the weights check (a parameter map the aligner refused, ...).
        input_notes: what limited the inputs check (steps recorded on one side only, ...).
        unaligned_port: port modules the alignment left unpaired: the diff never compares their outputs.
    """

    params: list[ParamCheck] = field(default_factory=list)
    inputs: list[InputCheck] = field(default_factory=list)
    source: str = "traces"
    weights_checked: bool = True
    inputs_checked: bool = False
    notes: list[str] = field(default_factory=list)
    input_notes: list[str] = field(default_factory=list)
    unaligned_port: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return not any(p.failing for p in self.params) and not any(i.finding for i in self.inputs)

    @property
    def ok(self) -> bool:
        return bool(self)

    @property
    def weight_findings(self) -> list[ParamCheck]:
        """Every parameter verdict other than identical / within tolerance, layout notes included."""
        return [p for p in self.params if p.finding]

    @property
    def input_findings(self) -> list[InputCheck]:
        return [i for i in self.inputs if i.finding]

    @property
    def failing(self) -> list[ParamCheck | InputCheck]:
        """What makes the check fail: failing weight verdicts, then differing inputs."""
        return [*(p for p in self.params if p.failing), *self.input_findings]

    @property
    def layout(self) -> list[ParamCheck]:
        """Tied, zero-padded and computed tensors: not findings (nothing was converted wrong), worth a note."""
        return [p for p in self.params if p.status in ("padded", "tied", "computed")]

    @property
    def counts(self) -> dict[str, int]:
        """Verdicts per status, in :data:`PARAM_STATUSES` order, zeros left out."""
        found = {status: 0 for status in PARAM_STATUSES}
        for check in self.params:
            found[check.status] = found.get(check.status, 0) + 1
        return {status: n for status, n in found.items() if n}

    def for_port_module(self, module: str) -> list[ParamCheck]:
        """Failing weight verdicts on ``module`` itself (the port's name)."""
        return [p for p in self.params if p.failing and p.port_module == module]

    def cause(self, port_module: str | None, step: int | None = None) -> Cause | None:
        """The finding that explains a first drift at ``port_module`` in ``step``, if any.

        Differing inputs at that step explain everything downstream; otherwise a
        weight finding on the drifting module itself is the likely cause, and one
        on a module inside it, or on an unaligned module beside it (whose output
        the diff never saw), a possible one.
        """
        inputs = [i for i in self.input_findings if step is None or i.step == step]
        if inputs:
            return Cause("inputs", inputs[0])
        if port_module is None:
            return None
        own = self.for_port_module(port_module)
        if own:
            return Cause("own", own[0], more=len(own) - 1)
        inside = [p for p in self.params if p.failing and p.port_module is not None
                  and is_within(p.port_module, port_module, strict=port_module != ROOT)]
        if inside:
            return Cause("inside", inside[0])
        around = parent(port_module)
        near = [p for p in self.params if p.failing and p.port_module in self.unaligned_port
                and is_within(p.port_module, around, strict=around != ROOT)]
        if near:
            return Cause("near", near[0])
        return None

    def to_json(self) -> dict[str, Any]:
        """Every verdict as plain data (:func:`tracediff.render.preflight.preflight_json` adds the words)."""
        return json_ready({
            "ok": bool(self),
            "source": self.source,
            "weights_checked": self.weights_checked,
            "inputs_checked": self.inputs_checked,
            "counts": self.counts,
            "params": self.params,
            "inputs": self.inputs,
            "notes": self.notes,
            "input_notes": self.input_notes,
        })


def input_name(label: str | None) -> str:
    """``context`` for ``input.context``; positional ``input[0]`` stays as it is."""
    if label is None:
        return "?"
    return label[len("input."):] if label.startswith("input.") else label


def _label(name: str | None, rows: tuple[int, int] | None) -> str:
    if name is None:
        return "-"
    return name + (f"[{rows[0]}:{rows[1]}]" if rows else "")
