"""A script whose model raises in one call, caught by the script; then it SIGKILLs itself.

``python raising_run.py OUT MODE``: MODE ``attach`` traces with ``attach`` in
implicit-step mode (no ``trace_step``) into OUT; ``script`` only runs the
model (the test runs it under ``tracediff.pipeline.script``). With ``OK`` as a
third argument, call 2 does not raise (the reference run) and the process exits
normally. Calls 0..5; call 2 raises half-way through the forward.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn


class Flaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(torch.tanh(self.embed(x)))
        if float(x[0, 0]) > 100:
            raise RuntimeError("the port's own bug")
        return self.head(h)


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    reference = sys.argv[3:] == ["OK"]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = Flaky()
    xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    if not reference:
        xs[2][0, 0] = 1000.0
    handle = None
    if mode == "attach":
        from tracediff import TraceConfig, attach

        handle = attach(net, side="port", config=TraceConfig(stats="sum,sample", inputs=True), output=out)
    with torch.no_grad():
        for x in xs:
            try:
                net(x)
            except RuntimeError:
                print("call raised", flush=True)
    if reference:
        if handle is not None:
            handle.close()
        return
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
