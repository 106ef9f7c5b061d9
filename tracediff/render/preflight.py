"""Show a :class:`PreflightResult`: one line when clean, a table of findings when not.

Called before the first-drift report (``first-drift``, ``run``, the pytest
section) so a converted-wrong weight or a different input is read before any
layer is blamed. Every sentence about a verdict is made here, from the plain
data :mod:`tracediff.preflight.result` holds. Names come from user models and
are never parsed as markup.
"""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracediff.preflight.result import Cause, InputCheck, ParamCheck, PreflightResult, input_name

#: Findings listed in the terminal before "… and N more".
MAX_ROWS = 20
#: Tied, padded and computed tensors named one by one in the notes; the rest are counted.
MAX_LAYOUT_NOTES = 4
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
#: How each kind of :class:`~tracediff.preflight.result.Cause` is introduced.
CAUSE_WORDS: dict[str, str] = {
    "inputs": "likely cause",
    "own": "likely cause",
    "inside": "possible cause (inside the drifting module)",
    "near": "possible cause (a module next to it the diff could not compare)",
}


def render_preflight(result: PreflightResult, console: Console | None = None, *, diff: Any = None,
                     max_rows: int = MAX_ROWS, show_all: bool = False) -> None:
    """Print the pre-flight verdict; with ``diff`` (a DiffResult), name the likely cause of its first drift.

    Args:
        result: the pre-flight result.
        console: where to print (default a new console on stdout).
        diff: the :class:`~tracediff.diff.DiffResult` of the same two traces, if any.
        max_rows: findings listed before the rest are counted only.
        show_all: list every parameter, identical ones included (``tracediff weights --all``).
    """
    console = console or Console()
    if not result.weights_checked and not result.inputs_checked:
        console.print(Text("pre-flight: skipped (the traces hold neither a module table nor the model inputs)",
                           style="dim"), soft_wrap=True)
        return
    clean = bool(result)
    style = "green" if clean else "bold yellow"
    console.print(Text(summary(result), style=style), soft_wrap=True)
    rows: list[ParamCheck | InputCheck] = [*result.input_findings]
    rows += result.params if show_all else [p for p in result.params if p.failing]
    rows += [] if show_all else [p for p in result.params if p.finding and not p.failing]
    if rows:
        console.print(findings_table(rows[:max_rows] if not show_all else rows, width=console.width))
        if not show_all and len(rows) > max_rows:
            console.print(Text(f"  … and {len(rows) - max_rows} more (see the JSON report)"), soft_wrap=True)
    for note in notes(result):
        console.print(Text(f"  note: {note}", style="dim"), soft_wrap=True)
    cause = likely_cause(result, diff)
    if cause:
        console.print(Text(cause, style="bold"), soft_wrap=True)


def likely_cause(result: PreflightResult, diff: Any) -> str | None:
    """The pre-flight's explanation of ``diff``'s first drift, if it has one."""
    first = getattr(diff, "first_drift", None)
    if first is None:
        return None
    return cause_line(result, first.culprit, first.step)


def cause_line(result: PreflightResult, port_module: str | None, step: int | None = None) -> str | None:
    """``likely cause: <finding>``: what the pre-flight says about a first drift at ``port_module`` in ``step``."""
    cause = result.cause(port_module, step)
    return _cause_text(cause) if cause is not None else None


def _cause_text(cause: Cause) -> str:
    more = f" (and {cause.more} more)" if cause.more else ""
    return f"{CAUSE_WORDS[cause.kind]}: {line(cause.check)}{more}"


def preflight_json(result: PreflightResult, diff: Any = None, *, first_drift_port: str | None = None,
                   first_drift_step: int | None = None) -> dict[str, Any]:
    """The pre-flight in a JSON report: every verdict with its line, and the likely cause of a first drift.

    The first drift is ``diff``'s (a DiffResult), or the module and step given.
    """
    first = getattr(diff, "first_drift", None)
    if first is not None:
        first_drift_port, first_drift_step = first.culprit, first.step
    data = result.to_json()
    asked = first_drift_port is not None or first_drift_step is not None
    return {
        "ok": data["ok"],
        "summary": summary(result),
        "source": data["source"],
        "weights_checked": data["weights_checked"],
        "inputs_checked": data["inputs_checked"],
        "counts": data["counts"],
        "counts_line": counts_line(result),
        "inputs_line": inputs_line(result),
        "likely_cause": cause_line(result, first_drift_port, first_drift_step) if asked else None,
        "findings": [*map(line, result.weight_findings), *map(line, result.input_findings)],
        "params": [{**row, "line": line(check)} for row, check in zip(data["params"], result.params, strict=True)],
        "inputs": [{**row, "line": line(check)} for row, check in zip(data["inputs"], result.inputs, strict=True)],
        "notes": notes(result),
    }


