"""Import FastVideo's activation-trace JSONL files as a :class:`~tracediff.store.trace.Trace`.

FastVideo's tracer (``fastvideo/hooks/activation_trace.py``) writes one line per
output tensor of each traced module call::

    {"module": "blocks.0", "tensor": "out", "step": 0, "abs_mean": 1.23, "sum": -5.6, "shape": [1, 16]}

with whatever stats ``FASTVIDEO_TRACE_STATS`` selected. There is no call index
and no sequence number: lines are in execution order (the hook writes after the
module ran), and the n-th line of the same ``(module, tensor, step)`` is call n.
The file is opened in append mode by FastVideo, so two runs into one path read
as calls 0 and 1. Stats are values, not moments, so they go to
:attr:`Records.direct` and nothing is derived from them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tracediff.errors import TraceFormatError
from tracediff.moments import MOMENT_COUNT
from tracediff.store.format import FULL_NONE, MAX_DIMS, RECORD_COLUMNS
from tracediff.store.trace import FINGERPRINT_SAMPLE, ModuleTable, Records, Trace, empty_shape

#: Value stats a line may carry (FastVideo's plus tracediff's own numeric ones).
VALUE_STATS = ("abs_mean", "sum", "min", "max", "mean", "std", "l2", "nan_count", "inf_count")

FORMAT_NAME = "fastvideo-jsonl"


def read_jsonl(path: str | Path, *, skip_bad_lines: bool = False) -> Trace:
    """Read a FastVideo JSONL activation trace.

    Args:
        path: the ``.jsonl`` file (``FASTVIDEO_TRACE_OUTPUT``).
        skip_bad_lines: skip lines that are not valid records instead of failing;
            how many were skipped is in ``trace.meta["skipped_lines"]``.

    Returns:
        A trace whose module table holds names only (``""`` first, then modules
        in order of first appearance); ``step: null`` becomes step ``-1``; an
        unknown shape has ``numel == -1``; an unknown dtype is ``""``.

    Raises:
        TraceFormatError: missing or unreadable file, or a bad line (naming the
            file and line number) when ``skip_bad_lines`` is false.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceFormatError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    builder = _Builder()
    skipped = 0
    try:
        with path.open("r", encoding="utf-8-sig") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    builder.add(_parse_line(line))
                except _BadLine as exc:
                    if not skip_bad_lines:
                        raise TraceFormatError(
                            f"{path}:{lineno}: {exc}; a FastVideo trace line is a JSON object with a string 'module'"
                        ) from None
                    skipped += 1
    except UnicodeDecodeError as exc:
        raise TraceFormatError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not builder.count:
        why = f"all {skipped} non-blank lines were bad and skipped" if skipped else "empty JSONL trace"
        raise TraceFormatError(f"{path}: no records ({why})")
    return builder.build(path, skipped=skipped)


class _BadLine(ValueError):
    pass


