"""One side of an alignment as the aligner sees it: names, tree, weights, order.

The aligner works the same whether it gets two trace files or two live models;
this module turns either into a :class:`Side` so the matching code never asks
where the facts came from. A trace contributes execution order and output
shapes (from its records); a live model contributes only definition order and
its classes' ``torch.nn`` base types, which is all it has without a forward.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tracediff.modtree import parent
from tracediff.store.trace import ModuleTable, Trace

if TYPE_CHECKING:  # torch is imported only for live models, never to read traces
    from torch import nn


@dataclass
class Side:
    """Everything the aligner needs to know about one model, by module index.

    Attributes:
        label: ``"upstream"`` or ``"port"``, for messages.
        table: the module table (names in ``named_modules()`` order, fingerprints).
        index: module name -> index into ``table.names``.
        kinds: per module, what "same kind of layer" compares: the short class name
            for traces, the nearest ``torch.nn`` base class for live models (so a
            ``WanLayerNorm`` and an ``FP32LayerNorm`` are both ``LayerNorm``).
        identity: per module, rows of ``table.params`` whose values identify it:
            its own parameters, or its own buffers when it has no parameters.
        exec_order: module index -> position of its first record in the first
            traced step (completion order); empty for live models.
        signature: module index -> output shapes of its first call; empty for live models.
        descendants: module name -> names strictly below it in the module tree.
        passthrough: leaf modules whose only output, in their first call, equals the
            record completed just before it (dropout in eval, ``Identity``): they pass a
            tensor on unchanged, so they are no evidence of structure. Empty for live models.
        trace: the trace the side was read from (``None`` for live models): its records are
            the value evidence of :mod:`tracediff.align.values`.
        outputs, inputs: module index -> record indices of its output / input tensors in its
            first call of the first traced step (empty for live models).
        ordered_rows, first_dims: caches of :mod:`tracediff.align.fingerprint`, filled as they are asked.
    """

    label: str
    table: ModuleTable
    index: dict[str, int]
    kinds: list[str]
    identity: list[list[int]]
    exec_order: dict[int, int] = field(default_factory=dict)
    signature: dict[int, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    descendants: dict[str, list[str]] = field(default_factory=dict)
    passthrough: set[int] = field(default_factory=set)
    trace: Trace | None = None
    outputs: dict[int, list[int]] = field(default_factory=dict)
    inputs: dict[int, list[int]] = field(default_factory=dict)
    #: module index -> identity rows in canonical order, filled on demand by the fingerprint stage.
    ordered_rows: dict[int, list[int]] = field(default_factory=dict, repr=False, compare=False)
    #: module index -> first dimensions of those rows, filled on demand by the fingerprint stage.
    first_dims: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return self.table.names

    def owns_params(self, module: int) -> bool:
        """Whether the module owns at least one parameter (buffers do not count)."""
        return any(self.table.params[row].kind == "parameter" for row in self.identity[module])

    def ran(self, module: int) -> bool:
        return module in self.exec_order

    def short_class(self, module: int) -> str:
        return self.table.classes[module].rsplit(".", 1)[-1]

    def param_shapes(self, module: int) -> tuple[tuple[int, ...], ...]:
        return tuple(sorted(self.table.params[row].shape for row in self.identity[module]))


def side_from_trace(trace: Trace, label: str) -> Side:
    """Build a :class:`Side` from a trace: fingerprints plus first-step execution order."""
    table = trace.modules
    side = _base_side(table, label, kinds=[c.rsplit(".", 1)[-1] for c in table.classes])
    records = trace.records
    if len(records) == 0:
        return side
    cols = records.columns
    first_step = cols["step"].min()
    # Execution order is the order modules *return*: a module's own input records (traces with
    # ``inputs`` on) would move it before its children, so only the model's inputs are kept.
    rows = np.flatnonzero((cols["step"] == first_step) & ~trace.module_input_records())
    modules = cols["module"][rows]
    _, first = np.unique(modules, return_index=True)
    for rank, position in enumerate(sorted(first.tolist())):
        module = int(modules[position])
        if 0 <= module < len(table.names):
            side.exec_order[module] = rank
    shapes: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    # first-call outputs of known modules, in record order (whole columns at once, not a lookup per record)
    is_input = np.asarray([label.startswith("input") for label in records.labels] or [False], dtype=bool)
    calls = rows[cols["call"][rows] == 0]
    owner = cols["module"][calls]
    calls = calls[(owner >= 0) & (owner < len(table.names)) & ~is_input[cols["label"][calls]]]
    for module, ndim, shape in zip(
        cols["module"][calls].tolist(), cols["ndim"][calls].tolist(), records.shape[calls].tolist(), strict=True
    ):
        shapes[module].append(tuple(shape[:ndim]))
    side.signature = {module: tuple(found) for module, found in shapes.items()}
    side.passthrough = _passthrough(trace, rows, side)
    side.trace = trace
    side.outputs, side.inputs = _first_call_records(trace, first_step, len(table.names))
    return side


def _first_call_records(trace: Trace, step: int, modules: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Record indices of each module's outputs and inputs in its first call of ``step``, in record order."""
    cols = trace.records.columns
    rows = np.flatnonzero((cols["step"] == step) & (cols["call"] == 0))
    rows = rows[np.argsort(cols["seq"][rows], kind="stable")]
    is_input = np.asarray([label.startswith("input") for label in trace.records.labels] or [False], dtype=bool)
    outputs: dict[int, list[int]] = defaultdict(list)
    inputs: dict[int, list[int]] = defaultdict(list)
    for row in rows.tolist():
        module = int(cols["module"][row])
        if 0 <= module < modules:
            (inputs if is_input[cols["label"][row]] else outputs)[module].append(row)
    return dict(outputs), dict(inputs)


