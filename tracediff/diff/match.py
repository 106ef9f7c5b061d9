"""Which record of one side meets which of the other, and where each sits in the port's execution order.

Records of an aligned module pair are matched by ``(step, call, tensor label)``; a record of a pair traced on
both sides that finds no partner is one-sided (a finding). A module's split calls that the other side made as
one batched call are combined first (:mod:`tracediff.diff.batching`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from tracediff.align.alignment import Alignment
from tracediff.diff.batching import BatchPlan, with_combined
from tracediff.errors import DiffError
from tracediff.store.trace import Trace


@dataclass(eq=False)
class RecordMatch:
    """Which records are compared, which are one-sided, and where each sits in port order."""

    pairs: list[tuple[str, str]]  # (port, upstream) per pair id
    steps: list[int]
    steps_only_upstream: list[int]
    steps_only_port: list[int]
    u_step: np.ndarray  # per upstream record, reconciled
    p_step: np.ndarray
    u_pair: np.ndarray  # per upstream record, -1 = not aligned
    p_pair: np.ndarray
    labels: list[str]  # common label vocabulary
    u_label: np.ndarray
    p_label: np.ndarray
    # matched records
    mu: np.ndarray
    mp: np.ndarray
    m_pos: np.ndarray
    # one-sided records (of pairs traced on both sides in that step)
    only_p: np.ndarray
    only_p_pos: np.ndarray
    only_u: np.ndarray
    only_u_pos: np.ndarray
    one_sided_modules: int
    p_module_input: np.ndarray  # per port record: an input of a module other than the root
    p_grouped: np.ndarray  # per port module (+1 for "unknown"): a member of an aligned group
    # The traces compared: the given ones, plus one combined record per group of split calls that one
    # record of the other side holds batched (CFG, see with_combined); the split records are not matched.
    upstream: Trace
    port: Trace
    # (pair id, step) -> (side that batches, number of calls): one call on that side, several on the other
    batching: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    combined: int = 0  # combined records (both sides)

    @classmethod
    def build(
        cls,
        upstream: Trace,
        port: Trace,
        alignment: Alignment,
        step: int | None,
        _hidden: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> RecordMatch:
        """Match records; ``_hidden`` (second pass) masks the split records a combined record replaces."""
        pairs, u_pair_of, p_pair_of = _pair_tables(upstream, port, alignment)
        uc, pc = upstream.records.columns, port.records.columns
        u_pair = u_pair_of[uc["module"]] if len(upstream.records) else np.zeros(0, dtype=np.int64)
        p_pair = p_pair_of[pc["module"]] if len(port.records) else np.zeros(0, dtype=np.int64)
        u_step, p_step = _reconcile_steps(uc["step"].astype(np.int64), pc["step"].astype(np.int64))
        u_steps = set(_distinct(u_step[u_pair >= 0]).tolist())
        p_steps = set(_distinct(p_step[p_pair >= 0]).tolist())
        common = sorted(u_steps & p_steps)
        empty = [(name, trace) for name, trace in (("upstream", upstream), ("port", port)) if not len(trace.records)]
        if empty:
            which = " and ".join(f"the {name} trace {trace.path}" for name, trace in empty)
            raise DiffError(
                f"{which} recorded nothing (0 records): the model that ran was likely not the attached one nor one "
                "of its submodules, tracing was off, or no step matched FASTVIDEO_TRACE_STEPS (attach warns at close)"
            )
        if not u_steps or not p_steps:
            side = "either side" if not (u_steps or p_steps) else ("upstream" if not u_steps else "the port")
            raise DiffError(
                f"nothing aligned: none of the {len(pairs)} aligned module pair(s) has records on {side} "
                f"(traced modules: upstream {len(_distinct(uc['module']))}, port {len(_distinct(pc['module']))}); "
                "give the aligner a mapping file (--map) or trace the same layers on both sides"
            )
        if step is not None:
            if step not in common:
                raise DiffError(
                    f"step {step} is not in both traces (upstream steps: {list_text(sorted(u_steps))}; "
                    f"port steps: {list_text(sorted(p_steps))})"
                )
            common = [step]
        elif not common:
            raise DiffError(
                f"the traces share no step with aligned records (upstream steps: {list_text(sorted(u_steps))}; "
                f"port steps: {list_text(sorted(p_steps))}; aligned module pairs: {len(pairs)})"
            )
        labels: dict[str, int] = {}
        u_label = _label_map(upstream.records.labels, labels)[uc["label"]]
        p_label = _label_map(port.records.labels, labels)[pc["label"]]
        u_module_input = upstream.module_input_records()
        p_module_input = port.module_input_records()
        steps_arr = np.asarray(common, dtype=np.int64)
        u_keep = (u_pair >= 0) & np.isin(u_step, steps_arr)
        p_keep = (p_pair >= 0) & np.isin(p_step, steps_arr)
        if _hidden is not None:
            u_keep &= ~_hidden[0]
            p_keep &= ~_hidden[1]
        u_rows = np.flatnonzero(u_keep)
        p_rows = np.flatnonzero(p_keep)
        # Port execution order: step-major, then seq. Rank = position in that order.
        p_rows = p_rows[np.lexsort((pc["seq"][p_rows], p_step[p_rows]))]
        u_rows = u_rows[np.lexsort((uc["seq"][u_rows], u_step[u_rows]))]
        p_rank = np.arange(len(p_rows), dtype=np.float64)

        n_step, n_pair, n_label = len(common), max(len(pairs), 1), max(len(labels), 1)
        n_call = int(max(uc["call"][u_rows].max(initial=0), pc["call"][p_rows].max(initial=0))) + 1
        u_s = np.searchsorted(steps_arr, u_step[u_rows])
        p_s = np.searchsorted(steps_arr, p_step[p_rows])
        u_key = _key(u_pair[u_rows], u_s, uc["call"][u_rows], u_label[u_rows], n_step, n_call, n_label, n_pair)
        p_key_label = _sole_labels(u_pair[u_rows], u_label[u_rows], p_pair[p_rows], p_label[p_rows], labels)
        p_key = _key(p_pair[p_rows], p_s, pc["call"][p_rows], p_key_label, n_step, n_call, n_label, n_pair)
        batching: dict[tuple[int, int], tuple[str, int]] = {}
        if _hidden is None:
            plan = BatchPlan.build(
                upstream, port, u_rows, p_rows, u_pair[u_rows], p_pair[p_rows], u_s, p_s,
                u_label[u_rows], p_key_label, common,
            )
            batching = plan.hints
            if plan.u_groups or plan.p_groups:
                up2, hide_u = with_combined(upstream, plan.u_groups)
                port2, hide_p = with_combined(port, plan.p_groups)
                match = cls.build(up2, port2, alignment, step, _hidden=(hide_u, hide_p))
                match.batching = batching
                match.combined = len(plan.u_groups) + len(plan.p_groups)
                return match

        order = np.argsort(u_key, kind="stable")
        sorted_keys = u_key[order]
        where = np.minimum(np.searchsorted(sorted_keys, p_key), max(len(sorted_keys) - 1, 0))
        hit = sorted_keys[where] == p_key if len(sorted_keys) else np.zeros(len(p_key), dtype=bool)
        u_hit_at = order[where[hit]]
        u_matched = np.zeros(len(u_rows), dtype=bool)
        u_matched[u_hit_at] = True

        # Only records of module pairs traced on both sides in that step count as missing.
        u_ps = u_pair[u_rows] * n_step + u_s
        p_ps = p_pair[p_rows] * n_step + p_s
        both = present(u_ps, n_pair * n_step) & present(p_ps, n_pair * n_step)
        # A module input that finds no partner (``input.hidden_states`` and ``input.mask`` against
        # ``input[0]``) is a difference in calling convention, not a finding.
        only_p_mask = ~hit & both[p_ps] & ~p_module_input[p_rows]
        only_u_mask = ~u_matched & both[u_ps] & ~u_module_input[u_rows]
        one_sided = int(np.sum(present(u_pair[u_rows], n_pair) ^ present(p_pair[p_rows], n_pair)))

        # An upstream-only record sits right after the port record matching its predecessor.
        u_rank = np.full(len(u_rows), -1.0)
        u_rank[u_hit_at] = p_rank[hit]
        u_pos = np.maximum.accumulate(u_rank) + 0.5 if len(u_rank) else u_rank

        return cls(
            pairs=pairs,
            steps=common,
            steps_only_upstream=sorted(u_steps - p_steps),
            steps_only_port=sorted(p_steps - u_steps),
            u_step=u_step,
            p_step=p_step,
            u_pair=u_pair,
            p_pair=p_pair,
            labels=list(labels),
            u_label=u_label,
            p_label=p_label,
            mu=u_rows[u_hit_at],
            mp=p_rows[hit],
            m_pos=p_rank[hit],
            only_p=p_rows[only_p_mask],
            only_p_pos=p_rank[only_p_mask],
            only_u=u_rows[only_u_mask],
            only_u_pos=u_pos[only_u_mask],
            one_sided_modules=int(one_sided),
            p_module_input=p_module_input,
            p_grouped=_grouped(port, alignment),
            upstream=upstream,
            port=port,
            batching=batching,
        )




def _pair_tables(
    upstream: Trace, port: Trace, alignment: Alignment
) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """Module index -> pair id on each side (last slot for the ``-1`` "unknown" module).

    A module claimed by two pairs keeps the first: the aligner lists stronger
    evidence first, and a record can only be compared against one counterpart.
    """
    u_index = _first_index(upstream.modules.names)
    p_index = _first_index(port.modules.names)
    u_of = np.full(len(upstream.modules.names) + 1, -1, dtype=np.int64)
    p_of = np.full(len(port.modules.names) + 1, -1, dtype=np.int64)
    pairs: list[tuple[str, str]] = []
    for pair in alignment.pairs:
        ui, pi = u_index.get(pair.upstream), p_index.get(pair.port)
        if ui is None or pi is None or u_of[ui] >= 0 or p_of[pi] >= 0:
            continue
        u_of[ui] = p_of[pi] = len(pairs)
        pairs.append((pair.port, pair.upstream))
    return pairs, u_of, p_of


def _grouped(port: Trace, alignment: Alignment) -> np.ndarray:
    """Per port module (last slot: unknown): whether it belongs to a many-to-one group (aligned, not compared)."""
    members = {name for group in alignment.groups for name in group.port}
    return np.asarray([name in members for name in port.modules.names] + [False], dtype=bool)


def present(values: np.ndarray, size: int) -> np.ndarray:
    """Boolean table: which of ``0..size-1`` occur in ``values`` (linear time, unlike ``np.unique``)."""
    table = np.zeros(size, dtype=bool)
    table[values] = True
    return table


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a small-range integer array (steps), in linear time."""
    if not len(values):
        return values
    low, high = int(values.min()), int(values.max())
    if high - low > 1 << 24:
        return np.unique(values)
    return np.flatnonzero(np.bincount(values - low)) + low


