"""What a pre-flight check found: one verdict per parameter, one per model input.

Kept free of torch and of the comparison code so reports, JSON and the CLI can
read a result without knowing how it was computed (live tensors or trace
fingerprints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

ParamStatus = Literal[
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
]
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
#: How each verdict reads in a counts line.
STATUS_WORDS: dict[str, str] = {
    "identical": "identical",
    "close": "equal within tolerance",
    "padded": "padded with zero rows",
    "tied": "tied",
    "computed": "computed (not in the state dict)",
    "transposed": "transposed",
    "reshaped": "reshaped",
    "scaled": "scaled",
    "permuted": "permuted",
    "swapped": "swapped pieces",
    "different": "different",
    "shape_mismatch": "shape-mismatched",
    "missing_in_port": "missing in port",
    "missing_in_upstream": "missing in upstream",
    "unverified": "not verified",
}

InputStatus = Literal["identical", "close", "different", "shape_mismatch", "missing_in_port", "missing_in_upstream"]
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
        if self.port is None:
            return "-"
        rows = f"[{self.port_rows[0]}:{self.port_rows[1]}]" if self.port_rows else ""
        return self.port + rows

    @property
    def upstream_label(self) -> str:
        if self.upstream is None:
            return "-"
        rows = f"[{self.upstream_rows[0]}:{self.upstream_rows[1]}]" if self.upstream_rows else ""
        return self.upstream + rows

    @property
    def subject(self) -> str:
        """The parameter a line is about: the port's, else the upstream's."""
        name = self.port_label if self.port is not None else f"upstream {self.upstream_label}"
        return name + (" (buffer)" if self.kind == "buffer" else "")

    def describe(self) -> str:
        """The verdict without the subject (``scaled by 0.5 vs upstream ...``)."""
        up = f"upstream {self.upstream_label}"
        numbers = _numbers(self.max_abs, self.rel, self.exact)
        extra = f"; {self.detail}" if self.detail else ""
        status = self.status
        if status == "identical":
            return f"identical to {up}" + (f" ({self.detail})" if self.detail else "")
        if status == "close":
            return f"equal to {up} within tolerance ({numbers}{extra})"
        if status == "padded":
            shapes = f"{shape_text(self.upstream_shape)} -> {shape_text(self.port_shape)}"
            close = f", equal within tolerance ({numbers})" if self.max_abs is not None else ""
            n_up = self.upstream_shape[0] if self.upstream_shape else 0
            n_port = self.port_shape[0] if self.port_shape else 0
            if n_port >= n_up:
                return f"padded from {n_up} to {n_port} rows with zeros: holds {up}'s values{close} ({shapes}){extra}"
            return (f"holds {up}'s first {n_port} rows{close}; upstream padded from {n_port} to {n_up} rows "
                    f"with zeros ({shapes}){extra}")
        if status == "tied":
            return f"tied to {self.detail}" if self.detail else "tied to another tensor of its side"
        if status == "computed":
            return "not in the state dict (computed at construction), not converted" + (
                f"; {self.detail}" if self.detail else "")
        if status == "transposed":
            return (f"transposed: holds {up} transposed "
                    f"({shape_text(self.upstream_shape)} -> {shape_text(self.port_shape)}){extra}")
        if status == "reshaped":
            return (f"reshaped: same values as {up} "
                    f"({shape_text(self.upstream_shape)} -> {shape_text(self.port_shape)}){extra}")
        if status == "scaled":
            return f"scaled by {_factor(self.scale)} vs {up} ({numbers}){extra}"
        if status == "permuted":
            return f"same values as {up}, different order (permutation?){extra}"
        if status == "swapped":
            return "swapped pieces: " + (self.detail or f"holds another piece of the fused tensor, not {up}")
        if status == "different":
            if self.max_abs is None and self.rel is None:
                return f"different from {up}" + (f": {self.detail}" if self.detail else "")
            return f"different from {up}: {numbers}{extra}"
        if status == "shape_mismatch":
            return (f"shape {shape_text(self.port_shape)} vs {up} {shape_text(self.upstream_shape)}"
                    f"{extra}")
        if status == "missing_in_port":
            return "missing in port" + (f" ({self.detail})" if self.detail else "")
        if status == "missing_in_upstream":
            return "missing in upstream" + (f" ({self.detail})" if self.detail else "")
        return f"not verified against {up}" + (f": {self.detail}" if self.detail else "")

    def line(self) -> str:
        """One line naming the parameter and its verdict."""
        return f"{self.subject} {self.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "finding": self.finding,
            "upstream": self.upstream,
            "port": self.port,
            "upstream_module": self.upstream_module,
            "port_module": self.port_module,
            "kind": self.kind,
            "upstream_shape": list(self.upstream_shape) if self.upstream_shape is not None else None,
            "port_shape": list(self.port_shape) if self.port_shape is not None else None,
            "upstream_dtype": self.upstream_dtype,
            "port_dtype": self.port_dtype,
            "port_rows": list(self.port_rows) if self.port_rows else None,
            "upstream_rows": list(self.upstream_rows) if self.upstream_rows else None,
            "max_abs": _clean(self.max_abs),
            "rel": _clean(self.rel),
            "scale": _clean(self.scale),
            "exact": self.exact,
            "detail": self.detail,
            "line": self.line(),
        }


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

    @property
    def where(self) -> str:
        return f"step {self.step}" + (f", call {self.call}" if self.call else "")

    def describe(self) -> str:
        """The verdict without the argument's name: ``max-abs 3.0e-02, rel 1.2e-02 (all 256 elements)``."""
        if self.status == "missing_in_port":
            return "given to upstream only"
        if self.status == "missing_in_upstream":
            return "given to the port only"
        if self.status == "shape_mismatch":
            return f"shape {shape_text(self.shape)} vs upstream {shape_text(self.upstream_shape)}"
        if self.status == "different":
            numbers = []
            if self.max_abs is not None:
                numbers.append(f"max-abs {_num(self.max_abs)}")
            if self.rel is not None:
                numbers.append(f"rel {_num(self.rel)}")
            tail = "; ".join(part for part in (self.compared, self.detail) if part)
            return ", ".join(numbers) + (f" ({tail})" if tail and numbers else tail)
        verdict = "identical" if self.status == "identical" else "equal within tolerance"
        return verdict + (f" ({self.detail})" if self.detail else "")

    def line(self) -> str:
        """``inputs differ at step 0: `context` max-abs 3.0e-02, rel 1.2e-02 (all 256 elements)``."""
        who = f"`{self.name}`"
        if self.label is not None and self.upstream_label is not None and self.upstream_label != self.label:
            who += f" (upstream `{input_name(self.upstream_label)}`)"
        if self.finding:
            return f"inputs differ at {self.where}: {who} {self.describe()}"
        return f"inputs at {self.where}: {who} {self.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "finding": self.finding,
            "step": self.step,
            "call": self.call,
            "name": self.name,
            "label": self.label,
            "upstream_label": self.upstream_label,
            "shape": list(self.shape) if self.shape is not None else None,
            "upstream_shape": list(self.upstream_shape) if self.upstream_shape is not None else None,
            "dtype": self.dtype,
            "upstream_dtype": self.upstream_dtype,
            "max_abs": _clean(self.max_abs),
            "rel": _clean(self.rel),
            "compared": self.compared,
            "detail": self.detail,
            "line": self.line(),
        }


