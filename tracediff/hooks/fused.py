"""One-pass moments on a GPU: every statistic of a tensor from a single read of it.

Reading a large activation once costs what it costs; reading it eight times
(sum, |sum|, sum of squares, min/max, NaN and Inf counts as separate PyTorch
reductions) is what makes a traced forward slow. The Triton kernel here reads
each element once and keeps seven running values per lane, in float32 for
16- and 32-bit inputs (float64 for float64 ones). A fixed number of programs
(:data:`PROGRAMS`, independent of the GPU) each write one row of partial
results, and a second one-program kernel combines the rows in float64 into the
``[sum, abs_sum, sumsq, min, max, nan_count, inf_count]`` vector of
:func:`tracediff.hooks.stats.moments`. The order of every addition is fixed by
the tensor's size and memory layout alone, so the same tensor gives the same
bits on every run on the same GPU and software stack (another GPU or compiler
may order the float32 additions within a lane differently).

Triton ships with PyTorch's CUDA builds; where it is missing, or the first
launch fails, :func:`available` turns false and the caller falls back to
PyTorch reductions.
"""

from __future__ import annotations

import threading
import warnings

import torch

try:  # Triton is optional: CPU builds of PyTorch do not ship it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

#: Element dtypes the kernel reads directly.
DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
#: Programs of the first pass; fixed so that the summation order depends on the size only.
PROGRAMS = 1024
#: Elements each program loads per iteration (float64 inputs: fewer, to keep float64 accumulators in registers).
BLOCK = 2048
BLOCK_F64 = 1024
#: Warps per program: 8 elements (one 16-byte load of bf16) per thread at BLOCK = 2048 (docs/benchmarks.md).
NUM_WARPS = 8
#: Partial-result columns (7 used, padded to 8).
_WIDTH = 8

_state = {"ok": triton is not None, "reason": "" if triton is not None else "triton is not installed"}
_lock = threading.Lock()

