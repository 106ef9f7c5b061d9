"""Noise-floor calibration: how much error each module adds by rounding alone.

The upstream model is isolated against *itself*: a copy at a higher precision
(float64 for a float32 or float64 test, float32 for bfloat16/float16) is the
reference, the upstream at the test dtype is teacher-forced against it exactly
as the port is. Each module's local error in that comparison is its noise
floor: what a correct implementation adds at this precision. A port module's
local error is then read as a multiple of its floor, so bf16 round-off is not
mistaken for a bug, and a bug far below a loose model-level tolerance still
stands out against the floor.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tracediff.call_context import clone_inputs

#: A port module drifts when its local error is more than this many times its noise floor. A correct
#: port sits near 1 (two independent roundings: about 1.4); the demo's bf16 RoPE bug is at 4.6.
DEFAULT_NOISE_FACTOR = 4.0


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its first floating-point parameter (float32 if none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The harmless change: float64 for float32/float64 tests, float32 below that."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def floor_minimum(dtype: torch.dtype) -> float:
    """The smallest floor used: the dtype's machine epsilon (a module exact in any precision has floor 0)."""
    return float(torch.finfo(dtype).eps)


def precise_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``model`` with its floating-point parameters and buffers in ``dtype``."""
    return copy.deepcopy(model).to(dtype=dtype).eval()


def precise_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    """A private copy of ``inputs`` with floating-point tensors cast to ``dtype``."""
    return clone_inputs(inputs, dtype=dtype)


def noise_ratio(local_rel_l2: float, floor_rel_l2: float | None, dtype: torch.dtype) -> float:
    """Local relative L2 error as a multiple of the noise floor (clipped below at machine epsilon)."""
    floor = max(floor_rel_l2 or 0.0, floor_minimum(dtype))
    return local_rel_l2 / floor
