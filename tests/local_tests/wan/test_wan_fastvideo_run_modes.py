"""FastVideo's Wan DiT as FastVideo runs it: inside a wrapper, with classifier-free guidance, compiled.

Each case traces the real FastVideo port the way a pipeline runs it and checks the
traces still compare cleanly against diffusers' (and that a planted bug is still named).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import wan_bugs
import wan_models
from torch import nn

from tracediff import attach, open_trace, trace_step
from tracediff.config import TraceConfig
from tracediff.pipeline.analyse import analyse
from tracediff.pipeline.runner import trace_model
from tracediff.pipeline.spec import DEFAULT_STATS

PRESET = "fp32"
CONFIG = TraceConfig(stats=DEFAULT_STATS, inputs=True)


class Pipeline(nn.Module):
    """FastVideo-style holder: the pipeline keeps the DiT as ``.model`` and calls ``pipeline.model(...)``."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.model = dit


def _upstream_trace(upstream: nn.Module, inputs, path: Path) -> Path:
    return wan_models.trace_upstream(upstream, inputs, path)


def test_attaching_the_wrapper_records_the_dit_it_calls(upstream, clean_port, inputs, tmp_path) -> None:
    pipeline = Pipeline(clean_port)
    with attach(pipeline, side="port", config=CONFIG, output=tmp_path / "port.h5"):
        with trace_step(0), torch.no_grad():
            wan_models.port_call(pipeline.model, inputs)  # the pipeline calls its DiT, never itself
    with open_trace(tmp_path / "port.h5") as trace:
        names = set(trace.record_modules().tolist())
    assert "model.blocks.0.to_q" in names and "model.proj_out" in names
    analysis = analyse(_upstream_trace(upstream, inputs, tmp_path / "upstream.h5"), tmp_path / "port.h5",
                       tolerance=PRESET)
    assert analysis, analysis.text()
    assert analysis.result.aligned_modules >= 50 and analysis.alignment.suspects == []


def _cfg_inputs(inputs) -> tuple[dict, dict, dict]:
    cond = dict(inputs)
    uncond = {**inputs, "encoder_hidden_states": torch.zeros_like(inputs["encoder_hidden_states"])}
    batched = {key: torch.cat([cond[key], uncond[key]]) for key in cond}
    return cond, uncond, batched


def test_cfg_two_calls_upstream_one_batched_call_in_the_port(upstream, clean_port, inputs, tmp_path,
                                                             monkeypatch) -> None:
    cond, uncond, batched = _cfg_inputs(inputs)

    def upstream_step(model: nn.Module, _: object) -> torch.Tensor:  # cond, then uncond: calls 0 and 1
        return torch.cat([wan_models.upstream_call(model, cond), wan_models.upstream_call(model, uncond)])

    def port_step(model: nn.Module, _: object) -> torch.Tensor:  # both in one batch of 2
        return wan_models.port_call(model, batched)

    for bug in (None, wan_bugs.bug("norm_eps")):
        if bug is not None:
            bug.plant(clean_port, monkeypatch)
        out = tmp_path / (bug.name if bug else "clean")
        trace_model(upstream, side="upstream", steps=[None, None], output=out / "upstream.h5", config=CONFIG,
                    call=upstream_step)
        trace_model(clean_port, side="port", steps=[None, None], output=out / "port.h5", config=CONFIG,
                    call=port_step)
        analysis = analyse(out / "upstream.h5", out / "port.h5", tolerance=PRESET)
        result = analysis.result
        if bug is None:
            assert analysis, analysis.text()
            assert result.steps == [0, 1] and result.counts["missing_in_port"] == 0
            assert result.counts["shape_mismatch"] == 0 and result.aligned_modules >= 50
        else:
            assert result.first_drift is not None and result.first_drift.culprit == bug.expected, analysis.text()


def test_a_dit_compiled_in_place_after_attach_records_what_eager_records(clean_port, inputs, tmp_path) -> None:
    pytest.importorskip("torch._inductor", reason="torch.compile's CPU backend is not available")
    torch.manual_seed(0)
    with attach(clean_port, side="port", config=CONFIG, output=tmp_path / "eager.h5"):
        with trace_step(0), torch.no_grad():
            expected = wan_models.port_call(clean_port, inputs)
    compiled = wan_models.make_port(wan_models.make_upstream(seed=0))
    try:
        with attach(compiled, side="port", config=CONFIG, output=tmp_path / "compiled.h5"):
            compiled.compile(backend="aot_eager")  # FastVideo compiles its DiT in place; aot_eager: fast CPU CI
            with trace_step(0), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                actual = wan_models.port_call(compiled, inputs)
    finally:
        # Compiled code is shared by every instance of the class: later tests that attach to another
        # WanTransformer3DModel would (rightly) be refused until it is gone.
        torch.compiler.reset()
    torch.testing.assert_close(actual, expected)
    with open_trace(tmp_path / "eager.h5") as eager, open_trace(tmp_path / "compiled.h5") as traced:
        key = lambda t: list(zip(t.record_modules().tolist(), t.record_labels().tolist(), strict=True))  # noqa: E731
        assert key(traced) == key(eager)
        np_eager, np_traced = eager.stat("abs_mean"), traced.stat("abs_mean")
        assert float(abs(np_traced - np_eager).max()) <= 1e-5 * float(abs(np_eager).max())