def _passthrough(trace: Trace, rows: np.ndarray, side: Side) -> set[int]:
    """Leaf modules whose single first-call output equals the previous record's (same shape and moments).

    Records are written when a module returns, so the record just before a
    dropout's or an ``Identity``'s is the one of the module that produced its
    input. Moments that were not recorded (NaN) never compare equal. Every test is
    made on all records at once: a Python loop over them is slow on large models.
    """
    cols = trace.records.columns
    records = trace.records
    ordered = rows[np.argsort(cols["seq"][rows], kind="stable")]
    if len(ordered) < 2:
        return set()
    moments = np.stack([np.asarray(cols[name][ordered], dtype=np.float64) for name in _MOMENTS], axis=1)
    is_input = np.asarray([label.startswith("input") for label in records.labels] or [False], dtype=bool)
    module = cols["module"][ordered].astype(np.int64)
    first_call = cols["call"][ordered] == 0
    output = first_call & ~is_input[cols["label"][ordered]]
    known = (module >= 0) & (module < len(side.names))
    counts = np.bincount(module[output & known], minlength=len(side.names))
    leaf = np.asarray([not side.descendants.get(name) for name in side.names] or [True], dtype=bool)
    safe = np.where(known, module, 0)
    ndim = cols["ndim"][ordered].astype(np.int64)
    shape = records.shape[ordered]
    dims = np.arange(shape.shape[1])
    cur, prev = slice(1, None), slice(None, -1)
    same_shape = (ndim[cur] == ndim[prev]) & np.all(
        (shape[cur] == shape[prev]) | (dims[None, :] >= ndim[cur, None]), axis=1
    )
    held = ~np.isnan(moments[cur]) & ~np.isnan(moments[prev])
    same_values = (
        (held.sum(axis=1) >= 3)
        & np.all(np.isnan(moments[cur]) == np.isnan(moments[prev]), axis=1)
        & np.all((moments[cur] == moments[prev]) | ~held, axis=1)
    )
    found = (
        known[cur] & (counts[safe[cur]] == 1) & output[cur] & leaf[safe[cur]]
        & (module[prev] != module[cur]) & same_shape & same_values
    )
    return {int(m) for m in module[cur][found]}


_MOMENTS = ("numel", "sum", "abs_sum", "sumsq", "min", "max")


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal in every moment both records hold, with at least three held (JSONL traces lack some)."""
    held = ~np.isnan(a) & ~np.isnan(b)
    return int(held.sum()) >= 3 and np.array_equal(np.isnan(a), np.isnan(b)) and bool(np.all(a[held] == b[held]))


def side_from_model(model: nn.Module, label: str) -> Side:
    """Build a :class:`Side` from a live model (no forward pass: definition order only)."""
    from tracediff.hooks.fingerprint import build_module_table  # lazy: torch stays off the trace-reading commands

    table = build_module_table(model)
    modules = dict(model.named_modules())
    kinds = [_torch_base(type(modules[name])) for name in table.names]
    return _base_side(table, label, kinds=kinds)


def _base_side(table: ModuleTable, label: str, *, kinds: list[str]) -> Side:
    index = {name: i for i, name in enumerate(table.names)}
    parameters: list[list[int]] = [[] for _ in table.names]
    buffers: list[list[int]] = [[] for _ in table.names]
    for row, entry in enumerate(table.params):
        if 0 <= entry.module_index < len(table.names):
            (parameters if entry.kind == "parameter" else buffers)[entry.module_index].append(row)
    identity = [own or fallback for own, fallback in zip(parameters, buffers, strict=True)]
    descendants: dict[str, list[str]] = {name: [] for name in table.names}
    for name in table.names:
        ancestor = name
        while ancestor:
            ancestor = parent(ancestor)
            if ancestor in descendants:
                descendants[ancestor].append(name)
    return Side(label=label, table=table, index=index, kinds=kinds, identity=identity, descendants=descendants)


def _torch_base(cls: type) -> str:
    """Name of the first ``torch.nn`` class in ``cls``'s MRO (``Module`` at worst)."""
    for base in cls.__mro__:
        if base.__module__.startswith("torch.nn."):
            return base.__name__
    return cls.__name__
