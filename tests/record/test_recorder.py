"""The recorder: which records it writes, with which values, and that off means off."""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import TinyNet
from tracediff import TraceConfig, attach, open_trace, trace_step


def _all_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_env_traced_blocks_exact_records_and_values(tiny_net, tmp_path, monkeypatch) -> None:
    """The issue's acceptance test: blocks only, three stats, steps 0 and 2 of 3."""
    out = tmp_path / "port.h5"
    monkeypatch.setenv("FASTVIDEO_TRACE_ACTIVATIONS", "1")
    monkeypatch.setenv("FASTVIDEO_TRACE_LAYERS", r"^blocks\.\d+$")
    monkeypatch.setenv("FASTVIDEO_TRACE_STATS", "abs_mean,max,shape")
    monkeypatch.setenv("FASTVIDEO_TRACE_STEPS", "0,2")
    monkeypatch.setenv("FASTVIDEO_TRACE_OUTPUT", str(out))

    # Independent reference: our own plain hooks, computing in float64 on the host.
    expected: list[tuple[int, str, str, tuple[int, ...], float, float]] = []
    step_box = [0]

    def reference_hook(name: str):
        def hook(module, args, output):
            if step_box[0] in (0, 2):
                value = output.detach().double()
                expected.append((step_box[0], name, "out", tuple(output.shape), value.abs().mean().item(),
                                 value.max().item()))
        return hook

    inputs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with attach(tiny_net, side="port") as handle:
        assert handle.path == out
        for step, x in enumerate(inputs):
            with trace_step(step):
                tiny_net(x)
    refs = [b.register_forward_hook(reference_hook(f"blocks.{i}")) for i, b in enumerate(tiny_net.blocks)]
    for step, x in enumerate(inputs):
        step_box[0] = step
        tiny_net(x)
    for ref in refs:
        ref.remove()

    with open_trace(out) as trace:
        assert trace.side == "port"
        assert trace.complete
        assert trace.steps == [0, 2]
        assert trace.config["stats"] == ["abs_mean", "max", "shape"]
        modules = trace.record_modules()
        labels = trace.record_labels()
        got = [
            (int(trace.records.columns["step"][i]), modules[i], labels[i], trace.records.shape_of(i))
            for i in range(len(trace.records))
        ]
        # Per step: the model's input, the three blocks in execution order, the model's output.
        per_step = lambda s: [(s, "", "input[0]", (5, 4))] + [  # noqa: E731
            (s, f"blocks.{i}", "out", (5, 8)) for i in range(3)
        ] + [(s, "", "out", (5, 2))]
        assert got == per_step(0) + per_step(2)
        assert np.array_equal(trace.records.columns["seq"], np.arange(10))
        block_rows = [i for i in range(len(got)) if got[i][1].startswith("blocks.")]
        abs_mean = trace.stat("abs_mean")[block_rows]
        maximum = trace.stat("max")[block_rows]
    assert [e[:4] for e in expected] == [(g[0], g[1], g[2], g[3]) for g in (got[i] for i in block_rows)]
    np.testing.assert_allclose(abs_mean, [e[4] for e in expected], rtol=1e-12)
    np.testing.assert_allclose(maximum, [e[5] for e in expected], rtol=0)


@pytest.mark.parametrize("switch", [None, "0", ""])
def test_off_switch_registers_no_hook(tiny_net, tmp_path, monkeypatch, switch) -> None:
    if switch is not None:
        monkeypatch.setenv("FASTVIDEO_TRACE_ACTIVATIONS", switch)
    monkeypatch.setenv("FASTVIDEO_TRACE_OUTPUT", str(tmp_path / "t.h5"))
    before = _all_hooks(tiny_net)
    handle = attach(tiny_net)
    assert _all_hooks(tiny_net) == before == 0
    assert not handle.enabled and handle.path is None and handle.hook_count == 0
    tiny_net(torch.randn(2, 4))
    handle.close()
    assert list(tmp_path.iterdir()) == []


def test_handle_removes_only_its_hooks_and_close_is_idempotent(tiny_net, tmp_path) -> None:
    own = tiny_net.head.register_forward_hook(lambda *a: None)
    handle = attach(tiny_net, config=TraceConfig(), output=tmp_path / "t.h5")
    assert _all_hooks(tiny_net) > 1
    handle.close()
    handle.close()
    assert _all_hooks(tiny_net) == 1
    own.remove()


