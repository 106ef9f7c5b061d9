"""On-device statistics of a tensor, computed together and fetched in bulk.

A hook calls :func:`moments` and gets back a small float64 tensor *on the
tensor's device*; nothing is copied to the host until the recorder flushes a
whole step with one transfer. Reductions take an accumulation dtype
(``sum(dtype=float64)``, ``vector_norm(dtype=float64)``) instead of first
materialising a float copy of a large bf16 activation.
"""

from __future__ import annotations

import torch

#: Layout of the vector returned by :func:`moments`.
MOMENT_FIELDS = ("sum", "abs_sum", "sumsq", "min", "max", "nan_count", "inf_count")

_NAN = float("nan")


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
        ``[sum, abs_sum, sumsq, min, max, nan_count, inf_count]``; for an empty
        tensor the sums and counts are 0 and min/max are NaN.
    """
    values, _ = value_view(tensor)
    if values.numel() == 0:
        return torch.tensor([0.0, 0.0, 0.0, _NAN, _NAN, 0.0, 0.0], dtype=torch.float64, device=values.device)
    acc = torch.float64
    total = values.sum(dtype=acc)
    abs_total = torch.linalg.vector_norm(values, 1, dtype=acc)
    squares = torch.linalg.vector_norm(values, 2, dtype=acc).square()
    low, high = torch.aminmax(values)
    nan_count = torch.isnan(values).sum(dtype=torch.int64)
    inf_count = torch.isinf(values).sum(dtype=torch.int64)
    return torch.stack(
        [
            total,
            abs_total,
            squares,
            low.to(acc),
            high.to(acc),
            nan_count.to(acc),
            inf_count.to(acc),
        ]
    )


def sample_positions(numel: int, size: int) -> torch.Tensor:
    """Deterministic flat positions of the ``sample`` stat: evenly spread, same on both sides."""
    if numel <= size:
        return torch.arange(numel, dtype=torch.int64)
    return torch.arange(size, dtype=torch.int64) * numel // size


def take_sample(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Gather the sample elements without copying the whole tensor."""
    values, _ = value_view(tensor)
    positions = sample_positions(values.numel(), size).to(values.device)
    if values.dim() == 0:
        return values.reshape(1).to(_capture_dtype(values))
    if values.is_contiguous():
        picked = values.reshape(-1)[positions]
    else:
        picked = values[torch.unravel_index(positions, values.shape)]
    return picked.to(_capture_dtype(values))


def take_full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor as float32 (float64 kept as is), for the ``full`` stat."""
    values, _ = value_view(tensor)
    return values.to(_capture_dtype(values)).reshape(-1)


def _capture_dtype(values: torch.Tensor) -> torch.dtype:
    return torch.float64 if values.dtype == torch.float64 else torch.float32
