"""Value evidence: what two modules computed says whether they are the same module.

Weights identify modules that own them; modules without weights (activations,
norms without affine parameters, residual adds, wrappers) were paired only by
order and shape, and real ports differ exactly there: one side's module does
the work of two on the other, or includes the next operation (FastVideo's
``norm_out`` applies the shift and scale that diffusers' ``norm_out`` leaves to
its caller). On a clean pair, modules that really correspond produce the same
numbers to many digits, and modules that do not, almost never do.

The numbers are the traces' own records of each module's first call:
``abs_mean``, ``mean``, ``min``, ``max`` and the L2 norm (moments, or the
statistics a FastVideo JSONL trace holds), plus the fixed-position ``sample``
where both sides have one. Tensors of different shape compare when one is the
other broadcast (``[32, 64]`` of 32 identical rows against ``[1, 64]``) on the
statistics that repetition does not change (``abs_mean``, ``mean``, ``min``,
``max``), and when only their layout differs (same element count) on all of them.

Two uses, see :func:`apply_value_evidence`:

* **proposals**: a module left unpaired, or paired only by order, whose first
  output agrees with exactly one candidate in the same stretch between anchors
  (pairs of stronger evidence) is paired with it;
* **checks**: a pair made by order or through its children whose outputs
  disagree grossly, where everything before it still agrees, is not a pair; it is
  dropped and, when nothing explains it, shown as an *alignment suspect*.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tracediff.align.alignment import Suspect
from tracediff.align.order import monotone_anchors
from tracediff.align.side import Side
from tracediff.modtree import is_within, parent

#: Relative distance under which two tensors count as the same values (fp32 reduction noise is ~1e-7).
AGREE = 1e-4
#: The same across a reduced-precision side (bf16 keeps ~3 significant digits).
AGREE_LOW_PRECISION = 2e-2
#: Relative distance over which two tensors are certainly not the same computation slightly off:
#: a planted eps, activation variant or bf16 module moves outputs by 1e-3..1e-2, a wrong pairing by ~1.
GROSS = 0.1
_LOW_PRECISION = ("bfloat16", "float16", "float8")
_INVARIANT = ("abs_mean", "mean", "min", "max")  # unchanged by repeating a tensor along a dimension
_ALL = (*_INVARIANT, "l2")


class ValueIndex:
    """First-call output values of every traced module on both sides, compared on demand."""

    def __init__(self, upstream: Side, port: Side) -> None:
        self.up = upstream
        self.port = port
        self._stats: dict[tuple[str, int], dict[str, float]] = {}
        # Each derived statistic is computed for all of a trace's records at once: once per side, not per lookup.
        self._columns: dict[tuple[str, str], np.ndarray | None] = {}
        # Proposals and checks ask for the same pairs of records again: each distance is computed once.
        self._distances: dict[tuple[int, int], float | None] = {}
        self._records: dict[tuple[str, int], tuple[tuple[int, ...], np.ndarray | None]] = {}

    @property
    def usable(self) -> bool:
        return self.up.trace is not None and self.port.trace is not None and bool(self.up.outputs) and bool(
            self.port.outputs
        )

    def output_distance(self, u: int, p: int) -> float | None:
        """Distance of the two modules' first output tensors, ``None`` when not comparable."""
        ur, pr = self.up.outputs.get(u), self.port.outputs.get(p)
        if not ur or not pr:
            return None
        return self.distance(ur[0], pr[0])

    def input_distance(self, u: int, p: int) -> float | None:
        """Distance of the two modules' first input tensors (module inputs traced), or None."""
        ur, pr = self.up.inputs.get(u), self.port.inputs.get(p)
        if not ur or not pr:
            return None
        return self.distance(ur[0], pr[0])

    def abs_mean(self, side: Side, modules: list[int]) -> list[float]:
        """The first output's abs-mean of each module (NaN where not recorded)."""
        trace = side.trace
        assert trace is not None
        label = "upstream" if side is self.up else "port"
        return [self._record_stats(label, trace, side.outputs[m][0]).get("abs_mean", math.nan) for m in modules]

    def low_precision(self) -> bool:
        """Whether any module output on either side is of a reduced-precision dtype."""
        for side in (self.up, self.port):
            trace = side.trace
            assert trace is not None
            if any(d.startswith(_LOW_PRECISION) for d in trace.records.dtypes):
                return True
        return False

    def agree_limit(self, u: int, p: int) -> float:
        dtypes = [self._dtype(self.up, u), self._dtype(self.port, p)]
        return AGREE_LOW_PRECISION if any(d.startswith(_LOW_PRECISION) for d in dtypes) else AGREE

    def distance(self, u_record: int, p_record: int) -> float | None:
        """Largest relative difference over the statistics both records allow comparing."""
        key = (u_record, p_record)
        if key not in self._distances:
            self._distances[key] = self._distance(u_record, p_record)
        return self._distances[key]

    def _distance(self, u_record: int, p_record: int) -> float | None:
        up, port = self.up.trace, self.port.trace
        assert up is not None and port is not None
        u_shape, p_shape = self._record("upstream", up, u_record)[0], self._record("port", port, p_record)[0]
        names = _comparable_stats(u_shape, p_shape)
        if names is None:
            return None
        a, b = self._record_stats("port", port, p_record), self._record_stats("upstream", up, u_record)
        scale = max(abs(b.get("abs_mean", math.nan)), abs(a.get("abs_mean", math.nan)), 0.0)
        extent = max(abs(b.get("min", 0.0)), abs(b.get("max", 0.0)), abs(a.get("min", 0.0)), abs(a.get("max", 0.0)))
        worst, compared = 0.0, 0
        for name in names:
            x, y = a.get(name), b.get(name)
            if x is None or y is None:
                continue
            if not (math.isfinite(x) and math.isfinite(y)):
                if x != y:
                    return math.inf
                continue
            norm = {"min": extent, "max": extent, "l2": max(abs(x), abs(y))}.get(name, scale)
            worst = max(worst, abs(x - y) / norm if norm > 0 else (0.0 if x == y else math.inf))
            compared += 1
        if u_shape == p_shape:
            u_sample, p_sample = self._record("upstream", up, u_record)[1], self._record("port", port, p_record)[1]
            sample = _sample_distance(u_sample, p_sample)
            if sample is not None:
                worst, compared = max(worst, sample), compared + 1
        return worst if compared else None

    def _record(self, side: str, trace, record: int) -> tuple[tuple[int, ...], np.ndarray | None]:  # noqa: ANN001
        """A record's shape and sample, read once: one record is compared with several candidates."""
        key = (side, record)
        if key not in self._records:
            self._records[key] = (trace.records.shape_of(record), trace.sample(record))
        return self._records[key]

    def _record_stats(self, side: str, trace, record: int) -> dict[str, float]:  # noqa: ANN001
        key = (side, record)
        if key not in self._stats:
            found = {}
            for name in _ALL:
                column = self._column(side, trace, name)
                if column is not None and not math.isnan(value := float(column[record])):
                    found[name] = value
            self._stats[key] = found
        return self._stats[key]

    def _column(self, side: str, trace, name: str) -> np.ndarray | None:  # noqa: ANN001
        key = (side, name)
        if key not in self._columns:
            self._columns[key] = np.asarray(trace.stat(name)) if trace.has_stat(name) else None
        return self._columns[key]

    @staticmethod
    def _dtype(side: Side, module: int) -> str:
        rows = side.outputs.get(module)
        return side.trace.records.dtype_of(rows[0]) if rows and side.trace is not None else ""