@dataclass
class PreflightResult:
    """Weights and inputs of two models, checked before any layer is blamed. Truthy when clean.

    Attributes:
        params: one verdict per upstream parameter/buffer, plus port-only ones.
        inputs: one verdict per input tensor per step and call (empty when not checked).
        source: ``models`` (live tensors, exact) or ``traces`` (fingerprints).
        weights_checked: False when a side had no module table (a FastVideo JSONL import).
        inputs_checked: False when neither trace holds the model's inputs.
        notes: what limited the check (a parameter map the aligner refused, ...).
    """

    params: list[ParamCheck] = field(default_factory=list)
    inputs: list[InputCheck] = field(default_factory=list)
    source: str = "traces"
    weights_checked: bool = True
    inputs_checked: bool = False
    notes: list[str] = field(default_factory=list)
    #: port modules the alignment left unpaired: the diff never compares their outputs
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
    def counts(self) -> dict[str, int]:
        """Verdicts per status, in :data:`PARAM_STATUSES` order, zeros left out."""
        found = {status: 0 for status in PARAM_STATUSES}
        for check in self.params:
            found[check.status] = found.get(check.status, 0) + 1
        return {status: n for status, n in found.items() if n}

    def counts_line(self) -> str:
        """``123 parameters compared: 120 identical, 1 transposed, 1 scaled, 1 missing in port``."""
        if not self.weights_checked:
            return "weights not checked (a trace holds no module table)"
        buffers = any(p.kind == "buffer" for p in self.params)
        what = "parameters and buffers" if buffers else "parameters"
        if not self.params:
            return f"no {what} to compare"
        parts = [f"{n} {STATUS_WORDS.get(status, status)}" for status, n in self.counts.items()]
        return f"{len(self.params)} {what} compared: {', '.join(parts)}"

    def inputs_line(self) -> str:
        """``inputs identical (3 tensors, steps 0-2)`` or ``inputs differ at step 0 (`context`)``."""
        if not self.inputs_checked:
            return "inputs not checked (" + ("no forward pass" if self.source == "models" else "not recorded") + ")"
        bad = self.input_findings
        steps = sorted({i.step for i in self.inputs})
        if not bad:
            per_step = len(self.inputs) // max(len(steps), 1)
            cast = any(i.status == "close" for i in self.inputs)
            verdict = "inputs equal up to a dtype cast" if cast else "inputs identical"
            return f"{verdict} ({per_step} tensor{'s' if per_step != 1 else ''}, {_steps(steps)})"
        bad_steps = sorted({i.step for i in bad})
        names = list(dict.fromkeys(f"`{i.name}`" for i in bad))
        return f"inputs differ at {_steps(bad_steps)} ({', '.join(names)})"

    def summary(self) -> str:
        """The one line: ``pre-flight: clean; 123 parameters compared: 123 identical; inputs identical (...)``."""
        failing = [p for p in self.params if p.failing] + self.input_findings
        plural = "s" if len(failing) != 1 else ""
        head = "pre-flight: clean" if bool(self) else f"pre-flight: {len(failing)} finding{plural}"
        return f"{head}; {self.counts_line()}; {self.inputs_line()}"

    def for_port_module(self, module: str) -> list[ParamCheck]:
        """Failing weight verdicts on ``module`` itself (the port's name)."""
        return [p for p in self.params if p.failing and p.port_module == module]

    def likely_cause(self, port_module: str | None, step: int | None = None) -> str | None:
        """What the pre-flight says about a first drift at ``port_module`` in ``step``.

        Differing inputs at that step explain everything downstream; otherwise a
        weight finding on the drifting module itself is the likely cause, and one
        on a module inside it, or on an unaligned module beside it (whose output
        the diff never saw), a possible one.
        """
        inputs = [i for i in self.input_findings if step is None or i.step == step]
        if inputs:
            return f"likely cause: {inputs[0].line()}"
        if port_module is None:
            return None
        own = self.for_port_module(port_module)
        if own:
            return f"likely cause: {own[0].line()}" + (f" (and {len(own) - 1} more)" if len(own) > 1 else "")
        inside = [p for p in self.params if p.failing and p.port_module is not None
                  and _within(p.port_module, port_module)]
        if inside:
            return f"possible cause (inside the drifting module): {inside[0].line()}"
        # A module the diff could not compare (no aligned partner) next to the drifting one.
        parent = port_module.rsplit(".", 1)[0] if "." in port_module else ""
        near = [p for p in self.params if p.failing and p.port_module in self.unaligned_port
                and _within(p.port_module, parent)]
        if near:
            return f"possible cause (a module next to it the diff could not compare): {near[0].line()}"
        return None

    def to_dict(self, *, first_drift_port: str | None = None, first_drift_step: int | None = None) -> dict[str, Any]:
        """Plain data for JSON reports; every parameter verdict is listed."""
        return {
            "ok": bool(self),
            "summary": self.summary(),
            "source": self.source,
            "weights_checked": self.weights_checked,
            "inputs_checked": self.inputs_checked,
            "counts": self.counts,
            "counts_line": self.counts_line(),
            "inputs_line": self.inputs_line(),
            "likely_cause": self.likely_cause(first_drift_port, first_drift_step)
            if first_drift_port is not None or first_drift_step is not None else None,
            "findings": [p.line() for p in self.weight_findings] + [i.line() for i in self.input_findings],
            "params": [p.to_dict() for p in self.params],
            "inputs": [i.to_dict() for i in self.inputs],
            "notes": list(self.notes),
        }


