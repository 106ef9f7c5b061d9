"""One rank of the in-place all-reduce test: ``python allreduce_run.py OUT_TEMPLATE`` under RANK/WORLD_SIZE/MASTER_*.

A tensor-parallel-style parent all-reduces its first child's output in place
(no version-counter bump) before the second child consumes it. Prints, as
JSON, the true sum of the second child's input (the all-reduced values).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn


class Parallel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        dist.all_reduce(h)  # in place: h._version is unchanged
        self.seen = float(h.sum())
        return self.b(h)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from tracediff import TraceConfig, attach

    torch.manual_seed(rank)
    net = Parallel()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10 + rank))
    with attach(net, side="port", config=TraceConfig(stats="sum,sample", inputs=True), output=sys.argv[1]) as h:
        with torch.no_grad():
            net(x)
        path = str(h.path)
    print(json.dumps({"rank": rank, "path": path, "b_input_sum": net.seen}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