def test_each_top_level_call_is_a_step_without_trace_step(tiny_net, tmp_path) -> None:
    with attach(tiny_net, config=TraceConfig(layers=r"^head$"), output=tmp_path / "t.h5"):
        for _ in range(4):
            tiny_net(torch.randn(2, 4))
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0, 1, 2, 3]
        head = trace.record_modules() == "head"
        assert trace.records.columns["step"][head].tolist() == [0, 1, 2, 3]
        assert trace.records.columns["call"][head].tolist() == [0, 0, 0, 0]


class _Shared(nn.Module):
    """One module called twice per forward (weight sharing, CFG batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)

    def forward(self, x):
        return self.shared(self.shared(x))


def test_repeated_calls_keep_call_index(tmp_path) -> None:
    model = _Shared()
    with attach(model, config=TraceConfig(layers="shared"), output=tmp_path / "t.h5"):
        with trace_step(0):
            model(torch.ones(1, 3))
            model(torch.ones(1, 3))  # a second (CFG) batch inside the same step
    with open_trace(tmp_path / "t.h5") as trace:
        shared = trace.record_modules() == "shared"
        assert trace.records.columns["call"][shared].tolist() == [0, 1, 2, 3]
        assert trace.records.columns["step"][shared].tolist() == [0, 0, 0, 0]


Pair = collections.namedtuple("Pair", "left right")


@dataclasses.dataclass
class Output:
    sample: torch.Tensor
    extra: list
    note: str = "not a tensor"


class ModelOutput(collections.OrderedDict):
    """Shaped like transformers' ModelOutput: an ordered dict of tensors."""


class _Nested(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        y = self.lin(x)
        if self.kind == "tuple":
            return y, (y * 2, None)
        if self.kind == "dict":
            return {"a": y, "b": [y, 3]}
        if self.kind == "dataclass":
            return Output(sample=y, extra=[y + 1])
        if self.kind == "namedtuple":
            return Pair(y, -y)
        return ModelOutput(last_hidden_state=y, pooler_output=y.mean(0))


@pytest.mark.parametrize(
    ("kind", "labels"),
    [
        ("tuple", ["out[0]", "out[1][0]"]),
        ("dict", ["out.a", "out.b[0]"]),
        ("dataclass", ["out.sample", "out.extra[0]"]),
        ("namedtuple", ["out[0]", "out[1]"]),
        ("modeloutput", ["out.last_hidden_state", "out.pooler_output"]),
    ],
)
def test_nested_outputs_get_stable_labels(tmp_path, kind, labels) -> None:
    model = _Nested(kind)
    with attach(model, config=TraceConfig(layers="lin"), output=tmp_path / "t.h5"):
        model(torch.ones(2, 2))
    with open_trace(tmp_path / "t.h5") as trace:
        root = trace.record_modules() == ""
        assert trace.record_labels()[root][1:].tolist() == labels


class _Emit(nn.Module):
    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.tensor = tensor
        self.inner = nn.Identity()

    def forward(self):
        return self.inner(self.tensor)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),
        torch.tensor([1.5, -2.0, 3.25], dtype=torch.float16),
        torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32),
        torch.tensor([1.5, -2.0, 3.25], dtype=torch.float64),
        torch.tensor([3 + 4j, -1 + 0j], dtype=torch.complex64),
        torch.tensor([1, -7, 3], dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.tensor(2.5),
        torch.zeros(0, 3),
        torch.tensor([1.0, float("nan"), float("inf")]),
    ],
    ids=["bf16", "fp16", "fp32", "fp64", "complex", "int", "bool", "0dim", "empty", "nonfinite"],
)
def test_every_dtype_gives_well_defined_values(tmp_path, tensor) -> None:
    model = _Emit(tensor)
    config = TraceConfig(layers="inner", stats="abs_mean,sum,min,max,mean,std,l2,nan_count,inf_count,sample,full")
    with attach(model, config=config, output=tmp_path / "t.h5") as handle:
        result = model()
    assert handle.failures == {}
    assert result is tensor
    values = tensor.abs() if tensor.is_complex() else tensor
    reference = values.double().reshape(-1)
    with open_trace(tmp_path / "t.h5") as trace:
        (row,) = np.flatnonzero(trace.record_modules() == "inner")
        assert trace.records.shape_of(row) == tuple(tensor.shape)
        assert trace.records.dtype_of(row) == str(tensor.dtype).replace("torch.", "")
        finite = reference[torch.isfinite(reference)]
        assert trace.stat("nan_count")[row] == int(torch.isnan(reference).sum())
        assert trace.stat("inf_count")[row] == int(torch.isinf(reference).sum())
        if reference.numel() == 0:
            assert trace.stat("sum")[row] == 0 and math.isnan(trace.stat("max")[row])
            assert trace.full(row).shape == (0, 3)
            return
        if finite.numel() == reference.numel():
            assert trace.stat("sum")[row] == pytest.approx(reference.sum().item())
            assert trace.stat("abs_mean")[row] == pytest.approx(reference.abs().mean().item())
            assert trace.stat("l2")[row] == pytest.approx(reference.norm().item())
            if reference.numel() > 1:
                assert trace.stat("std")[row] == pytest.approx(reference.std().item())
        assert trace.stat("max")[row] == pytest.approx(reference.max().item(), nan_ok=True)
        np.testing.assert_allclose(trace.sample(row), reference.numpy(), rtol=1e-6)
        np.testing.assert_allclose(trace.full(row), values.double().numpy(), rtol=1e-6)