def _comparable_stats(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[str, ...] | None:
    """Statistics that mean the same for tensors of these shapes, or None when they cannot hold one tensor."""
    if not a or not b or -1 in a or -1 in b:
        return _ALL if a == b else None
    if a == b or math.prod(a) == math.prod(b):
        return _ALL
    return _INVARIANT if broadcast_equivalent(a, b) else None


def broadcast_equivalent(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """One shape is the other with dimensions added along which its values repeat.

    ``(2, 32, 64)`` (per token) and ``(2, 64)`` (per sample, broadcast later), ``(32, 64)``
    and ``(1, 64)``: the smaller shape's dimensions (size-1 ones ignored) appear, in order,
    in the larger. Repetition changes sums and norms but not means or extrema.
    """
    small, large = sorted(([d for d in a if d != 1], [d for d in b if d != 1]), key=len)
    if len(small) == len(large):
        return False
    k = 0
    for dim in large:
        if k < len(small) and small[k] == dim:
            k += 1
    return k == len(small)


def _sample_distance(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None or len(a) != len(b) or not len(a):
        return None
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return math.inf
    ref = float(np.sqrt(np.sum(b[finite] ** 2)))
    err = float(np.sqrt(np.sum((a[finite] - b[finite]) ** 2)))
    return err / ref if ref > 0 else (0.0 if err == 0 else math.inf)


# -- the stage -------------------------------------------------------------------------


@dataclass
class ValueStage:
    """What the aligner's state offers this stage (kept narrow so the stage stays testable)."""

    up: Side
    port: Side
    pairs: dict[int, int]  # upstream -> port, every pair so far
    weak: set[int]  # upstream modules whose pair rests on order or children only
    free_up: Callable[[int], bool]
    free_port: Callable[[int], bool]
    #: modules whose weights equal several on the other side: ambiguous by construction, never proposed
    twins_up: set[int] = field(default_factory=set)
    twins_port: set[int] = field(default_factory=set)
    #: port modules of suspects found earlier: their disagreement came first
    suspect_ports: set[int] = field(default_factory=set)


@dataclass
class ValueOutcome:
    """Pairs to add and to drop, and what to show."""

    add: list[tuple[int, int, str]]
    drop: list[tuple[int, str]]
    suspects: list[Suspect]
    #: unpaired modules whose output equals some module's on the other side (a wrapper, a module of
    #: another extent): explained, so order and shape must not pair them with a leftover
    explained_up: set[int] = field(default_factory=set)
    explained_port: set[int] = field(default_factory=set)
    #: weak pairs whose outputs hold the same values: confirmed
    confirmed: set[int] = field(default_factory=set)


def apply_value_evidence(stage: ValueStage) -> ValueOutcome:
    """Propose pairs by agreeing values, then drop weak pairs the values contradict.

    Returns what to change; the caller applies it (the aligner owns its bookkeeping).
    """
    values = ValueIndex(stage.up, stage.port)
    outcome = ValueOutcome([], [], [])
    if not values.usable:
        return outcome
    up, port = stage.up, stage.port
    pairs = dict(stage.pairs)
    strong = {u: p for u, p in pairs.items() if u not in stage.weak}

    verdicts: dict[tuple[int, int], bool] = {}

    def agrees(u: int, p: int) -> bool:
        if (u, p) not in verdicts:
            d = values.output_distance(u, p)
            verdicts[(u, p)] = d is not None and d <= values.agree_limit(u, p)
        return verdicts[(u, p)]

    # 1. Proposals: modules free, or weakly paired with something their values contradict (or with a
    #    pass-through, which agrees with whatever ran before it).
    def open_up(u: int) -> bool:
        p = pairs.get(u)
        if p is None:  # free from the start, or its pair was dropped here (grouped and ignored modules are not)
            return stage.free_up(u) or u in stage.pairs
        if not port.ran(p):  # paired with a module that never ran (a tied weight's other owner)
            return True
        return u in stage.weak and (not agrees(u, p) or p in port.passthrough)

    def open_port(p: int) -> bool:
        u = partner_of.get(p)
        if u is None:
            return stage.free_port(p) or p in initial_partner_of
        if not up.ran(u):
            return True
        return u in stage.weak and (not agrees(u, p) or u in up.passthrough)

    partner_of = {p: u for u, p in pairs.items()}
    initial_partner_of = dict(partner_of)
    anchors = [(float(up.exec_order[u]), float(port.exec_order[p])) for u, p in strong.items()
               if up.ran(u) and port.ran(p)]
    stretches = _Stretches(monotone_anchors(anchors))
    by_stretch_up: dict[int, list[int]] = {}
    by_stretch_port: dict[int, list[int]] = {}
    for u in up.outputs:
        if up.ran(u) and u not in up.passthrough and u not in stage.twins_up:
            by_stretch_up.setdefault(stretches.up(up.exec_order[u]), []).append(u)
    for p in port.outputs:
        if port.ran(p) and p not in port.passthrough and p not in stage.twins_port:
            by_stretch_port.setdefault(stretches.port(port.exec_order[p]), []).append(p)
    tree = _Tree(up, port, pairs, partner_of)
    # Only a window of abs-means can agree: as wide as the loosest limit either side's dtypes allow.
    window = 2.5 * (AGREE_LOW_PRECISION if values.low_precision() else AGREE)
    near_port = {k: _Near(group, values.abs_mean(port, group), window) for k, group in by_stretch_port.items()}
    near_up = {k: _Near(group, values.abs_mean(up, group), window) for k, group in by_stretch_up.items()}
    empty = _Near([], [], window)

    def port_candidates(u: int) -> list[int]:
        """Port modules of ``u``'s stretch whose output could agree with ``u``'s (by abs-mean first: cheap)."""
        return near_port.get(stretches.up(up.exec_order[u]), empty).around(values.abs_mean(up, [u])[0])

    def up_candidates(p: int) -> list[int]:
        return near_up.get(stretches.port(port.exec_order[p]), empty).around(values.abs_mean(port, [p])[0])

    def best_port(u: int) -> int | None:
        found = [p for p in port_candidates(u) if open_port(p) and agrees(u, p)]
        return tree.choose(found, lambda p: (u, p), port)

    def best_up(p: int) -> int | None:
        found = [u for u in up_candidates(p) if open_up(u) and agrees(u, p)]
        return tree.choose(found, lambda u: (u, p), up)

    for u in sorted((u for group in by_stretch_up.values() for u in group), key=lambda m: up.exec_order[m]):
        if not open_up(u):
            continue
        partner = best_port(u)
        if partner is None or pairs.get(u) == partner or best_up(partner) != u:
            continue
        for module in (u, partner_of.get(partner)):
            if module is not None and module in pairs:
                outcome.drop.append((module, "their values match other modules"))
                partner_of.pop(pairs.pop(module), None)
        pairs[u] = partner
        partner_of[partner] = u
        outcome.add.append((u, partner, "their outputs hold the same values"))

    outcome.confirmed = {u for u, p in pairs.items() if u in stage.weak and agrees(u, p)}
    for u in (m for group in by_stretch_up.values() for m in group):
        if u not in pairs and any(agrees(u, p) for p in port_candidates(u)):
            outcome.explained_up.add(u)
    for p in (m for group in by_stretch_port.values() for m in group):
        if p not in partner_of and any(agrees(u, p) for u in up_candidates(p)):
            outcome.explained_port.add(p)

    # 2. Checks: weak pairs whose outputs disagree grossly while their inputs agree, or while no pair that
    #    ran before them disagrees. Downstream of a real bug every later pair disagrees and nothing is
    #    known of the order-and-shape pairs there, so only the first disagreement can be a suspect.
    added = {u for u, _, _ in outcome.add}
    broken = min((port.exec_order[p] for p in stage.suspect_ports if port.ran(p)), default=math.inf)
    for u, p in sorted(pairs.items(), key=lambda item: port.exec_order.get(item[1], math.inf)):
        d = values.output_distance(u, p)
        if d is None or d <= values.agree_limit(u, p) or not port.ran(p):
            continue
        first = port.exec_order[p] < broken
        broken = min(broken, port.exec_order[p])
        if u not in stage.weak or u in added or up.names[u] == port.names[p] or d <= GROSS:
            continue  # a module of the same name that nothing better claimed stays paired: its drift is a finding
        if any(not agrees(d, pairs[d]) for d in _paired_below(up, u, pairs)):
            continue  # a module inside it already differs: that explains its output
        inputs = values.input_distance(u, p)
        inputs_agree = inputs is not None and inputs <= values.agree_limit(u, p)
        if not (inputs_agree or first):
            continue
        reason = (f"paired by order and shape, but their outputs differ by {d:.2g} (relative) while "
                  + ("their inputs agree" if inputs_agree else "every pair before them agrees"))
        outcome.drop.append((u, reason))
        outcome.suspects.append(Suspect(up.names[u], port.names[p], d, reason))
    return outcome


def _paired_below(side: Side, module: int, pairs: dict[int, int]) -> list[int]:
    """Upstream modules below ``module`` that have a pair (with a comparable output)."""
    return [side.index[name] for name in side.descendants.get(side.names[module], []) if side.index[name] in pairs]


def _innermost(found: list[int], side: Side) -> int | None:
    """The one candidate, or the innermost of candidates nested in one another; None when ambiguous.

    A wrapper that returns its only child's output holds the same values as the
    child (FastVideo's ``patch_embedding`` around ``patch_embedding.proj``); the
    child is the module that did the computation, the wrapper may do more.
    Candidates that are not one chain of ancestors are different modules with the
    same numbers: ambiguous, so nothing is guessed.
    """
    if not found:
        return None
    chain = sorted(found, key=lambda m: side.names[m].count(".") if side.names[m] else -1)
    for outer, inner in zip(chain, chain[1:], strict=False):
        if not is_within(side.names[inner], side.names[outer], strict=False):
            return None
    return chain[-1]


class _Tree:
    """Whether a pair keeps the module trees consistent with the pairs made so far."""

    def __init__(self, up: Side, port: Side, pairs: dict[int, int], partner_of: dict[int, int]) -> None:
        self.up, self.port, self.pairs, self.partner_of = up, port, pairs, partner_of

    def choose(self, found: list[int], pair: Callable[[int], tuple[int, int]], side: Side) -> int | None:
        """The candidate that keeps the trees consistent (strictly if one does, else within the parents)."""
        for loose in (False, True):
            kept = [m for m in found if self.consistent(*pair(m), loose=loose)]
            if kept:
                return _innermost(kept, side)
        return None

    def consistent(self, u: int, p: int, *, loose: bool = False) -> bool:
        """Every paired module below ``u`` has its partner below ``p``, and the other way round.

        ``loose``: below ``p``'s parent is enough, for modules of different extent that
        hold the same values (diffusers' GELU module owns the projection FastVideo's
        MLP keeps beside its activation).
        """
        up_name, port_name = self.up.names[u], self.port.names[p]
        up_scope = parent(up_name) if loose and up_name else up_name
        port_scope = parent(port_name) if loose and port_name else port_name
        for below in self.up.descendants.get(up_name, []):
            partner = self.pairs.get(self.up.index[below])
            if partner is not None and not is_within(self.port.names[partner], port_scope, strict=False):
                return False
        for below in self.port.descendants.get(port_name, []):
            partner = self.partner_of.get(self.port.index[below])
            if partner is not None and not is_within(self.up.names[partner], up_scope, strict=False):
                return False
        return True


class _Near:
    """Modules sorted by the abs-mean of their first output, to find the few that could agree with a value.

    Two outputs that agree have abs-means within the agreement limit (a few percent
    at most), so only a window of the sorted values needs the full comparison; a
    module without a recorded abs-mean is a candidate for every value.
    """

    def __init__(self, modules: list[int], abs_means: list[float], window: float) -> None:
        self.window = window  # half-width, relative to the value looked up
        known = [(v, m) for v, m in zip(abs_means, modules, strict=True) if not math.isnan(v)]
        known.sort()
        self.keys = [v for v, _ in known]
        self.modules = [m for _, m in known]
        self.unknown = [m for v, m in zip(abs_means, modules, strict=True) if math.isnan(v)]

    def around(self, value: float) -> list[int]:
        if math.isnan(value):
            return self.modules + self.unknown
        slack = self.window * abs(value) + 1e-12
        low = bisect.bisect_left(self.keys, value - slack)
        high = bisect.bisect_right(self.keys, value + slack)
        return self.modules[low:high] + self.unknown


class _Stretches:
    """Which stretch between consecutive anchors a position falls in, on each side."""

    def __init__(self, chain: list[tuple[float, float]]) -> None:
        self.xs = [x for x, _ in chain]
        self.ys = [y for _, y in chain]

    def up(self, position: float) -> int:
        return bisect.bisect_right(self.xs, position)

    def port(self, position: float) -> int:
        return bisect.bisect_right(self.ys, position)


__all__ = ["AGREE", "GROSS", "Suspect", "ValueIndex", "apply_value_evidence", "broadcast_equivalent"]
