"""A forward on a side stream: the recorded stats are what that stream computed (skipped without CUDA).

Hooks compute moments and samples on whatever stream the forward runs on; the
step is flushed (stacked and copied to the host) from the stream current where
the step ends. Without a dependency between the two, the flush reads the
moments before the side stream has written them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracediff import TraceConfig, attach, open_trace, trace_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("flush_on", ["default-stream", "side-stream"])
def test_forward_on_a_side_stream_records_its_own_stats(tmp_path, flush_on: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).cuda()
    side = torch.cuda.Stream()
    inputs = [torch.randn(64, 512, device="cuda") for _ in range(3)]
    expected: list[list[torch.Tensor]] = []
    config = TraceConfig(stats="sum,min,max,sample")
    with attach(model, config=config, output=tmp_path / "t.h5"), torch.no_grad():
        for step, x in enumerate(inputs):
            outs: list[torch.Tensor] = []
            hooks = [m.register_forward_hook(lambda m, a, o, outs=outs: outs.append(o.detach().clone())) for m in model]
            side.wait_stream(torch.cuda.current_stream())  # the inputs are ready before the side stream reads them
            if flush_on == "default-stream":  # the step ends (and is flushed) on the default stream
                with trace_step(step):
                    with torch.cuda.stream(side):
                        torch.cuda._sleep(200_000_000)  # the side stream is still busy when the step is flushed
                        model(x)
            else:
                with torch.cuda.stream(side), trace_step(step):
                    torch.cuda._sleep(200_000_000)
                    model(x)
            for h in hooks:
                h.remove()
            expected.append(outs)
    torch.cuda.synchronize()
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.complete and trace.steps == [0, 1, 2]
        cols = trace.records.columns
        modules = trace.record_modules()
        for step in range(3):
            for i, name in enumerate(("0", "1", "2")):
                (row,) = np.flatnonzero((modules == name) & (cols["step"] == step))
                want = expected[step][i].to(torch.float64).cpu()
                assert cols["min"][row] == want.min().item() and cols["max"][row] == want.max().item(), (step, name)
                np.testing.assert_allclose(cols["sum"][row], want.sum().item(), rtol=0,
                                           atol=want.abs().sum().item() * 1e-6)
                flat = want.reshape(-1).numpy()
                np.testing.assert_array_equal(trace.sample(row), flat[np.arange(256) * flat.size // 256])