# -- formatting --------------------------------------------------------------------------


def input_name(label: str | None) -> str:
    """``context`` for ``input.context``; positional ``input[0]`` stays as it is."""
    if label is None:
        return "?"
    return label[len("input."):] if label.startswith("input.") else label


def shape_text(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "?"
    return "×".join(map(str, shape)) or "()"


def _numbers(max_abs: float | None, rel: float | None, exact: bool) -> str:
    parts = []
    if max_abs is not None:
        parts.append(f"max-abs {_num(max_abs)}")
    if rel is not None:
        parts.append(f"rel {_num(rel)}")
    if not parts:
        return "values not comparable element-wise"
    return ", ".join(parts) + ("" if exact else " over the sampled values")


def _num(value: float | None) -> str:
    """Errors in scientific notation (``3.0e-02``), so columns of them compare at a glance."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return "0" if value == 0 else f"{value:.1e}"


def _factor(value: float | None) -> str:
    """A scale factor as people write it: ``0.5``, ``-1``, ``1.001``."""
    return "-" if value is None else f"{value:.4g}"


def _clean(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _steps(steps: list[int]) -> str:
    if not steps:
        return "no step"
    if len(steps) == 1:
        return f"step {steps[0]}"
    if len(steps) > 2 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}-{steps[-1]}"
    shown = ", ".join(map(str, steps[:8]))
    return f"steps {shown}" + (f", … ({len(steps)} in all)" if len(steps) > 8 else "")


def _within(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(ancestor + ".")
