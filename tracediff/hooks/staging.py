"""A step's captures on their way to the trace file: one host transfer per device, then columns.

The recorder's hooks leave device tensors behind (:class:`Pending`); at a
step's end :class:`Staged` queues their copies into pinned host memory without
waiting, and :meth:`Staged.finish` (on the writer thread for accelerator
models) waits for them and builds the :class:`~tracediff.store.writer.StepBatch`
that the writer appends.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tracediff.hooks.stats import copy_stream, full_dtype, wait_for_producers
from tracediff.moments import INF_COUNT, MOMENT_COUNT, MOMENT_NAMES, NAN_COUNT
from tracediff.store.format import FULL_F32, FULL_F64, FULL_NONE, MAX_DIMS, RECORD_COLUMNS
from tracediff.store.writer import StepBatch


@dataclass(slots=True)
class Pending:
    """One captured tensor of the running step, as the hook left it (device tensors still being computed)."""

    seq: int
    step: int
    module: int
    call: int
    label: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    moments: torch.Tensor | None
    sample: torch.Tensor | None
    full: torch.Tensor | None  # on the host (pinned and maybe still being filled, for a CUDA tensor)
    full_device: torch.device | None = None
    #: the CUDA stream the hook queued ``moments``/``sample`` on: the flush waits for it
    stream: Any = None


class Staged:
    """One step's captures on their way to the host: one transfer per device per kind.

    Constructing it queues the transfers (into pinned memory, without waiting);
    :meth:`finish` waits for them and builds the :class:`StepBatch`. On a CPU
    model both happen at once.
    """

    def __init__(self, pending: list[Pending]) -> None:
        self.pending = pending
        wait_for_producers(p.stream for p in pending)  # a forward on a side stream: copy after it computed
        self.events: list[torch.cuda.Event] = []
        devices: set[torch.device] = set()
        self.moments = _rows_to_host([p.moments for p in pending], devices)
        self.samples = _flat_to_host([p.sample for p in pending], devices)
        streams = [torch.cuda.current_stream(device) for device in devices]
        full_devices = {
            p.full_device for p in pending if p.full is not None and p.full_device is not None and p.full.is_pinned()
        }
        streams += [copy_stream(device) for device in full_devices]
        for stream in streams:
            event = torch.cuda.Event()
            event.record(stream)
            self.events.append(event)
        devices |= full_devices
        self.on_accelerator = bool(devices)
        self.nbytes = sum({id(p.full): p.full.nbytes for p in pending if p.full is not None}.values())

    def finish(self) -> StepBatch:
        """Wait for the step's copies to reach the host and build its columns."""
        for event in self.events:
            event.synchronize()
        return _to_batch(self.pending, self.moments, self.samples)


