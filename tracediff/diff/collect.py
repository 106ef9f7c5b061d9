"""From checked record pairs to findings: each kind's records in port execution order, the first fatal one."""

from __future__ import annotations

import numpy as np

from tracediff.align.alignment import Suspect
from tracediff.diff.blame import blame_for, last_good
from tracediff.diff.finding import KINDS, Finding
from tracediff.diff.match import list_text, present
from tracediff.diff.ranks import rank_mismatches, shard_split
from tracediff.diff.result import DiffResult
from tracediff.diff.table import RecordTable
from tracediff.errors import DiffError
from tracediff.store.trace import Trace
from tracediff.tolerance import Tolerance


def collect_findings(
    table: RecordTable, tol: Tolerance, fail_on: frozenset[str], upstream: Trace, port: Trace, suspects: list[Suspect]
) -> DiffResult:
    """The findings in port execution order, the first fatal one, and the :class:`DiffResult` that holds them."""
    m = table.match
    if not len(m.mu):
        raise DiffError(
            f"nothing to compare: no record of the {len(m.pairs)} aligned module pair(s) appears on both sides "
            f"in step(s) {list_text(m.steps)} with the same call and tensor label"
        )
    unchecked = int(np.isnan(table.ratio).sum())
    if unchecked == len(table.ratio):
        raise DiffError(
            "nothing to compare: the traces share no stat (abs_mean, l2, max, ...) and no sample/full elements; "
            f"upstream stats: {list_text(upstream.config.get('stats', []))}; "
            f"port stats: {list_text(port.config.get('stats', []))}"
        )
    code = {kind: i for i, kind in enumerate(KINDS)}
    matched = np.arange(len(m.mu))
    sources = [
        (code["missing_in_port"], m.u_step[m.only_u], m.only_u_pos, np.arange(len(m.only_u))),
        (code["missing_in_upstream"], m.p_step[m.only_p], m.only_p_pos, np.arange(len(m.only_p))),
        (code["shape_mismatch"], table.step, m.m_pos, matched[table.shape_mismatch]),
        (code["dtype_mismatch"], table.step, m.m_pos, matched[table.dtype_mismatch]),
        (code["nonfinite"], table.step, m.m_pos, matched[table.nonfinite]),
        (code["rank_mismatch"], table.step, m.m_pos, matched[table.rank_mismatch]),
        (code["drift"], table.step, m.m_pos, matched[table.failed]),
    ]
    kinds, steps, pos, refs = [], [], [], []
    for kind, step_col, pos_col, ref in sources:
        if kind in (code["missing_in_port"], code["missing_in_upstream"]):
            step_sel, pos_sel = step_col, pos_col
        else:
            step_sel, pos_sel = step_col[ref], pos_col[ref]
        kinds.append(np.full(len(ref), kind))
        steps.append(step_sel)
        pos.append(pos_sel)
        refs.append(ref)
    kind_arr, step_arr, pos_arr, ref_arr = (np.concatenate(x) for x in (kinds, steps, pos, refs))
    order = np.lexsort((kind_arr, pos_arr, step_arr))
    kind_arr, step_arr, pos_arr, ref_arr = kind_arr[order], step_arr[order], pos_arr[order], ref_arr[order]
    fatal_codes = np.asarray([code[k] for k in sorted(fail_on)], dtype=np.int64)
    fatal = np.isin(kind_arr, fatal_codes)

    make = _FindingFactory(table, fail_on, suspects)
    firsts = np.unique(step_arr * len(KINDS) + kind_arr, return_index=True)[1] if len(kind_arr) else np.zeros(0, int)
    findings = [make(int(kind_arr[i]), int(ref_arr[i]), float(pos_arr[i])) for i in sorted(firsts.tolist())]
    first_drift = None
    good = None
    fatal_at = np.flatnonzero(fatal)
    if len(fatal_at):
        i = int(fatal_at[0])
        first_drift = make(int(kind_arr[i]), int(ref_arr[i]), float(pos_arr[i]))
        good = last_good(table, int(step_arr[i]), float(pos_arr[i]))
    counts = {kind: int((kind_arr == code[kind]).sum()) for kind in KINDS}
    curve_step = first_drift.step if first_drift is not None else m.steps[0]
    return DiffResult(
        tolerance=tol,
        first_drift=first_drift,
        last_good=good,
        findings=findings,
        counts=counts,
        steps=list(m.steps),
        drifting_steps=sorted(set(step_arr[fatal].tolist())),
        curve_step=curve_step,
        compared=len(m.mu),
        aligned_modules=int(np.count_nonzero(present(m.p_pair[m.mp], max(len(m.pairs), 1)))),
        unchecked=unchecked,
        steps_only_upstream=m.steps_only_upstream,
        steps_only_port=m.steps_only_port,
        one_sided_modules=m.one_sided_modules,
        fail_on=fail_on,
        upstream_path=upstream.path,
        port_path=port.path,
        module_inputs=bool(m.p_module_input.any()),
        unchecked_inputs=int((np.isnan(table.ratio) & m.p_module_input[m.mp]).sum()),
        alignment_suspects=suspects,
        table=table,
    )


class _FindingFactory:
    """Builds the few :class:`Finding` objects a report shows."""

    def __init__(self, table: RecordTable, fail_on: frozenset[str], suspects: list[Suspect]) -> None:
        self.table = table
        self.fail_on = fail_on
        self.suspect_of = {suspect.port: suspect for suspect in suspects}

    def __call__(self, kind_code: int, ref: int, position: float) -> Finding:
        kind = KINDS[kind_code]
        t, m = self.table, self.table.match
        if kind in ("missing_in_port", "missing_in_upstream"):
            upstream_side = kind == "missing_in_port"
            record = int((m.only_u if upstream_side else m.only_p)[ref])
            pair = int((m.u_pair if upstream_side else m.p_pair)[record])
            step = int((m.u_step if upstream_side else m.p_step)[record])
            trace = t.upstream if upstream_side else t.port
            label = m.labels[int((m.u_label if upstream_side else m.p_label)[record])]
            port_name, upstream_name = m.pairs[pair]
            return Finding(
                kind, step, int(trace.records.columns["call"][record]), label, port_name, upstream_name,
                kind in self.fail_on, upstream_record=record if upstream_side else None,
                port_record=None if upstream_side else record, position=position,
                batching=m.batching.get((pair, step)),
            )
        row = t.row(ref)
        blame = blame_for(t, row, position, self.suspect_of)
        cols = t.port.records.columns
        return Finding(
            kind, row.step, row.call, row.label, row.port, row.upstream, kind in self.fail_on,
            row=row, port_record=row.port_record, upstream_record=row.upstream_record, position=position,
            culprit=blame.culprit, culprit_upstream=blame.culprit_upstream, suspects=blame.suspects,
            blame=blame.blame, batching=m.batching.get((int(m.p_pair[row.port_record]), row.step)),
            nan_count=int(cols["nan_count"][row.port_record]) if kind == "nonfinite" else -1,
            inf_count=int(cols["inf_count"][row.port_record]) if kind == "nonfinite" else -1,
            rank_mismatches=rank_mismatches(row, t) if kind == "rank_mismatch" else (),
            shards=shard_split(row, t) if kind == "drift" else None,
        )
