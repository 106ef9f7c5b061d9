"""Tracing under ``torch.compile``: same records as eager, or one clear refusal.

Compiled with inductor on the CPU (it needs a C compiler); the models are tiny so that a
compile takes seconds even on two cores. See docs/trace-format.md, "torch.compile".
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import TinyNet
from tracediff import TraceConfig, attach, open_trace, trace_step
from tracediff.errors import TraceConfigError

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler"
)

BACKEND = "inductor"
CONFIG = TraceConfig(stats="abs_mean,mean,std,min,max,shape", inputs=True)
INPUTS = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def _run(model, steps=INPUTS) -> None:
    with torch.no_grad():
        for step, x in enumerate(steps):
            with trace_step(step):
                model(x)


def _records(path):
    with open_trace(path) as trace:
        keys = list(zip(trace.records.columns["step"].tolist(), trace.record_modules().tolist(),
                        trace.record_labels().tolist(), trace.records.columns["call"].tolist(), strict=True))
        stats = {name: trace.stat(name) for name in ("abs_mean", "mean", "std", "min", "max")}
    return keys, stats


@pytest.fixture
def eager_trace(tmp_path):
    model = _model()
    with attach(model, config=CONFIG, output=tmp_path / "eager.h5"):
        _run(model)
    return _records(tmp_path / "eager.h5")


def _wrapper(model, path):
    compiled = torch.compile(model, backend=BACKEND)
    return compiled, attach(compiled, config=CONFIG, output=path)


def _compile_after_attach(model, path):
    handle = attach(model, config=CONFIG, output=path)
    return torch.compile(model, backend=BACKEND), handle


def _inplace_before(model, path):
    model.compile(backend=BACKEND)
    return model, attach(model, config=CONFIG, output=path)


def _inplace_after(model, path):
    handle = attach(model, config=CONFIG, output=path)
    model.compile(backend=BACKEND)
    return model, handle


def _blocks_inplace(model, path):
    for block in model.blocks:
        block.compile(backend=BACKEND)
    return model, attach(model, config=CONFIG, output=path)


@pytest.mark.parametrize(
    "setup", [_wrapper, _compile_after_attach, _inplace_before, _inplace_after, _blocks_inplace],
    ids=["attach(torch.compile(m))", "compile-after-attach", "m.compile()-then-attach", "attach-then-m.compile()",
         "blocks-compiled-in-place"],
)
def test_compiled_model_records_equal_eager(setup, eager_trace, tmp_path) -> None:
    model, handle = setup(_model(), tmp_path / "compiled.h5")
    with handle:
        _run(model)
    assert not handle.failures
    keys, stats = _records(tmp_path / "compiled.h5")
    eager_keys, eager_stats = eager_trace
    assert keys == eager_keys  # same modules (no "_orig_mod."), labels, steps and calls, in the same order
    for name in ("abs_mean", "std", "min", "max"):
        np.testing.assert_allclose(stats[name], eager_stats[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # a mean near zero has no relative precision: compare it on the scale of the values
    np.testing.assert_allclose(stats["mean"], eager_stats["mean"], rtol=0, atol=1e-6 * eager_stats["abs_mean"].max())


def test_hooks_compiled_in_go_away_with_close(tmp_path) -> None:
    model = _model()
    compiled, handle = _compile_after_attach(model, tmp_path / "t.h5")
    with handle:
        _run(compiled, INPUTS[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook may run on the closed recorder
        with torch.no_grad():
            compiled(INPUTS[1])
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0]


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_model_compiled_and_run_before_attach_is_refused(tmp_path) -> None:
    model = _model()
    compiled = torch.compile(model, backend=BACKEND)
    with torch.no_grad():
        compiled(INPUTS[0])  # compiled without hooks: hooks added now would be skipped
    for target in (compiled, model):
        with pytest.raises(TraceConfigError) as error:
            attach(target, config=CONFIG, output=tmp_path / "t.h5")
        message = _one_line(error)
        assert "already compiled by torch.compile" in message
        assert "attach before the first compiled call" in message and "torch.compiler.reset()" in message
    assert not (tmp_path / "t.h5").exists() or (tmp_path / "t.h5").stat().st_size == 0
    torch.compiler.reset()  # what the message says: then it is traced, correctly
    with attach(compiled, config=CONFIG, output=tmp_path / "t.h5", overwrite=True) as handle:
        _run(compiled, INPUTS[:1])
    assert handle.records_written > 0


def test_compiled_wrapper_as_submodule_is_refused(tmp_path) -> None:
    model = _model()
    model.blocks[1] = torch.compile(model.blocks[1], backend=BACKEND)
    with pytest.raises(TraceConfigError) as error:
        attach(model, config=CONFIG, output=tmp_path / "t.h5")
    message = _one_line(error)
    assert "'blocks.1' is a torch.compile wrapper" in message and ".compile()" in message


def test_compiled_function_skipping_hooks_warns(tmp_path) -> None:
    """Not detectable at attach (only the function's code is compiled): the empty trace warns at close."""
    model = _model()

    @torch.compile(backend=BACKEND)
    def pipeline(x):
        return model(x) * 2

    with torch.no_grad():
        pipeline(INPUTS[0])
    handle = attach(model, config=CONFIG, output=tmp_path / "t.h5")
    with torch.no_grad():
        pipeline(INPUTS[1])
    with pytest.warns(RuntimeWarning, match="no record"):
        handle.close()
