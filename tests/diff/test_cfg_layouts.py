"""Classifier-free guidance as pipelines run it: two DiT calls per step, or one batched call.

A pipeline either calls the DiT twice per step (conditional, unconditional; batch 1
each: calls 0 and 1 of the step) or once on both concatenated on dim 0 (batch 2).
Same layout on both sides is matched call by call; a port that batches against an
upstream that calls twice (or the other way round) is matched too: the split calls
are combined (moments add, samples are taken at the batched tensor's positions)
and compared against the batched record, never reported as missing calls or shape
mismatches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tracediff import TraceConfig, attach, trace_step
from tracediff.align.aligner import align
from tracediff.diff import DiffResult, diff_traces
from tracediff.pipeline.analyse import analyse
from tracediff.store.load import load_trace

T, D, L, STEPS = 6, 16, 5, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.ctx = nn.Linear(D, D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        c = self.ctx(ctx).mean(dim=1, keepdim=True)
        return h + self.fc2(self.act(self.fc1(self.norm(h) + c)))


class DiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.time = nn.Linear(1, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.time(t)[:, None, :]
        for block in self.blocks:
            h = block(h, ctx)
        return self.head(h)


def _models(bug: bool = False) -> tuple[DiT, DiT]:
    torch.manual_seed(0)
    upstream = DiT().double().eval()
    port = DiT().double().eval()
    port.load_state_dict(upstream.state_dict())
    if bug:
        with torch.no_grad():
            port.blocks[1].fc1.bias += 0.01
    return upstream, port


def _pipeline(model: DiT, path: Path, *, calls: int | str, side: str, stats: str = "sample") -> Path:
    """Denoise STEPS steps with CFG: ``calls`` DiT calls per step of batch 1, or ``"batched"``: one call."""
    torch.manual_seed(1)
    x = torch.randn(1, T, 8, dtype=torch.float64)
    contexts = [torch.randn(1, L, D, dtype=torch.float64) for _ in range(3)]
    config = TraceConfig(stats=f"abs_mean,sum,min,max,std,l2,nan_count,inf_count,{stats}", inputs=True,
                         sample_size=16)
    with attach(model, side=side, config=config, output=path), torch.no_grad():
        for step in range(STEPS):
            t = torch.full((1, 1), float(step), dtype=torch.float64)
            with trace_step(step):
                if calls == "batched":
                    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat(contexts[:2]))
                    cond, uncond = out.chunk(2)
                else:
                    outs = [model(x, t, contexts[i]) for i in range(int(calls))]
                    cond, uncond = outs[0], outs[1]
            x = x + 0.1 * (uncond + 3.0 * (cond - uncond)).mean(dim=-1, keepdim=True)
    return path


def _traces(tmp_path: Path, upstream_calls: int | str, port_calls: int | str, *, bug: bool = False,
            stats: str = "sample") -> tuple[Path, Path]:
    upstream, port = _models(bug)
    return (_pipeline(upstream, tmp_path / "upstream.h5", calls=upstream_calls, side="upstream", stats=stats),
            _pipeline(port, tmp_path / "port.h5", calls=port_calls, side="port", stats=stats))


#: The aligner pairs modules without weights by their first output's values, which a batched call
#: shapes differently: the activations are mapped explicitly.
ACTS = {"pairs": {"blocks.0.act": "blocks.0.act", "blocks.1.act": "blocks.1.act"}}


def _rows_by_step(result: DiffResult) -> dict[int, list]:
    table = result._table
    return {step: [table.row(int(i)) for i in table.step_rows(step)] for step in result.steps}


def _modules(model: DiT) -> set[str]:
    return {name for name, _ in model.named_modules() if name and name != "blocks"}


def _assert_clean(result: DiffResult, text: str, *, batched_rows: bool) -> None:
    assert result, text
    for kind in ("missing_in_port", "missing_in_upstream", "shape_mismatch", "drift"):
        assert result.counts[kind] == 0, text
    assert result.steps == list(range(STEPS))
    modules = _modules(DiT())
    for step, rows in _rows_by_step(result).items():
        outputs = [row for row in rows if row.label == "out"]
        assert {row.port for row in outputs} >= modules, (step, text)
        assert all(row.checked and row.elements == "sample" for row in outputs), text
        if batched_rows:  # one combined comparison per module and tensor: the batched record
            assert all(row.call == 0 and row.port_shape[0] == 2 == row.upstream_shape[0] for row in outputs)
            assert len(outputs) == len({row.port for row in outputs})


def test_same_layout_two_calls_per_step_match_call_by_call(tmp_path: Path) -> None:
    upstream, port = _traces(tmp_path, 2, 2)
    analysis = analyse(upstream, port, mapping=ACTS, tolerance="fp32")
    result = analysis.result
    _assert_clean(result, analysis.text(), batched_rows=False)
    for rows in _rows_by_step(result).values():
        calls = {(row.port, row.call) for row in rows if row.label == "out"}
        assert {(m, c) for m in _modules(DiT()) for c in (0, 1)} <= calls


def test_port_batches_cond_and_uncond_into_one_call(tmp_path: Path) -> None:
    upstream, port = _traces(tmp_path, 2, "batched")
    analysis = analyse(upstream, port, mapping=ACTS, tolerance="fp32")
    _assert_clean(analysis.result, analysis.text(), batched_rows=True)
    inputs = [row for row in analysis.result.rows if row.label.startswith("input")]
    assert inputs and all(row.upstream_shape == row.port_shape for row in inputs), analysis.text()


def test_upstream_batches_and_the_port_calls_twice(tmp_path: Path) -> None:
    upstream, port = _traces(tmp_path, "batched", 2)
    analysis = analyse(upstream, port, mapping=ACTS, tolerance="fp32")
    _assert_clean(analysis.result, analysis.text(), batched_rows=True)


def test_full_tensors_are_concatenated(tmp_path: Path) -> None:
    upstream, port = _traces(tmp_path, 2, "batched", stats="full")
    analysis = analyse(upstream, port, mapping=ACTS, tolerance="fp32")
    assert analysis and analysis.result.counts["missing_in_port"] == 0, analysis.text()
    outputs = [row for row in analysis.result.rows if row.label == "out"]
    assert outputs and all(row.elements == "full" for row in outputs)


def test_a_bug_in_the_batching_port_is_found_at_its_module(tmp_path: Path) -> None:
    upstream, port = _traces(tmp_path, 2, "batched", bug=True)
    analysis = analyse(upstream, port, mapping=ACTS, tolerance="fp32")
    first = analysis.result.first_drift
    assert first is not None and first.kind == "drift", analysis.text()
    assert first.step == 0 and first.port == "blocks.1.fc1" and first.label == "out", analysis.text()
    assert first.row.elements == "sample" and first.row.port_shape == (2, T, 2 * D)
    counts = analysis.result.counts
    assert counts["missing_in_port"] == counts["shape_mismatch"] == 0


def test_a_bug_in_the_splitting_port_is_found_at_its_module(tmp_path: Path) -> None:
    upstream, port = _traces(tmp_path, "batched", 2, bug=True)
    analysis = analyse(upstream, port, mapping=ACTS, tolerance="fp32")
    first = analysis.result.first_drift
    assert first is not None and first.kind == "drift", analysis.text()
    assert first.step == 0 and first.port == "blocks.1.fc1" and first.label == "out", analysis.text()
    # The combined comparison sits where the port's last split call was recorded (the unconditional one).
    with load_trace(tmp_path / "port.h5") as port:
        cols = port.records.columns
        fc1 = port.modules.names.index("blocks.1.fc1")
        out = port.records.labels.index("out")
        last = cols["seq"][(cols["module"] == fc1) & (cols["step"] == 0) & (cols["label"] == out)].max()
    assert analysis.result.port_trace.records.columns["seq"][first.port_record] == last


def test_calls_that_do_not_add_up_are_one_sided_and_say_why(tmp_path: Path) -> None:
    upstream, port = _traces(tmp_path, 3, "batched")
    analysis = analyse(upstream, port, mapping=ACTS, tolerance="fp32")
    result = analysis.result
    assert result.counts["missing_in_port"] > 0, analysis.text()
    messages = [finding.message for finding in result.findings if finding.kind == "missing_in_port"]
    assert messages and all("the port batches 3 calls into one" in message for message in messages), messages
    # (1, ...) against (2, ...) is compared as a broadcast; its drift says the same
    assert "the port batches 3 calls into one" in result.first_drift.message, analysis.text()


def _jsonl(path: Path, tensors: list[tuple[str, int, torch.Tensor]]) -> Path:
    lines = []
    for module, step, x in tensors:
        lines.append({
            "module": module, "tensor": "out", "step": step, "shape": list(x.shape),
            "abs_mean": x.abs().mean().item(), "mean": x.mean().item(), "sum": x.sum().item(),
            "min": x.min().item(), "max": x.max().item(), "std": x.std().item(),
        })
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_fastvideo_jsonl_stats_combine(tmp_path: Path) -> None:
    torch.manual_seed(0)
    names = ["embed", "blocks.0", "blocks.1", "head"]
    values = {(name, step): torch.randn(2, 4, 8, dtype=torch.float64) * (i + 1) + i
              for i, name in enumerate(names) for step in range(2)}
    split = [(name, step, values[name, step][k : k + 1]) for step in range(2) for name in names for k in range(2)]
    batched = [(name, step, values[name, step]) for step in range(2) for name in names]
    shifted = [(name, step, x + (0.01 if name == "blocks.1" else 0.0)) for name, step, x in batched]
    mapping = {"pairs": {name: name for name in names}}  # JSONL modules pair by values: one tensor is twice as long
    for ref, port in ((split, batched), (batched, split)):
        up_path, port_path = _jsonl(tmp_path / "up.jsonl", ref), _jsonl(tmp_path / "port.jsonl", port)
        with load_trace(up_path) as up, load_trace(port_path) as pt:
            result = diff_traces(up, pt, align(up, pt, mapping=mapping))
        assert result and result.compared == len(names) * 2, result.findings
        assert result.counts["missing_in_port"] == result.counts["missing_in_upstream"] == 0
        assert all(row.stat_drift.keys() >= {"abs_mean", "mean", "sum", "min", "max", "std"} for row in result.rows)
    up_path, port_path = _jsonl(tmp_path / "up.jsonl", split), _jsonl(tmp_path / "port.jsonl", shifted)
    with load_trace(up_path) as up, load_trace(port_path) as pt:
        result = diff_traces(up, pt, align(up, pt, mapping=mapping))
    assert result.first_drift is not None and result.first_drift.port == "blocks.1", result.findings