def _first_index(names: list[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)
    return index


def _reconcile_steps(u_step: np.ndarray, p_step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A side recorded without steps (JSONL ``step: null`` -> -1) meets the other's only step.

    FastVideo records ``null`` outside ``trace_step``; tracediff numbers each
    top-level call. When one side has no step at all and the other exactly one,
    they describe the same single forward pass.
    """
    u_set, p_set = set(_distinct(u_step).tolist()), set(_distinct(p_step).tolist())
    if u_set == {-1} and len(p_set) == 1:
        return np.full_like(u_step, p_set.pop()), p_step
    if p_set == {-1} and len(u_set) == 1:
        return u_step, np.full_like(p_step, u_set.pop())
    return u_step, p_step


def _label_map(labels: list[str], vocabulary: dict[str, int]) -> np.ndarray:
    return np.asarray([vocabulary.setdefault(label, len(vocabulary)) for label in labels] or [0], dtype=np.int64)


def _sole_labels(
    u_pair: np.ndarray, u_label: np.ndarray, p_pair: np.ndarray, p_label: np.ndarray, vocabulary: dict[str, int]
) -> np.ndarray:
    """Port labels to match on: a module pair's only output tensor matches whatever each side calls it.

    One implementation returns a tensor (``out``), the other ``(tensor, None)``
    (``out[0]``) or a ``ModelOutput`` holding one tensor (``out.logits``). When
    both modules of a pair produced exactly one distinct output label (and,
    separately, one distinct input label, for the models' own inputs), those are
    the same tensor, so the port's label is read as upstream's. Pairs with
    several tensors on either side keep exact label matching.
    """
    is_input = np.asarray([name.startswith("input") for name in vocabulary] or [False], dtype=bool)
    n_labels = len(is_input)
    out = p_label.copy()
    for kind in (False, True):
        u_sel = is_input[u_label] == kind
        p_sel = is_input[p_label] == kind
        u_combo = np.unique(u_pair[u_sel] * n_labels + u_label[u_sel])
        p_combo = np.unique(p_pair[p_sel] * n_labels + p_label[p_sel])
        u_pairs, u_counts = np.unique(u_combo // n_labels, return_counts=True)
        p_pairs, p_counts = np.unique(p_combo // n_labels, return_counts=True)
        sole = np.intersect1d(u_pairs[u_counts == 1], p_pairs[p_counts == 1])
        if not len(sole):
            continue
        target = np.full(int(max(u_pairs.max(), p_pairs.max())) + 1, -1, dtype=np.int64)
        target[sole] = u_combo[np.isin(u_combo // n_labels, sole)] % n_labels
        rows = np.flatnonzero(p_sel & np.isin(p_pair, sole))
        out[rows] = target[p_pair[rows]]
    return out


def _key(
    pair: np.ndarray,
    step: np.ndarray,
    call: np.ndarray,
    label: np.ndarray,
    n_step: int,
    n_call: int,
    n_label: int,
    n_pair: int,
) -> np.ndarray:
    """One int64 per (pair, step, call, label); mixed-radix, so equal keys mean equal tuples."""
    if n_pair * n_step * n_call * n_label >= 2**62:
        raise DiffError("too many distinct (module, step, call, tensor) combinations to index")
    key = pair.astype(np.int64) * n_step + step
    key = key * n_call + call.astype(np.int64)
    return key * n_label + label


def list_text(values: Iterable[object]) -> str:
    """Up to twelve values for an error message, then how many there are in all."""
    items = [str(v) for v in values]
    if not items:
        return "none"
    return ", ".join(items[:12]) + (f", … ({len(items)} in all)" if len(items) > 12 else "")
