"""A small model and its tensor-/sequence-parallel version, for the distributed tests.

``Net`` is the unsharded reference. ``TPNet`` is the same model split over the
ranks of a ``torch.distributed`` group, Megatron-style, with the same module
names:

* ``blocks.N.up``: column-parallel linear (each rank holds a slice of the output
  features; its output is sharded along the last dimension). Block 0 splits 16
  features evenly (8/8: equal shapes on both ranks, so the merge needs the
  unsharded trace to see the sharding); block 1 splits 10 unevenly (6/4).
* ``blocks.N.down``: row-parallel linear (each rank holds a slice of the input
  features; partial products are all-reduced, then the replicated bias is added).
* ``tokens``: sequence parallel: each rank runs it on its slice of the sequence
  (output sharded along dim 1), then the slices are all-gathered.
* ``embed``, ``blocks.N.norm``, ``head``: replicated.

Run as a script, it is one rank of a run (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` set as ``torchrun`` sets them): it traces two
steps of ``TPNet`` with :func:`tracediff.attach` into ``OUT/<variant>/tp.h5``
(the recorder makes it ``tp-rank<r>.h5``) for each variant given.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DIM, SEQ, BATCH, IN = 8, 6, 2, 4
HIDDEN = (16, 10)
#: how block 1's 10 hidden features split over 2 ranks (uneven on purpose)
UNEVEN = (6, 4)
STATS = "abs_mean,sum,min,max,std,sample,full"
SAMPLE_SIZE = 50
STEPS = 2


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


class Net(nn.Module):
    """The unsharded reference."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, DIM)
        self.blocks = nn.ModuleList(Block(DIM, h) for h in HIDDEN)
        self.tokens = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        x = x + self.tokens(x)
        return self.head(x)


def reference_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def inputs(step: int) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, IN, generator=torch.Generator().manual_seed(100 + step))


def split(size: int, world: int, rank: int) -> slice:
    """This rank's slice of ``size`` features (block 1's 10 features split 6/4 over 2 ranks)."""
    sizes = list(UNEVEN) if size == HIDDEN[1] and world == len(UNEVEN) else [size // world] * world
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


class ColumnParallelLinear(nn.Module):
    def __init__(self, full: nn.Linear, part: slice) -> None:
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach()[part].clone())
        self.bias = nn.Parameter(full.bias.detach()[part].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, full: nn.Linear, part: slice) -> None:
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach()[:, part].clone())
        self.bias = nn.Parameter(full.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        torch.distributed.all_reduce(y)
        return y + self.bias


class TPBlock(nn.Module):
    def __init__(self, full: Block, world: int, rank: int) -> None:
        super().__init__()
        part = split(full.up.out_features, world, rank)
        self.norm = full.norm
        self.up = ColumnParallelLinear(full.up, part)
        self.act = nn.GELU()
        self.down = RowParallelLinear(full.down, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


class TPNet(nn.Module):
    def __init__(self, full: Net, world: int, rank: int) -> None:
        super().__init__()
        self.world, self.rank = world, rank
        self.embed = full.embed
        self.blocks = nn.ModuleList(TPBlock(b, world, rank) for b in full.blocks)
        self.tokens = full.tokens
        self.head = full.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        mine = self.tokens(x.chunk(self.world, dim=1)[self.rank].contiguous())
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(parts, mine)
        x = x + torch.cat(parts, dim=1)
        return self.head(x)


def plant(model: TPNet, variant: str) -> None:
    """The planted bugs, on rank 1 only."""
    if model.rank != 1:
        return
    with torch.no_grad():
        if variant == "bug_replicated":  # rank 1 adds a different bias after the all-reduce
            model.blocks[0].down.bias.add_(0.5)
        elif variant == "bug_shard":  # rank 1's shard of the column-parallel weight is scaled
            model.blocks[0].up.weight.mul_(1.5)


def run_steps(model: nn.Module) -> None:
    from tracediff import trace_step

    with torch.no_grad():
        for step in range(STEPS):
            with trace_step(step):
                model(inputs(step))


def main() -> None:
    from tracediff import TraceConfig, attach

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(1)
    config = TraceConfig(stats=STATS, sample_size=SAMPLE_SIZE)
    try:
        for variant in args.variants:
            model = TPNet(reference_net(), world, rank).eval()
            plant(model, variant)
            out = Path(args.out) / variant / "tp.h5"
            out.parent.mkdir(parents=True, exist_ok=True)
            with attach(model, side="port", config=config, output=out, process_groups={"tp": list(range(world))}):
                run_steps(model)
    finally:
        torch.distributed.destroy_process_group()
    print(f"rank {rank} of {world} done (pid {os.getpid()})")


if __name__ == "__main__":
    main()
