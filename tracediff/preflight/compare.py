"""Compare one upstream tensor with its port counterpart: from the tensors, or from fingerprints.

Two sources, one vocabulary (see :data:`tracediff.preflight.result.PARAM_STATUSES`):

* **tensors** (live models): every element is compared; "identical" means bit
  for bit, a transpose or a constant factor is detected exactly.
* **fingerprints** (two trace files): the module table keeps, per tensor, seven
  moments (sum, sum of |x|, sum of squares, min, max, NaN and Inf counts) and
  32 values at fixed flat positions, also read from the transposed tensor.
  Equal moments and samples mean "same values"; equal moments with different
  samples mean "same values, different order"; the port's sample matching the
  upstream's transposed sample means "transposed"; a constant ratio between
  the samples, confirmed by the moments, means "scaled". Max-abs and relative
  errors are then estimates over the 32 sampled values, and say so.

A fused port tensor (``to_qkv`` = ``cat(q, k, v)``) is compared piece by piece:
live, against the slice of rows each piece occupies; from fingerprints, the
pieces' moments add up to the fused tensor's, and wherever a sampled position
of the fused tensor is also a sampled position of a piece, the two values must
agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracediff.moments import (
    ABS_SUM,
    MAX,
    MIN,
    SUM,
    SUMSQ,
    moments_close,
    sample_positions,
    scaled_moments,
    stack_moments,
    zero_padded_moments,
)
from tracediff.store.trace import FINGERPRINT_SAMPLE

#: Relative tolerance when both sides keep the same dtype (reduction order only).
SAME_DTYPE_RTOL = 1e-6
#: Per-dtype relative tolerance of "equal within tolerance" across a dtype change:
#: about twice the unit round-off of the less precise of the two dtypes.
DTYPE_RTOL: dict[str, float] = {
    "float64": 1e-12,
    "complex128": 1e-12,
    "float32": 1e-6,
    "complex64": 1e-6,
    "float16": 1e-3,
    "bfloat16": 8e-3,
    "float8_e4m3fn": 0.13,
    "float8_e5m2": 0.26,
}
#: How constant a ratio must be to call a tensor "scaled" (relative spread).
SCALE_RTOL = 1e-4

@dataclass(frozen=True)
class Fingerprint:
    """What the module table keeps of one tensor."""

    shape: tuple[int, ...]
    dtype: str
    moments: np.ndarray
    sample: np.ndarray
    sample_t: np.ndarray

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Verdict:
    """A comparison's outcome before names are attached."""

    status: str
    max_abs: float | None = None
    rel: float | None = None
    scale: float | None = None
    detail: str = ""
    #: a fused piece's slice that holds another piece's values: that piece's index
    holds: int | None = None


def pair_rtol(dtype_a: str, dtype_b: str, override: float | None = None) -> float:
    """The relative tolerance of "equal within tolerance" for two dtypes."""
    if override is not None:
        return override
    if dtype_a == dtype_b:
        return SAME_DTYPE_RTOL
    return max(DTYPE_RTOL.get(dtype_a, SAME_DTYPE_RTOL), DTYPE_RTOL.get(dtype_b, SAME_DTYPE_RTOL), SAME_DTYPE_RTOL)


# -- fingerprints ------------------------------------------------------------------------