def _to_batch(
    pending: list[Pending], moments: list[tuple[list[int], torch.Tensor]], samples: _FlatParts | None
) -> StepBatch:
    """Columns of one step, from captures whose host copies have completed."""
    count = len(pending)
    columns = {name: np.zeros(count, dtype=dtype) for name, dtype in RECORD_COLUMNS.items()}
    # whole columns at once: a NumPy item assignment per field and record cost more than the rest of the step
    columns["seq"][:] = [p.seq for p in pending]
    columns["step"][:] = [p.step for p in pending]
    columns["module"][:] = [p.module for p in pending]
    columns["call"][:] = [p.call for p in pending]
    columns["numel"][:] = [p.numel for p in pending]
    columns["ndim"][:] = [len(p.shape) for p in pending]
    pad = (-1,) * MAX_DIMS
    shape = np.array([(p.shape + pad)[:MAX_DIMS] for p in pending], dtype=np.int64).reshape(count, MAX_DIMS)
    moment_rows = np.full((count, MOMENT_COUNT), np.nan)
    for indices, host in moments:
        moment_rows[indices] = host.numpy()
    counts = moment_rows[:, NAN_COUNT : INF_COUNT + 1]
    counts[np.isnan(counts)] = 0
    if samples is not None:
        lengths = np.array([0 if p.sample is None else p.sample.numel() for p in pending], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        columns["sample_offset"][:] = np.where(lengths > 0, starts, 0)
        columns["sample_len"][:] = lengths
    f32_parts: list[np.ndarray] = []
    f64_parts: list[np.ndarray] = []
    f32_len = f64_len = 0
    stored: dict[int, tuple[int, int, int]] = {}  # id(host copy) -> (full_kind, full_offset, full_len)
    columns["full_kind"][:] = FULL_NONE
    for row, item in enumerate(pending):
        if item.full is None:
            continue
        if id(item.full) in stored:
            # the same captured tensor as an earlier record (a module's input that is the previous
            # module's output): point at the values already written instead of writing them twice
            kind, start, size = stored[id(item.full)]
            columns["full_kind"][row], columns["full_offset"][row], columns["full_len"][row] = kind, start, size
            continue
        # one host pass: convert (bf16 -> float32) and put a permuted layout in row-major order
        values = item.full.to(full_dtype(item.full), memory_format=torch.contiguous_format).reshape(-1).numpy()
        if values.dtype == np.float64:
            columns["full_kind"][row], columns["full_offset"][row] = FULL_F64, f64_len
            f64_parts.append(values)
            f64_len += values.size
        else:
            columns["full_kind"][row], columns["full_offset"][row] = FULL_F32, f32_len
            f32_parts.append(values)
            f32_len += values.size
        columns["full_len"][row] = values.size
        stored[id(item.full)] = (int(columns["full_kind"][row]), int(columns["full_offset"][row]), values.size)
    for position, name in enumerate(MOMENT_NAMES):
        values = moment_rows[:, position]
        columns[name] = values.astype(columns[name].dtype) if name.endswith("count") else values
    return StepBatch(
        columns=columns,
        shape=shape,
        labels=[p.label for p in pending],
        dtypes=[p.dtype for p in pending],
        samples=samples.assemble() if samples is not None else None,
        full_f32=f32_parts or None,
        full_f64=f64_parts or None,
    )


def _to_host(tensor: torch.Tensor, devices: set[torch.device]) -> torch.Tensor:
    """Start copying ``tensor`` to the host; on CUDA into pinned memory, without waiting."""
    if not tensor.is_cuda:
        return tensor.to("cpu")
    devices.add(tensor.device)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _rows_to_host(rows: list[torch.Tensor | None], devices: set[torch.device]) -> list[tuple[list[int], torch.Tensor]]:
    """Stack per-record device vectors per device: ``(record indices, host tensor)`` pairs."""
    by_device: defaultdict[torch.device, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for index, row in enumerate(rows):
        if row is not None:
            by_device[row.device].append((index, row))
    return [
        ([index for index, _ in items], _to_host(torch.stack([row for _, row in items]), devices))
        for items in by_device.values()
    ]


@dataclass
class _FlatParts:
    """Per-device concatenations of variable-length vectors, and how to put them back in record order."""

    host: dict[torch.device, torch.Tensor]
    starts: dict[torch.device, np.ndarray]
    order: list[tuple[torch.device, int]]

    def assemble(self) -> np.ndarray:
        arrays = {device: tensor.numpy() for device, tensor in self.host.items()}
        pieces = [arrays[d][self.starts[d][i] : self.starts[d][i + 1]] for d, i in self.order]
        return np.concatenate(pieces)


def _flat_to_host(parts: list[torch.Tensor | None], devices: set[torch.device]) -> _FlatParts | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    order: list[tuple[torch.device, int]] = []
    for part in present:
        order.append((part.device, len(by_device[part.device])))
        by_device[part.device].append(part)
    # one conversion per device (float32 parts are promoted exactly), not one per record
    host = {device: _to_host(torch.cat(items).to(torch.float64), devices) for device, items in by_device.items()}
    starts = {device: np.cumsum([0] + [t.numel() for t in items]) for device, items in by_device.items()}
    return _FlatParts(host, starts, order)

