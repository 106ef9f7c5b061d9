"""On-device statistics of a tensor, computed together and fetched in bulk.

A hook calls :func:`moments` and gets back a small float64 tensor *on the
tensor's device*; nothing is copied to the host until the recorder flushes a
whole step with one transfer.

How the moments are reduced depends on where the tensor lives (the stored
meaning is the same; docs/trace-format.md gives the precision):

* on a CUDA device, a contiguous float tensor is read **once** by the fused
  kernel of :mod:`tracediff.hooks.fused` (float32 partial sums, combined in
  float64; float64 tensors stay float64 throughout);
* elsewhere on an accelerator (no Triton, a strided view) PyTorch reductions
  accumulate 16/32-bit floats in float32: asking a GPU reduction for float64
  makes PyTorch materialise a float64 copy of the whole activation first, four
  times its bf16 size, which is both the slow part and a memory spike;
* on the CPU, reductions accumulate in float64 (exact enough to compare with
  ``torch.float64`` references in tests, and there is no bandwidth to save).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from tracediff.hooks import fused
from tracediff.moments import EMPTY_MOMENTS, spread_positions


def value_view(tensor: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The real-valued view stats are taken of, and how it was obtained.

    Complex tensors are summarised by magnitude; integer and bool tensors are
    widened to float64 (they are small: masks, indices, positions).
    """
    tensor = tensor.detach()
    if tensor.is_complex():
        return tensor.abs(), "magnitude"
    if not tensor.is_floating_point():
        return tensor.to(torch.float64), "widened"
    return tensor, "value"


def moments(tensor: torch.Tensor) -> torch.Tensor:
    """Mergeable moments of ``tensor`` as a float64 vector on its device.

    Returns:
        The vector laid out as :data:`tracediff.moments.MOMENT_NAMES`; for an empty
        tensor :data:`~tracediff.moments.EMPTY_MOMENTS` (sums and counts 0, min/max NaN).
    """
    values, _ = value_view(tensor)
    if values.numel() == 0:
        return torch.tensor(EMPTY_MOMENTS, dtype=torch.float64, device=values.device)
    if values.is_cuda:
        flat = dense_flat(values)
        if flat is not None and fused.supports(flat):
            out = fused.moments(flat)
            if out is not None:
                return out
    on_host = values.device.type == "cpu"
    if on_host:
        return _host_moments(values)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    total = values.sum(dtype=acc)
    abs_total = torch.linalg.vector_norm(values, 1, dtype=acc)
    squares = torch.linalg.vector_norm(values, 2, dtype=acc).square()
    low, high = torch.aminmax(values)
    nan_count = torch.isnan(values).sum(dtype=torch.int64)
    inf_count = torch.isinf(values).sum(dtype=torch.int64)
    sums = torch.stack([total, abs_total, squares, low.to(acc), high.to(acc)])
    counts = torch.stack([nan_count, inf_count])
    return torch.cat([sums.to(torch.float64), counts.to(torch.float64)])


def _host_moments(values: torch.Tensor) -> torch.Tensor:
    """:func:`moments` of a non-empty CPU tensor, in float64: the same reductions in a third of the operations.

    A CPU model's tensors are mostly small, so each PyTorch call's fixed cost dominates
    (paid for every statistic of every traced tensor). Reading results
    back costs nothing on the host, which allows two shortcuts that change no value:
    a finite sum proves there is no NaN or Inf (either would make it NaN or infinite),
    so the two counting passes run only when the sum is not finite; and the vector is
    built from Python floats instead of stacking and converting 0-d tensors.
    Values are bit for bit those of the general path below with float64 accumulation.
    """
    # One float64 copy, reduced three times: what ``sum(dtype=float64)`` and ``vector_norm(dtype=float64)``
    # compute (they cast their input first; same bits), without casting three times.
    wide = values if values.dtype == torch.float64 else values.to(torch.float64)
    total = float(wide.sum())
    abs_total = float(torch.linalg.vector_norm(wide, 1))
    norm = float(torch.linalg.vector_norm(wide, 2))
    low, high = torch.aminmax(values)
    if math.isfinite(total):
        nan_count = inf_count = 0.0
    else:
        nan_count = float(torch.isnan(values).sum(dtype=torch.int64))
        inf_count = float(torch.isinf(values).sum(dtype=torch.int64))
    row = np.array([total, abs_total, norm * norm, float(low), float(high), nan_count, inf_count])
    return torch.from_numpy(row)  # (wraps the array; torch.tensor would convert the list element by element)


def dense_layout(values: torch.Tensor) -> tuple[int, ...] | None:
    """The dimension order in which ``values`` lies densely in memory, or None if it does not.

    A transposed or permuted view of a contiguous tensor (``x.flatten(2).transpose(1, 2)``
    at the start of every video DiT, and every residual sum that inherits its layout)
    is not contiguous, but ``values.permute(order)`` is: its elements fill one
    block of memory exactly once, in that order.
    """
    if values.is_contiguous():
        return tuple(range(values.dim()))
    order = tuple(sorted(range(values.dim()), key=lambda d: values.stride(d), reverse=True))
    return order if values.permute(order).is_contiguous() else None