def compare_fingerprints(up: Fingerprint, port: Fingerprint, *, rtol: float | None = None) -> Verdict:
    """Judge two tensors from their fingerprints alone.

    Args:
        up: the upstream tensor's fingerprint (the reference).
        port: the port's.
        rtol: tolerance of "equal within tolerance"; default from the two dtypes.
    """
    tol = pair_rtol(up.dtype, port.dtype, rtol)
    same_dtype = up.dtype == port.dtype
    moments_agree = moments_close(up.moments, port.moments, tol)
    dtype_note = "" if same_dtype else f"{up.dtype} -> {port.dtype}"
    if up.shape == port.shape:
        if same_dtype and _same_values(up.sample, port.sample) and moments_close(up.moments, port.moments,
                                                                                    SAME_DTYPE_RTOL):
            return Verdict("identical")
        if moments_agree and _samples_close(up.sample, port.sample, tol):
            max_abs, rel = sample_errors(up.sample, port.sample)
            return Verdict("close", max_abs, rel, detail=dtype_note)
        if len(up.shape) == 2 and up.shape[0] == up.shape[1] and moments_agree \
                and _samples_close(up.sample_t, port.sample, tol):
            return Verdict("transposed", detail=dtype_note)
        scale = _sample_scale(up.sample, port.sample, up.moments, port.moments)
        max_abs, rel = sample_errors(up.sample, port.sample)
        if scale is not None:
            return Verdict("scaled", max_abs, rel, scale=scale)
        if moments_agree:
            return Verdict("permuted", detail="equal moments, different sampled values")
        if _same_values(up.sample, port.sample) or _samples_close(up.sample, port.sample, tol):
            return Verdict("different", None, None, detail="the sampled values agree but the moments differ: "
                           + moments_delta(up.moments, port.moments))
        return Verdict("different", max_abs, rel)
    if len(up.shape) == 2 and port.shape == up.shape[::-1]:
        if moments_agree and _samples_close(up.sample_t, port.sample, tol):
            return Verdict("transposed", detail=dtype_note)
        return Verdict("shape_mismatch", detail="transposed shape, but not upstream's values transposed")
    if up.numel == port.numel:
        if moments_agree and _samples_close(up.sample, port.sample, tol):
            return Verdict("reshaped", detail=dtype_note)
        if moments_agree:
            return Verdict("shape_mismatch", detail="same values, different shape and order")
    return Verdict("shape_mismatch")


def holds_same_values(up: Fingerprint, port: Fingerprint, *, rtol: float | None = None) -> bool:
    """Whether ``port`` holds ``up``'s values (identical, within tolerance, transposed or reshaped).

    The cheap test behind pairing by value: moments first, samples only if they agree.
    """
    if up.numel != port.numel:
        return False
    tol = pair_rtol(up.dtype, port.dtype, rtol)
    if not moments_close(up.moments, port.moments, tol):
        return False
    if _samples_close(up.sample, port.sample, tol):
        return True
    return len(up.shape) == 2 and port.shape in (up.shape, up.shape[::-1]) and _samples_close(
        up.sample_t, port.sample, tol)