# -- the lines ---------------------------------------------------------------------------


def summary(result: PreflightResult) -> str:
    """The one line: ``pre-flight: clean; 123 parameters compared: 123 identical; inputs identical (...)``."""
    failing = result.failing
    plural = "s" if len(failing) != 1 else ""
    head = "pre-flight: clean" if bool(result) else f"pre-flight: {len(failing)} finding{plural}"
    return f"{head}; {counts_line(result)}; {inputs_line(result)}"


def counts_line(result: PreflightResult) -> str:
    """``123 parameters compared: 120 identical, 1 transposed, 1 scaled, 1 missing in port``."""
    if not result.weights_checked:
        return "weights not checked (a trace holds no module table)"
    buffers = any(p.kind == "buffer" for p in result.params)
    what = "parameters and buffers" if buffers else "parameters"
    if not result.params:
        return f"no {what} to compare"
    parts = [f"{n} {STATUS_WORDS.get(status, status)}" for status, n in result.counts.items()]
    return f"{len(result.params)} {what} compared: {', '.join(parts)}"


def inputs_line(result: PreflightResult) -> str:
    """``inputs identical (3 tensors, steps 0-2)`` or ``inputs differ at step 0 (`context`)``."""
    if not result.inputs_checked:
        return "inputs not checked (" + ("no forward pass" if result.source == "models" else "not recorded") + ")"
    bad = result.input_findings
    steps = sorted({i.step for i in result.inputs})
    if not bad:
        per_step = len(result.inputs) // max(len(steps), 1)
        cast = any(i.status == "close" for i in result.inputs)
        verdict = "inputs equal up to a dtype cast" if cast else "inputs identical"
        return f"{verdict} ({per_step} tensor{'s' if per_step != 1 else ''}, {_steps(steps)})"
    bad_steps = sorted({i.step for i in bad})
    names = list(dict.fromkeys(f"`{i.name}`" for i in bad))
    return f"inputs differ at {_steps(bad_steps)} ({', '.join(names)})"


def notes(result: PreflightResult) -> list[str]:
    """What limited the check, then one quiet note per tied, zero-padded or computed tensor, then the inputs'."""
    layout = result.layout
    quiet = [line(check) for check in layout[:MAX_LAYOUT_NOTES]]
    if len(layout) > MAX_LAYOUT_NOTES:
        quiet.append(f"… and {len(layout) - MAX_LAYOUT_NOTES} more tied, padded or computed tensors "
                     "(see the JSON report)")
    return [*result.notes, *quiet, *result.input_notes]


def line(check: ParamCheck | InputCheck) -> str:
    """One line naming the parameter (or input) and its verdict."""
    if isinstance(check, InputCheck):
        return _input_line(check)
    return f"{subject(check)} {describe(check)}"


def subject(check: ParamCheck) -> str:
    """The parameter a line is about: the port's, else the upstream's."""
    name = check.port_label if check.port is not None else f"upstream {check.upstream_label}"
    return name + (" (buffer)" if check.kind == "buffer" else "")


def describe(check: ParamCheck | InputCheck) -> str:
    """The verdict without the subject (``scaled by 0.5 vs upstream ...``, ``max-abs 3.0e-02, rel 1.2e-02``)."""
    if isinstance(check, InputCheck):
        return _describe_input(check)
    up = f"upstream {check.upstream_label}"
    numbers = _numbers(check.max_abs, check.rel, check.exact)
    detail = check.detail
    extra = f"; {detail}" if detail else ""
    status = check.status
    shapes = f"({shape_text(check.upstream_shape)} -> {shape_text(check.port_shape)})"
    if status == "identical":
        return f"identical to {up}" + (f" ({detail})" if detail else "")
    if status == "close":
        return f"equal to {up} within tolerance ({numbers}{extra})"
    if status == "padded":
        close = f", equal within tolerance ({numbers})" if check.max_abs is not None else ""
        n_up = check.upstream_shape[0] if check.upstream_shape else 0
        n_port = check.port_shape[0] if check.port_shape else 0
        if n_port >= n_up:
            return f"padded from {n_up} to {n_port} rows with zeros: holds {up}'s values{close} {shapes}{extra}"
        return (f"holds {up}'s first {n_port} rows{close}; upstream padded from {n_port} to {n_up} rows "
                f"with zeros {shapes}{extra}")
    if status == "tied":
        return f"tied to {detail}" if detail else "tied to another tensor of its side"
    if status == "computed":
        return "not in the state dict (computed at construction), not converted" + extra
    if status == "transposed":
        return f"transposed: holds {up} transposed {shapes}{extra}"
    if status == "reshaped":
        return f"reshaped: same values as {up} {shapes}{extra}"
    if status == "scaled":
        return f"scaled by {_factor(check.scale)} vs {up} ({numbers}){extra}"
    if status == "permuted":
        return f"same values as {up}, different order (permutation?){extra}"
    if status == "swapped":
        return "swapped pieces: " + (detail or f"holds another piece of the fused tensor, not {up}")
    if status == "different":
        if check.max_abs is None and check.rel is None:
            return f"different from {up}" + (f": {detail}" if detail else "")
        return f"different from {up}: {numbers}{extra}"
    if status == "shape_mismatch":
        return f"shape {shape_text(check.port_shape)} vs {up} {shape_text(check.upstream_shape)}{extra}"
    if status == "missing_in_port":
        return "missing in port" + (f" ({detail})" if detail else "")
    if status == "missing_in_upstream":
        return "missing in upstream" + (f" ({detail})" if detail else "")
    return f"not verified against {up}" + (f": {detail}" if detail else "")