def dense_flat(values: torch.Tensor) -> torch.Tensor | None:
    """Every element of ``values`` exactly once, as a 1-D view in memory order (no copy), or None.

    Order-free statistics (moments) can be reduced over it directly.
    """
    if values.is_contiguous():
        return values.view(-1)  # one view instead of an identity permute and a reshape
    order = dense_layout(values)
    return None if order is None else values.permute(order).reshape(-1)


def sample_positions(numel: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """:func:`tracediff.moments.sample_positions` as an int64 tensor on ``device`` (the same positions).

    Made directly on ``device``: copying them there from the host would make the
    hook wait for the GPU.
    """
    slots = torch.arange(min(numel, size), dtype=torch.int64, device=device)
    positions: torch.Tensor = spread_positions(slots, numel, size)
    return positions


#: Most position vectors :func:`take_sample` keeps (a few distinct tensor sizes per model; 2 KiB each at 256).
_POSITIONS_KEPT = 1024
#: (numel, size, device, stream) -> positions; never evicted, so no kernel can read a freed block.
_positions: dict[tuple[int, int, torch.device, int], torch.Tensor] = {}


def _cached_positions(numel: int, size: int, device: torch.device) -> torch.Tensor:
    """:func:`sample_positions`, made once per tensor size, device and stream (three launches saved per capture).

    On a GPU the key includes the current stream: positions made on one stream and read on
    another could be read before the kernel that makes them has run.
    """
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (numel, size, device, stream)
    positions = _positions.get(key)
    if positions is None:
        positions = sample_positions(numel, size, device)
        if len(_positions) < _POSITIONS_KEPT:
            _positions[key] = positions
    return positions


def take_sample(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Gather the sample elements without copying the whole tensor."""
    values, _ = value_view(tensor)
    positions = _cached_positions(values.numel(), size, values.device)
    # take() indexes in logical row-major order whatever the layout, without copying the
    # tensor or (unlike unravel_index) copying index tables from the host, which would sync.
    return torch.take(values, positions).to(full_dtype(values))


def copy_full_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor in host memory, for the ``full`` stat; never waits for a GPU.

    A CUDA tensor is copied in its own dtype and memory order into pinned
    memory, asynchronously, on a side stream: the copy runs behind the kernels
    already queued, and whoever reads the result must first wait for an event
    recorded on :func:`copy_stream` after it. The result is then a view with the
    tensor's shape; flatten it (row-major) and convert it to :func:`full_dtype`
    on the host. A CPU tensor is copied at once, flat and converted, so later
    in-place updates cannot reach it.
    """
    values, _ = value_view(tensor)
    if not values.is_cuda:
        return values.reshape(-1).to("cpu", dtype=full_dtype(values), copy=True)
    order = dense_layout(values)
    if order is None:  # overlapping or gapped (expanded, sliced): one device copy makes it dense
        values, order = values.contiguous(), tuple(range(values.dim()))
    stored = values.permute(order)
    host = torch.empty(stored.shape, dtype=values.dtype, pin_memory=True)
    # On a copy stream, so the model's kernels do not queue behind the transfer; the allocator
    # is told the copy reads the tensor, so its memory is not reused before the copy is done.
    # In its own dtype and memory order: half the bytes of float32 for bf16, no device work,
    # no device memory; the host converts and reorders.
    stream = copy_stream(values.device)
    stream.wait_stream(torch.cuda.current_stream(values.device))
    with torch.cuda.stream(stream):
        host.copy_(stored, non_blocking=True)
    values.record_stream(stream)
    return host.permute(tuple(order.index(d) for d in range(len(order))))  # a view in logical order


def producer_stream(tensor: torch.Tensor) -> torch.cuda.Stream | None:
    """The stream that queues work on ``tensor`` now (None off CUDA): record it beside what a hook computes.

    A forward may run on a side stream (``with torch.cuda.stream(s):``) while the step
    is flushed from another: the flush must then wait for the stream its moments and
    samples were computed on (:func:`wait_for_producers`).
    """
    return torch.cuda.current_stream(tensor.device) if tensor.is_cuda else None


def wait_for_producers(streams: Iterable[torch.cuda.Stream | None]) -> None:
    """Make each device's current stream wait for work queued so far on ``streams`` (the host never waits).

    Call it before reading, on the current stream, device tensors that hooks made on
    the given streams; a stream that is the current one already needs nothing.
    """
    seen: set[tuple[int, int]] = set()
    for stream in streams:
        if stream is None or (stream.device_index, stream.stream_id) in seen:
            continue
        seen.add((stream.device_index, stream.stream_id))
        current = torch.cuda.current_stream(stream.device)
        if current != stream:
            current.wait_stream(stream)


_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream that carries this device's ``full`` copies to the host (one per device)."""
    stream = _copy_streams.get(device)
    if stream is None:
        stream = _copy_streams[device] = torch.cuda.Stream(device=device)
    return stream


def full_dtype(values: torch.Tensor) -> torch.dtype:
    """Dtype the ``sample`` and ``full`` stats keep ``values`` in: float64 for float64, else float32."""
    return torch.float64 if values.dtype == torch.float64 else torch.float32