def compare_fused(pieces: list[Fingerprint], fused: Fingerprint, *, rtol: float | None = None,
                  fused_name: str = "", piece_names: list[str] | None = None) -> list[Verdict]:
    """Judge each piece of ``cat(pieces, dim=0)`` against the fused tensor, from fingerprints.

    Wherever a sampled position of the fused tensor is also a sampled position
    of a piece, the two values are compared: that tells each piece's verdict
    (same values, a constant factor, different). The moments then confirm it:
    the pieces' moments, each scaled by its factor, must add up to the fused
    tensor's. When they do not, pieces whose sampled values agree are reported
    as not verified rather than identical.

    Args:
        pieces: fingerprints of the pieces, in concatenation order.
        fused: the fused tensor's fingerprint (the other side).
        fused_name, piece_names: for messages (a slice holding another piece's values is named).

    Returns:
        One verdict per piece. Slices that hold each other's pieces (``cat(q, v, k)``
        judged as ``cat(q, k, v)``) are ``swapped``, with ``holds`` naming the piece found.
    """
    tol = pair_rtol(pieces[0].dtype, fused.dtype, rtol)
    where = f"slice of fused {fused_name}" if fused_name else "slice of the fused tensor"
    starts = np.cumsum([0, *[p.numel for p in pieces]])
    fused_positions = sample_positions(fused.numel, FINGERPRINT_SAMPLE).tolist()
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for k, piece in enumerate(pieces):
        start, stop = int(starts[k]), int(starts[k + 1])
        own = {int(q): i for i, q in enumerate(sample_positions(piece.numel, FINGERPRINT_SAMPLE))}
        mine = [piece.sample[own[f - start]] for f in fused_positions if start <= f < stop and (f - start) in own]
        theirs = [fused.sample[slot] for slot, f in enumerate(fused_positions)
                  if start <= f < stop and (f - start) in own]
        found.append((np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)))
    # Each piece's factor from its sampled values: 1 (agree), c (scaled), None (different or unknown).
    factors: list[float | None] = []
    for a, b in found:
        if len(a) and _samples_close(a, b, tol):
            factors.append(1.0)
        elif len(a) >= 4:
            factors.append(_ratio(a, b))
        else:
            factors.append(None)
    holds = [_holds_other_piece(pieces, fused, k, starts, fused_positions, tol) if f is None and len(found[k][0])
             else None for k, f in enumerate(factors)]
    swapped = [k for k, f in enumerate(factors) if f is None]
    traded = is_permutation({k: holds[k] for k in swapped})
    if traded:
        # Pieces trading places leave the sums unchanged: the moments still confirm the rest.
        consistent = moments_close(stack_moments(np.stack([p.moments for p in pieces])), fused.moments, tol)
    else:
        consistent = all(f is not None for f in factors) and moments_close(
            stack_moments(np.stack([scaled_moments(p.moments, f) for p, f in zip(pieces, factors, strict=True)])),
            fused.moments, tol)
    out = []
    for k, ((a, b), factor) in enumerate(zip(found, factors, strict=True)):
        checked = f"{len(a)} sampled value{'s' if len(a) != 1 else ''} checked"
        max_abs, rel = sample_errors(a, b) if len(a) else (None, None)
        if factor == 1.0 and consistent:
            identical = pieces[k].dtype == fused.dtype and _same_values(a, b)
            detail = f"{where}; {checked}, moments add up"
            out.append(Verdict("identical", detail=detail) if identical else Verdict("close", max_abs, rel,
                                                                                      detail=detail))
        elif factor == 1.0:
            out.append(Verdict("unverified", detail=f"{where}: its {checked} agree, but the pieces' moments do not "
                               "add up to the fused tensor's (" + moments_delta(
                                   stack_moments(np.stack([p.moments for p in pieces])), fused.moments) + ")"))
        elif factor is not None:
            confirmed = "moments add up" if consistent else "moments do not confirm it"
            out.append(Verdict("scaled", max_abs, rel, scale=factor, detail=f"{where}; {checked}, {confirmed}"))
        elif len(a) and traded:
            out.append(Verdict("swapped", max_abs, rel, detail=f"{where}; {checked}", holds=holds[k]))
        elif len(a):
            held = holds[k]
            what = f"; it holds {piece_names[held]}'s values (pieces swapped?)" if (
                held is not None and piece_names) else ""
            out.append(Verdict("different", max_abs, rel, detail=f"{where}; {checked}{what}"))
        elif moments_close(stack_moments(np.stack([p.moments for p in pieces])), fused.moments, tol):
            out.append(Verdict("unverified", detail=f"{where}: the pieces' moments add up to the fused tensor's, "
                               "but no sampled value falls in this piece to confirm its place"))
        else:
            out.append(Verdict("different", detail=f"{where}: no sampled value falls in this piece, and the pieces' "
                               "moments do not add up to the fused tensor's"))
    return out


def is_permutation(holds: dict[int, int | None]) -> bool:
    """Whether the slices that hold another piece hold each other's: pieces that traded places.

    Args:
        holds: slot index -> index of the piece whose values that slot holds (its own
            index when in place); None where a slot holds no piece (re-initialised,
            scaled): such a slot takes no part in an exchange.
    """
    found = {k: j for k, j in holds.items() if j is not None and j != k}
    return bool(found) and sorted(found.values()) == sorted(found)


def _holds_other_piece(pieces: list[Fingerprint], fused: Fingerprint, k: int, starts: np.ndarray,
                       fused_positions: list[int], tol: float) -> int | None:
    """Index of another piece (same shape) whose sampled values sit in piece ``k``'s rows of the fused tensor."""
    start, stop = int(starts[k]), int(starts[k + 1])
    for j, other in enumerate(pieces):
        if j == k or other.shape != pieces[k].shape:
            continue
        own = {int(q): i for i, q in enumerate(sample_positions(other.numel, FINGERPRINT_SAMPLE))}
        hits = [(other.sample[own[f - start]], fused.sample[slot]) for slot, f in enumerate(fused_positions)
                if start <= f < stop and (f - start) in own]
        if hits and _samples_close(np.asarray([h[0] for h in hits]), np.asarray([h[1] for h in hits]), tol):
            return j
    return None


