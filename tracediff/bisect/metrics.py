"""The differ's element check, on live tensors.

:mod:`tracediff.diff` compares recorded elements with numpy; bisection compares
tensors that are still on the model's device, often far too large to copy to
the host. This is the same check written with torch, so a module's local error
means exactly what a drift in the first-drift report means:

* ``ratio``: ``max |port - ref| / (atol + rtol * |ref|)`` over the elements
  (``> 1`` breaks tolerance; a zero limit makes any difference infinite);
* ``rel_l2``: ``||port - ref|| / ||ref||``; ``max_abs``: the largest ``|port - ref|``;
* ``cosine`` similarity; non-finite elements count as infinitely wrong unless
  both sides hold the same non-finite value.

``tests/bisect/test_bisect_units.py`` checks it against the differ's own numpy code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tracediff.results import finite_or_none
from tracediff.tolerance import Tolerance


@dataclass(frozen=True)
class Metrics:
    """How far one port tensor is from its reference, under one tolerance.

    Attributes:
        ratio: worst element's ``|port - ref| / (atol + rtol * |ref|)``; > 1 fails.
        rel_l2: relative L2 error (``inf`` when the reference is zero and the port is not).
        max_abs: largest absolute element error.
        cosine: cosine similarity of the flattened tensors.
        numel: elements compared.
    """

    ratio: float
    rel_l2: float
    max_abs: float
    cosine: float
    numel: int

    @property
    def failed(self) -> bool:
        return self.ratio > 1.0

    def to_json(self) -> dict[str, float | int | None]:
        """JSON has no NaN or Infinity: like the first-drift report, they become ``null``."""
        return {
            "ratio": finite_or_none(self.ratio),
            "rel_l2": finite_or_none(self.rel_l2),
            "max_abs": finite_or_none(self.max_abs),
            "cosine": finite_or_none(self.cosine),
            "numel": self.numel,
        }


ZERO = Metrics(0.0, 0.0, 0.0, 1.0, 0)


def compare(port: torch.Tensor, ref: torch.Tensor, tolerance: Tolerance) -> Metrics:
    """Compare two tensors of the same shape element by element (in float64, on ``ref``'s device).

    Complex tensors are compared as their real and imaginary parts.

    Raises:
        ValueError: the shapes differ.
    """
    if port.shape != ref.shape:
        raise ValueError(f"cannot compare shape {tuple(port.shape)} with {tuple(ref.shape)}")
    a, b = _as_real(port).reshape(-1), _as_real(ref).reshape(-1)
    if a.numel() == 0:
        return ZERO
    ratio = max_abs = d2 = a2 = b2 = ab = 0.0
    broken = False
    # float64 temporaries of a whole activation (a 32760 x 8960 FFN hidden: seven of 2.3 GB) would
    # cost a real-size bisection more memory than the outputs it keeps; pieces of COMPARE_CHUNK do not.
    for start in range(0, a.numel(), COMPARE_CHUNK):
        part = _compare_part(a[start : start + COMPARE_CHUNK], b[start : start + COMPARE_CHUNK], tolerance)
        ratio, max_abs = max(ratio, part[0]), max(max_abs, part[1])
        d2, a2, b2, ab = d2 + part[2], a2 + part[3], b2 + part[4], ab + part[5]
        broken = broken or part[6]
    if broken:
        rel_l2, cosine = math.inf, math.nan
    else:
        rel_l2 = math.sqrt(d2 / b2) if b2 > 0 else (math.inf if d2 > 0 else 0.0)
        if a2 > 0 and b2 > 0:
            cosine = max(-1.0, min(1.0, ab / math.sqrt(a2 * b2)))
        else:
            cosine = 1.0 if a2 == 0 and b2 == 0 else 0.0
    return Metrics(ratio, rel_l2, max_abs, cosine, int(a.numel()))


#: Elements compared at a time (float64 temporaries of 128 MiB each).
COMPARE_CHUNK = 1 << 24


def _compare_part(
    port: torch.Tensor, ref: torch.Tensor, tolerance: Tolerance
) -> tuple[float, float, float, float, float, float, bool]:
    """``(max ratio, max abs, sum d^2, sum a^2, sum b^2, sum ab, broken)`` of flat pieces, on ``ref``'s device."""
    a, b = port.to(device=ref.device, dtype=torch.float64), ref.to(torch.float64)
    finite = torch.isfinite(a) & torch.isfinite(b)
    same = ~finite & ((a == b) | (torch.isnan(a) & torch.isnan(b)))
    diff = torch.where(finite, (a - b).abs(), torch.where(same, 0.0, math.inf))
    allowed = tolerance.atol + tolerance.rtol * torch.where(torch.isfinite(b), b.abs(), 0.0)
    el_ratio = torch.where(allowed > 0, diff / allowed.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))
    af, bf = torch.where(finite, a, 0.0), torch.where(finite, b, 0.0)
    sums = torch.stack([((af - bf) ** 2).sum(), (af * af).sum(), (bf * bf).sum(), (af * bf).sum(),
                        el_ratio.max(), diff.max(), (~finite & ~same).any().to(torch.float64)]).tolist()
    return sums[4], sums[5], sums[0], sums[1], sums[2], sums[3], bool(sums[6])


def combine(items: list[Metrics]) -> Metrics:
    """One figure for several tensors of one output: the worst of each metric."""
    if not items:
        return ZERO
    if len(items) == 1:
        return items[0]
    return Metrics(
        max(m.ratio for m in items),
        max(m.rel_l2 for m in items),
        max(m.max_abs for m in items),
        min(m.cosine for m in items),
        sum(m.numel for m in items),
    )


def _as_real(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return torch.view_as_real(t) if t.is_complex() else t