def test_sample_positions_are_deterministic_and_spread(tmp_path) -> None:
    big = torch.arange(1000, dtype=torch.float32).reshape(10, 100).t()  # non-contiguous on purpose
    model = _Emit(big)
    with attach(model, config=TraceConfig(layers="inner", stats="sample", sample_size=8), output=tmp_path / "t.h5"):
        model()
    with open_trace(tmp_path / "t.h5") as trace:
        (row,) = np.flatnonzero(trace.record_modules() == "inner")
        flat = big.reshape(-1).numpy()
        np.testing.assert_array_equal(trace.sample(row), flat[np.arange(8) * 1000 // 8])


@pytest.mark.filterwarnings("ignore:tracediff. recording '<model>' failed")
def test_failing_hook_warns_once_and_model_runs_on(tiny_net, tmp_path, monkeypatch) -> None:
    import tracediff.hooks.recorder as recorder

    def broken(tensor):
        raise RuntimeError("exotic tensor")

    monkeypatch.setattr(recorder, "moments", broken)
    x = torch.randn(3, 4)
    expected = tiny_net(x)
    with pytest.warns(RuntimeWarning, match=r"recording 'blocks\.0' failed"):
        with attach(tiny_net, config=TraceConfig(layers=r"^blocks\.0$"), output=tmp_path / "t.h5") as handle:
            first = tiny_net(x)
            second = tiny_net(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert set(handle.failures) == {"<model>", "blocks.0"}


def test_traced_output_is_bit_identical(tmp_path) -> None:
    torch.manual_seed(1)
    model = TinyNet().to(torch.bfloat16)
    x = torch.randn(4, 4, dtype=torch.bfloat16)
    expected = model(x)
    config = TraceConfig(stats="abs_mean,sum,min,max,std,sample,full")
    with attach(model, config=config, output=tmp_path / "t.h5"):
        traced = model(x)
    assert torch.equal(traced, expected)


def test_module_table_fingerprints_parameters(tiny_net, tmp_path) -> None:
    with attach(tiny_net, config=TraceConfig(), output=tmp_path / "t.h5"):
        tiny_net(torch.randn(1, 4))
    with open_trace(tmp_path / "t.h5") as trace:
        table = trace.modules
        assert table.names == [name for name, _ in tiny_net.named_modules()]
        assert table.classes[0].endswith("TinyNet")
        index = [i for i, p in enumerate(table.params) if table.names[p.module_index] == "embed" and p.name == "weight"]
        (row,) = index
        weight = tiny_net.embed.weight.detach().double()
        assert table.params[row].shape == (8, 4)
        assert table.param_moments[row, 0] == pytest.approx(weight.sum().item())
        assert table.param_moments[row, 2] == pytest.approx((weight**2).sum().item())
        np.testing.assert_allclose(table.param_samples[row], weight.reshape(-1).numpy()[np.arange(32) * 32 // 32])
        np.testing.assert_allclose(table.param_samples_t[row], weight.t().reshape(-1).numpy())