# -- tensors -----------------------------------------------------------------------------


def compare_tensors(up: Any, port: Any, *, rtol: float | None = None) -> Verdict:
    """Judge two live tensors element by element (exact: no sampling).

    Args:
        up: the upstream tensor (the reference).
        port: the port's tensor (moved to ``up``'s device for the comparison).
        rtol: tolerance of "equal within tolerance"; default from the two dtypes.
    """
    import torch

    from tracediff.hooks.stats import value_view  # with torch: only live models need them

    up_dtype, port_dtype = _dtype_name(up.dtype), _dtype_name(port.dtype)
    tol = pair_rtol(up_dtype, port_dtype, rtol)
    dtype_note = "" if up_dtype == port_dtype else f"{up_dtype} -> {port_dtype}"
    with torch.no_grad():
        if up_dtype == port_dtype and up.shape == port.shape and torch.equal(up, port.to(up.device)):
            return Verdict("identical")  # the common case, without a float64 copy of a large tensor
        a = value_view(up)[0].to(torch.float64)
        b = value_view(port)[0].to(device=a.device, dtype=torch.float64)
        if tuple(a.shape) == tuple(b.shape):
            if up_dtype == port_dtype and _equal(a, b):
                return Verdict("identical")
            max_abs, rel = _errors(a, b)
            if _close(a, b, tol):
                return Verdict("close", max_abs, rel, detail=dtype_note)
            if a.dim() == 2 and a.shape[0] == a.shape[1] and _close(a.t(), b, tol):
                return Verdict("transposed", detail=dtype_note)
            scale = _tensor_scale(a, b)
            if scale is not None:
                return Verdict("scaled", max_abs, rel, scale=scale)
            if _close(a.flatten().sort().values, b.flatten().sort().values, tol):
                return Verdict("permuted")
            return Verdict("different", max_abs, rel)
        if a.dim() == 2 and tuple(b.shape) == tuple(a.shape)[::-1]:
            if _close(a.t(), b, tol):
                return Verdict("transposed", detail=dtype_note)
            return Verdict("shape_mismatch", detail="transposed shape, but not upstream's values transposed")
        if a.numel() == b.numel():
            if _close(a.flatten(), b.flatten(), tol):
                return Verdict("reshaped", detail=dtype_note)
            if _close(a.flatten().sort().values, b.flatten().sort().values, tol):
                return Verdict("shape_mismatch", detail="same values, different shape and order")
    return Verdict("shape_mismatch")


def tensors_close(up: Any, port: Any, *, rtol: float | None = None) -> bool:
    """Whether two live tensors of one shape hold the same values (identical or within tolerance).

    The cheap test behind finding which piece a fused slice holds: no transpose,
    scale or permutation search, which :func:`compare_tensors` runs on every
    tensor that differs.
    """
    import torch

    from tracediff.hooks.stats import value_view  # with torch: only live models need them

    if tuple(up.shape) != tuple(port.shape):
        return False
    tol = pair_rtol(_dtype_name(up.dtype), _dtype_name(port.dtype), rtol)
    with torch.no_grad():
        if up.dtype == port.dtype and torch.equal(up, port.to(up.device)):
            return True
        a, b = value_view(up)[0].reshape(-1), value_view(port)[0].reshape(-1).to(up.device)
        if a.numel() > 2 * FINGERPRINT_SAMPLE:
            # A few elements reject most pairs (another piece's values) without a pass over all of them;
            # the floor is generous, so a pair within tolerance always passes on to the full test.
            at = torch.linspace(0, a.numel() - 1, FINGERPRINT_SAMPLE, device=a.device).long()
            sa, sb = a[at].to(torch.float64), b[at].to(torch.float64)
            floor = tol * float(torch.nan_to_num(sa.abs(), nan=0.0, posinf=0.0).max())
            if not bool(torch.allclose(sb, sa, rtol=tol, atol=floor, equal_nan=True)):
                return False
        a = a.to(torch.float64)
        return _close(a, b.to(torch.float64), tol)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _equal(a: Any, b: Any) -> bool:
    import torch

    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _close(a: Any, b: Any, rtol: float) -> bool:
    import torch

    if a.numel() == 0:
        return True
    floor = rtol * 1e-3 * float(torch.nan_to_num(a.abs(), nan=0.0, posinf=0.0).max())
    return bool(torch.allclose(b, a, rtol=rtol, atol=floor, equal_nan=True))


