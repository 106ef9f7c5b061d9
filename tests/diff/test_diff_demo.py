"""The differ on the bundled demo pair: each planted bug is named exactly, noise is not.

The upstream (Wan-style names) and the port (diffusers-style names) are two
independent implementations; the port loads upstream's weights through the
real conversion map. Alignment comes from module-name rules written here (so
these tests do not depend on the aligner's heuristics), plus one run through
the real aligner.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import tracediff
from tracediff import TraceConfig
from tracediff.align.alignment import Alignment, Pair
from tracediff.demo import BUGS, make_inputs, make_port, make_upstream
from tracediff.diff import diff_traces
from tracediff.store.trace import Trace

STEPS = 2
MODES = {
    "sample": "abs_mean,sum,min,max,mean,std,l2,nan_count,inf_count,sample",
    "stats": "abs_mean,sum,min,max,mean,std,l2,nan_count,inf_count",
}
PLANTED = ("ln_eps", "gelu_tanh", "residual_scale")

#: upstream name -> port name, for every module whose output both sides compute.
DEMO_RULES = (
    (r"", ""),
    (r"patch_embedding", "patch_embed.proj"),
    (r"blocks\.(\d+)", r"transformer_blocks.\1"),
    (r"blocks\.(\d+)\.norm1", r"transformer_blocks.\1.norm_attn"),
    (r"blocks\.(\d+)\.self_attn", r"transformer_blocks.\1.attn1"),
    (r"blocks\.(\d+)\.self_attn\.o", r"transformer_blocks.\1.attn1.to_out"),
    (r"blocks\.(\d+)\.self_attn\.(norm_q|norm_k)", r"transformer_blocks.\1.attn1.\2"),
    (r"blocks\.(\d+)\.norm3", r"transformer_blocks.\1.norm_cross"),
    (r"blocks\.(\d+)\.cross_attn", r"transformer_blocks.\1.attn2"),
    (r"blocks\.(\d+)\.cross_attn\.(q|k|v)", r"transformer_blocks.\1.attn2.to_\2"),
    (r"blocks\.(\d+)\.cross_attn\.o", r"transformer_blocks.\1.attn2.to_out"),
    (r"blocks\.(\d+)\.cross_attn\.(norm_q|norm_k)", r"transformer_blocks.\1.attn2.\2"),
    (r"blocks\.(\d+)\.norm2", r"transformer_blocks.\1.norm_ffn"),
    (r"blocks\.(\d+)\.ffn", r"transformer_blocks.\1.ffn"),
    (r"blocks\.(\d+)\.ffn\.0", r"transformer_blocks.\1.ffn.fc_in"),
    (r"blocks\.(\d+)\.ffn\.1", r"transformer_blocks.\1.ffn.act"),
    (r"blocks\.(\d+)\.ffn\.2", r"transformer_blocks.\1.ffn.fc_out"),
    (r"head\.norm", "final_norm"),
    (r"head\.head", "proj_out"),
)


def demo_alignment(upstream: Trace, port: Trace) -> Alignment:
    """Pair demo modules by :data:`DEMO_RULES` (first rule that fully matches wins)."""
    port_names = set(port.modules.names)
    pairs = []
    for name in upstream.modules.names:
        for pattern, template in DEMO_RULES:
            if re.fullmatch(pattern, name):
                target = re.sub(f"^{pattern}$", template, name) if pattern else ""
                if target in port_names:
                    pairs.append(Pair(name, target, "map", 1.0))
                break
    return Alignment(pairs=pairs)


def trace_model(model: nn.Module, path: Path, *, side: str, stats: str, dtype: torch.dtype = torch.float32) -> Trace:
    """Run ``STEPS`` demo denoising steps; activations in ``dtype``, timesteps always float32."""
    model = model.to(dtype)
    with tracediff.attach(model, side=side, config=TraceConfig(stats=stats), output=path):
        for step in range(STEPS):
            inputs = make_inputs(0, step=step * 20)
            with torch.no_grad():
                model(**{k: v if k == "t" else v.to(dtype) for k, v in inputs.items()})
    return tracediff.open_trace(path)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str | None], Trace]:
    """Upstream and every port variant, per stats mode, traced once for the module."""
    root = tmp_path_factory.mktemp("demo")
    out: dict[tuple[str, str | None], Trace] = {}
    for mode, stats in MODES.items():
        out[(mode, "upstream")] = trace_model(make_upstream(0), root / f"up-{mode}.h5", side="ref", stats=stats)
        for bug in (None, *PLANTED):
            path = root / f"port-{mode}-{bug}.h5"
            out[(mode, bug)] = trace_model(make_port(0, bug=bug), path, side="port", stats=stats)
    yield out
    for trace in out.values():
        trace.close()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bug", PLANTED)
def test_first_drift_names_the_planted_module(traces: dict, mode: str, bug: str) -> None:
    upstream, port = traces[(mode, "upstream")], traces[(mode, bug)]
    result = diff_traces(upstream, port, demo_alignment(upstream, port), tolerance="fp32")
    first = result.first_drift
    assert first is not None, result.findings
    assert first.kind == "drift"
    assert (first.port, first.upstream) == (BUGS[bug].port_module, BUGS[bug].upstream_module)
    assert first.step == 0 and first.call == 0 and first.label == "out"
    assert result.drifting_steps == [0, 1]
    good = result.last_good
    assert good is not None and not good.failed and good.index < result.first_drift_index
    # nothing before the culprit is even close to tolerance: the bug stands far above the noise
    before = result.rows[: result.first_drift_index]
    assert max(r.ratio for r in before) < 0.5
    assert first.row is not None and first.row.ratio > 20


@pytest.mark.parametrize("mode", list(MODES))
def test_clean_pair_has_no_drift(traces: dict, mode: str) -> None:
    upstream, port = traces[(mode, "upstream")], traces[(mode, None)]
    result = diff_traces(upstream, port, demo_alignment(upstream, port), tolerance="fp32")
    assert result, result.first_drift
    assert result.findings == []
    assert result.steps == [0, 1] and result.unchecked == 0
    assert result.compared == len(result.rows) * 2  # same records in both steps


def test_planted_bug_with_the_real_aligner(traces: dict) -> None:
    align = pytest.importorskip("tracediff.align.aligner").align
    upstream, port = traces[("sample", "upstream")], traces[("sample", "ln_eps")]
    result = diff_traces(upstream, port, align(upstream, port))
    assert result.first_drift is not None
    assert (result.first_drift.port, result.first_drift.upstream) == (
        BUGS["ln_eps"].port_module,
        BUGS["ln_eps"].upstream_module,
    )


@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_noise_passes_bf16_preset_and_fails_fp32(tmp_path: Path, traces: dict, mode: str) -> None:
    upstream = traces[(mode, "upstream")]
    bf16 = trace_model(make_upstream(0), tmp_path / "bf16.h5", side="port", stats=MODES[mode], dtype=torch.bfloat16)
    with bf16:
        same_names = Alignment(pairs=[Pair(n, n, "map", 1.0) for n in upstream.modules.names])
        relaxed = diff_traces(upstream, bf16, same_names, tolerance="dit-bf16")
        assert relaxed, relaxed.first_drift
        assert relaxed.counts["dtype_mismatch"] > 0  # reported, not fatal
        assert not any(f.fatal for f in relaxed.findings)
        strict = diff_traces(upstream, bf16, same_names, tolerance="fp32")
        assert not strict
        assert strict.first_drift is not None and strict.first_drift.kind == "drift"
        # the bf16 rounding of the model input is already outside fp32 tolerance
        assert strict.first_drift.port == "" and strict.first_drift.label == "input.x"