def where(check: InputCheck) -> str:
    """``step 0``, or ``step 0, call 1`` for a later top-level call of the step."""
    return f"step {check.step}" + (f", call {check.call}" if check.call else "")


def _describe_input(check: InputCheck) -> str:
    if check.status == "missing_in_port":
        return "given to upstream only"
    if check.status == "missing_in_upstream":
        return "given to the port only"
    if check.status == "shape_mismatch":
        return f"shape {shape_text(check.shape)} vs upstream {shape_text(check.upstream_shape)}"
    if check.status == "different":
        numbers = []
        if check.max_abs is not None:
            numbers.append(f"max-abs {_num(check.max_abs)}")
        if check.rel is not None:
            numbers.append(f"rel {_num(check.rel)}")
        tail = "; ".join(part for part in (check.compared, check.detail) if part)
        return ", ".join(numbers) + (f" ({tail})" if tail and numbers else tail)
    verdict = "identical" if check.status == "identical" else "equal within tolerance"
    return verdict + (f" ({check.detail})" if check.detail else "")


def _input_line(check: InputCheck) -> str:
    """``inputs differ at step 0: `context` max-abs 3.0e-02, rel 1.2e-02 (all 256 elements)``."""
    who = f"`{check.name}`"
    if check.label is not None and check.upstream_label is not None and check.upstream_label != check.label:
        who += f" (upstream `{input_name(check.upstream_label)}`)"
    if check.finding:
        return f"inputs differ at {where(check)}: {who} {describe(check)}"
    return f"inputs at {where(check)}: {who} {describe(check)}"


# -- the table ---------------------------------------------------------------------------


def findings_table(rows: list[ParamCheck | InputCheck], *, width: int) -> Table:
    """One row per verdict: check (weight, buffer, input), port name, upstream name, finding."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    # Names fold rather than being cut; each name column gets up to a third of what "check" leaves.
    room = max((width - 10) // 3, 12)
    longest = {
        "port": max((len(r.port_label if isinstance(r, ParamCheck) else f"{r.name} ({where(r)})") for r in rows),
                    default=4),
        "upstream": max((len(r.upstream_label if isinstance(r, ParamCheck) else input_name(r.upstream_label))
                         for r in rows), default=8),
    }
    for column in ("check", "port", "upstream", "finding"):
        table.add_column(column, overflow="fold", min_width=min(longest[column], room) if column in longest else None)
    for row in rows:
        if isinstance(row, InputCheck):
            upstream = input_name(row.upstream_label) if row.upstream_label is not None else "-"
            port = f"{row.name} ({where(row)})" if row.label is not None else f"- ({where(row)})"
            verdict = ("differs: " if row.status == "different" else "") + describe(row)
            table.add_row(Text("input"), Text(port), Text(upstream), Text(verdict),
                          style="red" if row.finding else "")
            continue
        style = "red" if row.failing else ("yellow" if row.finding else "")
        table.add_row(Text(row.kind if row.kind == "buffer" else "weight"), Text(row.port_label),
                      Text(row.upstream_label), Text(_finding_text(row)), style=style)
    return table


def _finding_text(row: ParamCheck) -> str:
    """The verdict without repeating the names the other columns show."""
    text = describe(row)
    up = f"upstream {row.upstream_label}"
    return text.replace(f" vs {up}", "").replace(f" from {up}", "").replace(f" to {up}", "").replace(
        f" where {up} belongs", "").replace(
        f"holds {up} transposed", "holds upstream's transpose").replace(f"same values as {up}", "same values")


# -- numbers and shapes ------------------------------------------------------------------


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


def _steps(steps: list[int]) -> str:
    if not steps:
        return "no step"
    if len(steps) == 1:
        return f"step {steps[0]}"
    if len(steps) > 2 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}-{steps[-1]}"
    shown = ", ".join(map(str, steps[:8]))
    return f"steps {shown}" + (f", … ({len(steps)} in all)" if len(steps) > 8 else "")