def _errors(a: Any, b: Any) -> tuple[float | None, float | None]:
    import torch

    if a.numel() == 0:
        return None, None
    diff = (b - a).abs()
    finite = torch.isfinite(diff)
    if not bool(finite.any()):
        return None, None
    max_abs = float(diff[finite].max())
    norm = float(torch.linalg.vector_norm(a[finite]))
    rel = float(torch.linalg.vector_norm(diff[finite])) / norm if norm > 0 else None
    return max_abs, rel


def _tensor_scale(a: Any, b: Any) -> float | None:
    """The constant ``c`` with ``b == c * a`` (``c != 1``), or None."""
    import torch

    nonzero = a != 0
    if int(nonzero.sum()) < 2 or bool((b[~nonzero] != 0).any()) or not bool(torch.isfinite(a).all()):
        return None
    ratio = b[nonzero] / a[nonzero]
    c = float(ratio.median())
    if c == 0 or not math.isfinite(c) or abs(c - 1.0) <= SCALE_RTOL:
        return None
    if float((ratio - c).abs().max()) > SCALE_RTOL * abs(c):
        return None
    return c


# -- fingerprint helpers -----------------------------------------------------------------


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def _samples_close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if a.shape != b.shape or not np.array_equal(nan_a, nan_b):
        return False
    va, vb = a[~nan_a], b[~nan_b]
    if va.size == 0:
        return True
    floor = rtol * 1e-3 * float(np.max(np.abs(va)))
    return bool(np.all(np.abs(vb - va) <= rtol * np.abs(va) + floor + 1e-300))