if triton is not None:

    @triton.jit
    def _accumulate(x, mask, s, a, q, lo, hi, nans, infs):  # pragma: no cover - GPU
        s += x
        a += tl.abs(x)
        q += x * x
        lo = tl.minimum(lo, tl.where(mask, x, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, x, float("-inf")))
        nans += (x != x).to(tl.int32)
        infs += (tl.abs(x) == float("inf")).to(tl.int32)
        return s, a, q, lo, hi, nans, infs

    @triton.jit
    def _partials(
        x_ptr, part_ptr, n, n_full, stride, BLOCK: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr
    ):  # pragma: no cover - GPU
        # n_full (a multiple of BLOCK) and stride (programs * BLOCK) are divisible by 16, so the
        # main loop's masks are uniform over 16 elements and its loads are 16-byte vectors.
        # WIDE: indices in int64. Within one stride (+ BLOCK) of 2**31 elements, int32 indices of
        # masked-off lanes and the loop's `start` wrap negative, pass `idx < n` and read before the
        # tensor (garbage sums or an illegal-address fault that poisons the CUDA context).
        pid = tl.program_id(0)
        s = tl.zeros([BLOCK], dtype=ACC)
        a = tl.zeros([BLOCK], dtype=ACC)
        q = tl.zeros([BLOCK], dtype=ACC)
        lo = tl.full([BLOCK], float("inf"), dtype=ACC)
        hi = tl.full([BLOCK], float("-inf"), dtype=ACC)
        nans = tl.zeros([BLOCK], dtype=tl.int32)
        infs = tl.zeros([BLOCK], dtype=tl.int32)
        if WIDE:
            # the loop counts rounds: an int32 `start` would wrap on its last increment (and so would
            # cdiv's n_full + stride - 1); with n_full = 0 this is one round, all masked off
            lanes = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            for r in range(0, (n_full - 1) // stride + 1):
                idx = lanes + r * stride  # r * stride < n_full: no int32 overflow before the int64 sum
                mask = idx < n_full
                x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
                s, a, q, lo, hi, nans, infs = _accumulate(x, mask, s, a, q, lo, hi, nans, infs)
            tail = n_full + tl.arange(0, BLOCK).to(tl.int64)
        else:
            lanes = pid * BLOCK + tl.arange(0, BLOCK)
            for start in range(0, n_full, stride):
                idx = start + lanes
                mask = idx < n_full
                x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
                s, a, q, lo, hi, nans, infs = _accumulate(x, mask, s, a, q, lo, hi, nans, infs)
            tail = n_full + tl.arange(0, BLOCK)
        # the last n - n_full (< BLOCK) elements, read by program 0 (a bound, not `& (pid == 0)`:
        # Triton's interpreter rejects a mask broadcast from a scalar)
        idx = tail
        mask = idx < tl.where(pid == 0, n, n_full)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
        s, a, q, lo, hi, nans, infs = _accumulate(x, mask, s, a, q, lo, hi, nans, infs)
        row = part_ptr + pid * 8
        tl.store(row + 0, tl.sum(s, axis=0).to(tl.float64))
        tl.store(row + 1, tl.sum(a, axis=0).to(tl.float64))
        tl.store(row + 2, tl.sum(q, axis=0).to(tl.float64))
        tl.store(row + 3, tl.min(lo, axis=0).to(tl.float64))
        tl.store(row + 4, tl.max(hi, axis=0).to(tl.float64))
        tl.store(row + 5, tl.sum(nans, axis=0).to(tl.float64))
        tl.store(row + 6, tl.sum(infs, axis=0).to(tl.float64))

    @triton.jit
    def _combine(part_ptr, out_ptr, rows, ROWS: tl.constexpr):  # pragma: no cover - GPU
        r = tl.arange(0, ROWS)
        mask = r < rows
        base = part_ptr + r * 8
        s = tl.sum(tl.load(base + 0, mask=mask, other=0.0), axis=0)
        a = tl.sum(tl.load(base + 1, mask=mask, other=0.0), axis=0)
        q = tl.sum(tl.load(base + 2, mask=mask, other=0.0), axis=0)
        lo = tl.min(tl.load(base + 3, mask=mask, other=float("inf")), axis=0)
        hi = tl.max(tl.load(base + 4, mask=mask, other=float("-inf")), axis=0)
        nans = tl.sum(tl.load(base + 5, mask=mask, other=0.0), axis=0)
        infs = tl.sum(tl.load(base + 6, mask=mask, other=0.0), axis=0)
        # Like torch.aminmax: any NaN makes both extremes NaN (the reductions above may drop it).
        lo = tl.where(nans > 0, float("nan"), lo)
        hi = tl.where(nans > 0, float("nan"), hi)
        tl.store(out_ptr + 0, s)
        tl.store(out_ptr + 1, a)
        tl.store(out_ptr + 2, q)
        tl.store(out_ptr + 3, lo)
        tl.store(out_ptr + 4, hi)
        tl.store(out_ptr + 5, nans)
        tl.store(out_ptr + 6, infs)


def available() -> bool:
    """Whether the fused kernel can be used (Triton present and no launch has failed)."""
    return bool(_state["ok"])


def supports(values: torch.Tensor) -> bool:
    """Whether :func:`moments` takes ``values``: a contiguous, non-empty float tensor on a CUDA device."""
    return (
        available()
        and values.is_cuda
        and values.dtype in DTYPES
        and values.is_contiguous()
        and values.numel() > 0
    )


def moments(values: torch.Tensor) -> torch.Tensor | None:
    """The float64 moment vector of ``values`` on its device, or None if the kernel is unavailable.

    A failed launch (no compiler for this GPU, an old driver) switches the kernel
    off for the rest of the process with one warning; the caller then falls back
    to PyTorch reductions.
    """
    try:
        with torch.cuda.device(values.device):
            return launch(values)
    except Exception as exc:  # a compiler or driver problem: fall back, once, loudly
        with _lock:
            if _state["ok"]:
                _state["ok"], _state["reason"] = False, repr(exc)
                warnings.warn(
                    f"tracediff: the fused statistics kernel failed ({exc!r}); falling back to PyTorch "
                    "reductions (slower, same values up to rounding)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return None


def launch(
    values: torch.Tensor,
    *,
    block: int | None = None,
    warps: int = NUM_WARPS,
    programs: int = PROGRAMS,
    wide: bool | None = None,
) -> torch.Tensor:
    """Run both kernels on a contiguous non-empty ``values``; the moment vector on its device.

    ``block``, ``warps`` and ``programs`` exist for benchmarks: changing them changes
    the summation order, hence the last bits of the sums. ``wide`` forces int64 (True)
    or int32 (False) indexing, for tests; by default :func:`wide_indices` decides.
    """
    n = values.numel()
    f64 = values.dtype == torch.float64
    block = block or (BLOCK_F64 if f64 else BLOCK)
    programs = min(programs, triton.cdiv(n, block))
    partials = torch.empty((programs, _WIDTH), dtype=torch.float64, device=values.device)
    out = torch.empty(7, dtype=torch.float64, device=values.device)
    acc = tl.float64 if f64 else tl.float32
    n_full = n - n % block
    stride = programs * block
    wide = wide_indices(n, stride, block) if wide is None else wide
    _partials[(programs,)](values, partials, n, n_full, stride, BLOCK=block, ACC=acc, WIDE=wide, num_warps=warps)
    _combine[(1,)](partials, out, programs, ROWS=triton.next_power_of_2(programs), num_warps=4)
    return out


#: Largest index an int32 holds.
_INT32_MAX = 2**31 - 1


def wide_indices(n: int, stride: int, block: int) -> bool:
    """Whether the first pass must index in int64 for ``n`` elements.

    Every lane computes ``start + lane`` for each ``start`` below ``n_full`` (up to one
    stride past the last element) and the tail ``n_full + arange(block)``: the largest
    index is below ``n + stride + block``. Smaller tensors keep int32 arithmetic (the
    code, speed and bits measured in docs/benchmarks.md).
    """
    return n + stride + block > _INT32_MAX