def _parse_line(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
    module = record.get("module")
    if not isinstance(module, str):
        raise _BadLine("missing or non-string 'module'")
    tensor = record.get("tensor", "out")
    if not isinstance(tensor, str):
        raise _BadLine(f"'tensor' must be a string, got {tensor!r}")
    step = record.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise _BadLine(f"'step' must be null or an integer >= 0, got {step!r}")
    shape = record.get("shape")
    if shape is not None and (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _BadLine(f"'shape' must be a list of at most {MAX_DIMS} non-negative integers, got {shape!r}")
    return record


def _number(value: Any) -> float:
    """A stat value as float; FastVideo writes ``"<error: ...>"`` when a stat failed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _dtype_name(value: Any) -> str:
    return str(value).removeprefix("torch.") if value is not None else ""


class _Builder:
    """Accumulates parsed lines into columns (plain lists, converted once at the end)."""

    def __init__(self) -> None:
        self.count = 0
        self.module_index: dict[str, int] = {"": 0}
        self.label_index: dict[str, int] = {}
        self.dtype_index: dict[str, int] = {}
        self.calls: dict[tuple[int, int, int], int] = {}
        self.cols: dict[str, list[Any]] = {name: [] for name in ("step", "module", "call", "label", "dtype")}
        self.shapes: list[list[int] | None] = []
        self.stats: dict[str, list[float]] = {}

    def add(self, record: dict[str, Any]) -> None:
        module = self.module_index.setdefault(record["module"], len(self.module_index))
        label = self.label_index.setdefault(record.get("tensor", "out"), len(self.label_index))
        dtype = self.dtype_index.setdefault(_dtype_name(record.get("dtype")), len(self.dtype_index))
        step = -1 if record.get("step") is None else int(record["step"])
        explicit = record.get("call")
        key = (module, label, step)
        if isinstance(explicit, int) and not isinstance(explicit, bool) and explicit >= 0:
            call = explicit
        else:
            call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        for name, value in (("step", step), ("module", module), ("call", call), ("label", label), ("dtype", dtype)):
            self.cols[name].append(value)
        self.shapes.append(record.get("shape"))
        for name in VALUE_STATS:
            if name in record:
                column = self.stats.get(name)
                if column is None:
                    column = self.stats[name] = [math.nan] * self.count
                column.append(_number(record[name]))
        self.count += 1
        for column in self.stats.values():
            if len(column) < self.count:
                column.append(math.nan)

    def build(self, path: Path, *, skipped: int) -> Trace:
        n = self.count
        columns = {name: np.zeros(n, dtype=dtype) for name, dtype in RECORD_COLUMNS.items()}
        columns["seq"] = np.arange(n, dtype=np.int64)
        for name in ("step", "module", "call", "label", "dtype"):
            columns[name] = np.asarray(self.cols[name], dtype=RECORD_COLUMNS[name])
        shape = empty_shape(n)
        ndim = np.zeros(n, dtype=np.int8)
        numel = np.full(n, -1, dtype=np.int64)
        for i, dims in enumerate(self.shapes):
            if dims is not None:
                shape[i, : len(dims)] = dims
                ndim[i] = len(dims)
                numel[i] = math.prod(dims)
        columns["ndim"], columns["numel"] = ndim, numel
        direct = {name: np.asarray(values, dtype=np.float64) for name, values in self.stats.items()}
        for name in ("sum", "min", "max"):
            columns[name] = direct.get(name, np.full(n, math.nan))
        for name in ("abs_sum", "sumsq"):
            columns[name] = np.full(n, math.nan)
        for name in ("nan_count", "inf_count"):  # -1: not recorded (or not a count: inf, negative, 1.5)
            known = direct.get(name, np.full(n, math.nan))
            with np.errstate(invalid="ignore"):
                count = np.isfinite(known) & (known >= 0) & (known < 2.0**62) & (known == np.floor(known))
            columns[name] = np.where(count, known, -1.0).astype(np.int64)
        columns["full_kind"] = np.full(n, FULL_NONE, dtype=RECORD_COLUMNS["full_kind"])
        names = list(self.module_index)
        modules = ModuleTable(
            names=names,
            classes=[""] * len(names),
            params=[],
            param_moments=np.zeros((0, MOMENT_COUNT)),
            param_samples=np.zeros((0, FINGERPRINT_SAMPLE)),
            param_samples_t=np.zeros((0, FINGERPRINT_SAMPLE)),
        )
        stats = list(self.stats) + [key for key in ("shape", "dtype") if key in _present(self.shapes, self.dtype_index)]
        return Trace(
            path=str(path),
            meta={"side": "", "format": FORMAT_NAME, "has_moments": False, "skipped_lines": skipped},
            config={"stats": stats, "layers": "", "steps": None},
            modules=modules,
            records=Records(
                columns=columns,
                shape=shape,
                labels=list(self.label_index),
                dtypes=list(self.dtype_index),
                direct=direct,
            ),
            complete=True,
        )


def _present(shapes: list[list[int] | None], dtypes: dict[str, int]) -> set[str]:
    found = set()
    if any(dims is not None for dims in shapes):
        found.add("shape")
    if any(name for name in dtypes):
        found.add("dtype")
    return found