def sample_errors(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    both = ~np.isnan(a) & ~np.isnan(b)
    if a.shape != b.shape or not both.any():
        return None, None
    diff = np.abs(b[both] - a[both])
    finite = np.isfinite(diff)
    if not finite.any():
        return None, None
    norm = float(np.linalg.norm(a[both][finite]))
    rel = float(np.linalg.norm(diff[finite])) / norm if norm > 0 else None
    return float(diff[finite].max()), rel


def _ratio(a: np.ndarray, b: np.ndarray) -> float | None:
    """The constant ``c`` with ``b == c * a`` over the sampled values (``c != 1``), or None."""
    both = ~np.isnan(a) & ~np.isnan(b) & np.isfinite(a) & np.isfinite(b)
    a, b = a[both], b[both]
    nonzero = a != 0
    if int(nonzero.sum()) < 2 or np.any(b[~nonzero] != 0):
        return None
    ratio = b[nonzero] / a[nonzero]
    c = float(np.median(ratio))
    if c == 0 or not math.isfinite(c) or abs(c - 1.0) <= SCALE_RTOL:
        return None
    if float(np.max(np.abs(ratio - c))) > SCALE_RTOL * abs(c):
        return None
    return c


def _sample_scale(sa: np.ndarray, sb: np.ndarray, ma: np.ndarray, mb: np.ndarray) -> float | None:
    """A constant ratio between the samples that the moments confirm (sum, |sum|, sum of squares)."""
    c = _ratio(sa, sb)
    if c is None:
        return None
    tol = 10 * SCALE_RTOL
    checks = ((mb[SUM], c * ma[SUM], abs(c) * ma[ABS_SUM]),
              (mb[ABS_SUM], abs(c) * ma[ABS_SUM], abs(c) * ma[ABS_SUM]),
              (mb[SUMSQ], c * c * ma[SUMSQ], c * c * ma[SUMSQ]))
    for got, expected, scale in checks:
        if not math.isfinite(got) or abs(got - expected) > tol * abs(scale) + 1e-300:
            return None
    return c


def moments_delta(ma: np.ndarray, mb: np.ndarray) -> str:
    """The moments that differ, upstream vs port: ``sum 1.2 vs 0.6, max 2 vs 1``."""
    names = ("sum", "sum|x|", "sum x²", "min", "max", "NaNs", "Infs")
    parts = []
    for i, name in enumerate(names):
        x, y = float(ma[i]), float(mb[i])
        if (math.isnan(x) and math.isnan(y)) or x == y:
            continue
        parts.append(f"{name} {x:.4g} vs {y:.4g}")
    return ", ".join(parts[:3]) or "moments differ"


# -- padded tables -----------------------------------------------------------------------


def padded_rows(up_shape: tuple[int, ...], port_shape: tuple[int, ...]) -> tuple[str, int, int] | None:
    """``(side, real rows, padded rows)`` when one shape is the other with more rows along dim 0.

    ``side`` is ``port`` or ``upstream``, whichever has the extra rows (a vocabulary
    padded to a multiple, as FastVideo's and vLLM's ``VocabParallelEmbedding`` do).
    """
    if len(up_shape) != len(port_shape) or not up_shape or up_shape[1:] != port_shape[1:] \
            or up_shape[0] == port_shape[0] or min(up_shape[0], port_shape[0]) == 0:
        return None
    if port_shape[0] > up_shape[0]:
        return "port", up_shape[0], port_shape[0]
    return "upstream", port_shape[0], up_shape[0]


def compare_padded_tensors(up: Any, port: Any, *, rtol: float | None = None) -> Verdict:
    """Judge a table padded along dim 0 (either side) against the other, exactly.

    The first rows are compared as :func:`compare_tensors` compares any pair; the
    extra rows must be zero. Equal first rows and zero padding are ``padded``
    (not a finding); otherwise the first rows' own verdict, or ``shape_mismatch``
    when only the padding holds values.
    """
    import torch

    from tracediff.hooks.stats import value_view  # with torch: only live models need them

    found = padded_rows(tuple(up.shape), tuple(port.shape))
    assert found is not None
    side, n, m = found
    lead = compare_tensors(up[:n], port[:n], rtol=rtol)
    extra = (port if side == "port" else up)[n:]
    with torch.no_grad():
        values = value_view(extra)[0]
        nonzero = values != 0  # NaN included
        count = int(nonzero.sum())
        problem = None
        if count:
            finite = values[nonzero & torch.isfinite(values)]
            largest = f", max |x| {float(finite.abs().max()):.2g}" if finite.numel() else ""
            problem = f"{count} of {values.numel()} values nonzero{largest}"
    return _padded(lead, side, n, m, problem)


def compare_padded_fingerprints(up: Fingerprint, port: Fingerprint, *, rtol: float | None = None) -> Verdict:
    """Judge a table padded along dim 0 from fingerprints.

    Zero rows add nothing to the sum, sum of |x| and sum of squares, so the
    padded tensor's moments must equal the other's (min and max widened to 0).
    The real rows keep their row-major positions, so wherever both sides sampled
    the same element (from the flat sample or the transposed one: row 0 always
    when the row length is a multiple of 32) the values must agree, and every
    sampled element of the extra rows must be zero.
    """
    found = padded_rows(up.shape, port.shape)
    assert found is not None
    side, n, m = found
    tol = pair_rtol(up.dtype, port.dtype, rtol)
    small, big = (up, port) if side == "port" else (port, up)
    real, pad = _padded_samples(small, big)
    a, b = np.asarray([v for _, v in real[0]]), np.asarray([v for _, v in real[1]])
    up_values, port_values = (a, b) if side == "port" else (b, a)
    bad_pad = [v for v in pad if v != 0 or math.isnan(v)]
    problem = None
    if bad_pad:
        finite = [abs(v) for v in bad_pad if math.isfinite(v)]
        problem = f"{len(bad_pad)} of {len(pad)} sampled values nonzero" + (
            f", max |x| {max(finite):.2g}" if finite else "")
    moments_ok = moments_close(zero_padded_moments(small.moments), big.moments, tol)
    agree = len(a) > 0 and _samples_close(up_values, port_values, tol)
    checked = f"{len(a)} sampled value{'s' if len(a) != 1 else ''} of the first {n} rows checked"
    max_abs, rel = sample_errors(up_values, port_values) if len(a) else (None, None)
    if problem is not None:
        lead = Verdict("identical" if agree else "different", None if agree else max_abs, None if agree else rel,
                       detail=checked)
    elif moments_ok and agree:
        same = up.dtype == port.dtype and _same_values(a, b)
        lead = Verdict("identical") if same else Verdict("close", max_abs, rel, detail=(
            "" if up.dtype == port.dtype else f"{up.dtype} -> {port.dtype}"))
    elif moments_ok and not len(a):
        lead = Verdict("unverified", detail="the moments add up to zero padding, but no element was sampled on "
                       "both sides to confirm the rows' places")
    elif moments_ok:
        lead = Verdict("permuted", detail=f"equal moments, different sampled values ({checked})")
    else:
        up_m, port_m = (small.moments, big.moments) if side == "port" else (big.moments, small.moments)
        scale = _sample_scale(up_values, port_values, up_m, port_m) if len(a) else None
        if scale is not None:
            lead = Verdict("scaled", max_abs, rel, scale=scale, detail=checked)
        elif agree:
            lead = Verdict("different", detail=f"the sampled values agree but the moments differ: "
                           f"{moments_delta(zero_padded_moments(small.moments), big.moments)}")
        else:
            lead = Verdict("different", max_abs, rel, detail=checked)
    return _padded(lead, side, n, m, problem)


def holds_padded_values(up: Fingerprint, port: Fingerprint, *, rtol: float | None = None) -> bool:
    """Whether one side is the other padded with zero rows (pairing by value; constant tensors never qualify)."""
    found = padded_rows(up.shape, port.shape)
    if found is None:
        return False
    small = up if found[0] == "port" else port
    if not small.moments[MIN] < small.moments[MAX]:
        return False
    return compare_padded_fingerprints(up, port, rtol=rtol).status == "padded"


def _padded(lead: Verdict, side: str, n: int, m: int, problem: str | None) -> Verdict:
    """The verdict on a padded table from the verdict on its first ``n`` rows and what the padding holds."""
    where = f"{side} padded from {n} to {m} rows"
    if problem is None and lead.status in ("identical", "close"):
        return Verdict("padded", lead.max_abs, lead.rel, detail=lead.detail)
    if problem is not None and lead.status in ("identical", "close"):
        return Verdict("shape_mismatch", detail=f"{where}: the first {n} rows agree, but the {m - n} padding rows "
                       f"are not zero ({problem})")
    padding = "padding rows zero" if problem is None else f"padding rows not zero either ({problem})"
    return Verdict(lead.status, lead.max_abs, lead.rel, lead.scale,
                   detail="; ".join(p for p in (lead.detail, f"{where}, {padding}") if p))


def _padded_samples(small: Fingerprint, big: Fingerprint) -> tuple[tuple[list, list], list[float]]:
    """Sampled elements both tables hold (``(small's, big's)``, same order) and big's sampled padding values."""
    cols = math.prod(small.shape[1:])
    limit = small.shape[0] * cols
    have_small, have_big = _sampled_elements(small), _sampled_elements(big)
    common = sorted(k for k in have_small if k in have_big)
    pad = [v for k, v in sorted(have_big.items()) if k >= limit]
    return ([(k, have_small[k]) for k in common], [(k, have_big[k]) for k in common]), pad


def _sampled_elements(fp: Fingerprint) -> dict[int, float]:
    """Row-major element index -> value, from the flat sample and (2-D) the transposed one."""
    positions = sample_positions(fp.numel, FINGERPRINT_SAMPLE)
    out = {int(q): float(v) for q, v in zip(positions, fp.sample, strict=False)}
    if len(fp.shape) == 2:
        rows, cols = fp.shape
        for q, v in zip(positions, fp.sample_t, strict=False):
            r, c = int(q) % rows, int(q) // rows
            out.setdefault(r * cols + c, float(v))
    return out
