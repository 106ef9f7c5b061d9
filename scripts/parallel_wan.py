r"""A Wan-shaped DiT split by tensor and sequence parallelism, traced per rank, merged, and diffed with tracediff.

Launch (two GPUs, NCCL)::

    torchrun --nproc-per-node 2 scripts/parallel_wan.py --shape 1.3b --tokens 512 --steps 1 --out /tmp/pw
    torchrun --nproc-per-node 2 scripts/parallel_wan.py --shape 1.3b --tokens 512 --steps 1 --out /tmp/pw-bug \
        --plant-bug 1 --trace-layers '^blocks\.0\.'
    torchrun --nproc-per-node 2 scripts/parallel_wan.py --shape 1.3b --dtype bfloat16 --bench --json bench.json

and on the CPU (gloo)::

    torchrun --nproc-per-node 2 scripts/parallel_wan.py --shape tiny --out /tmp/pw [--plant-bug 1]

The model (one class for both sides; ``world == 1`` is the single-device model):

* ``patch_embedding``, ``blocks.N``, ``norm_out``, ``proj_out``: the residual stream is sequence-parallel, each
  rank holding its slice of the tokens (outputs sharded along dim 1); the model's output is all-gathered.
* ``time_embedding``, ``time_projection``: replicated (adaLN-style modulation, shift/scale/gate per block).
* ``blocks.N.attn`` with ``--attn tp`` (even blocks under the default ``mixed``): the block's tokens are
  all-gathered, ``to_q``/``to_k``/``to_v`` are column-parallel (each rank its heads: sharded along dim 2), ``core``
  attends over all tokens with the rank's heads, ``to_out`` is row-parallel (partial product, in-place
  ``all_reduce``, then the bias: replicated), and the block keeps its own tokens.
* ``blocks.N.attn`` with ``--attn sp`` (odd blocks under ``mixed``): sequence-parallel attention, replicated
  weights, queries of the rank's tokens over all-gathered keys and values.
* ``blocks.N.ffn``: tokens all-gathered, ``up`` column-parallel (sharded along dim 2), ``act``, ``down``
  row-parallel (in-place ``all_reduce``, then the bias), the rank's tokens kept.

Rank 0 creates the full model's weights once (``--seed``), saves them for the reference and broadcasts them;
every rank cuts its shard out of the full state dict. Each rank traces its shard with ``tracediff.attach``
(``OUT/ranks/port-rank<r>.h5``). After a barrier, rank 0 traces the unsharded model on one device in a child
process (``OUT/ref.h5``; a process outside the ``torch.distributed`` run, so its trace is not a rank's), then
runs ``python -m tracediff merge`` and ``python -m tracediff first-drift``, prints what they found and exits
with first-drift's code: 0 no drift, 1 drift (the planted bug is named with its module and rank), 2 error
(torchrun exits 1 for any non-zero rank: ``OUT/result.json`` holds the script's own code and finding).

``--bench``: per rank, the median forward time of an untraced and a traced copy of the shard, alternately
(CUDA-synchronised), printed as a table and written to ``--json``. docs/distributed.md has the figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    # Wan2.1 T2V 1.3B: dim 1536, 30 layers, 12 heads, FFN 8960; 480p 81 frames is 21*30*52 = 32760 tokens
    "1.3b": dict(dim=1536, heads=12, layers=30, ffn=8960, tokens=32760, in_dim=64),
    "tiny": dict(dim=32, heads=4, layers=2, ffn=64, tokens=24, in_dim=16),
}
CHECK_STATS = "abs_mean,sum,min,max,std,sample,full"
BENCH_STATS = "abs_mean,sum,min,max,std"
#: environment variables that make a process a rank of a torchrun job; the reference child runs without them
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")


@dataclass(frozen=True)
class Shape:
    dim: int
    heads: int
    layers: int
    ffn: int
    tokens: int
    in_dim: int
    attn: str  # tp, sp, mixed

    def attn_mode(self, block: int) -> str:
        if self.attn == "mixed":
            return "tp" if block % 2 == 0 else "sp"
        return self.attn


# -- collectives (no-ops on one device) ---------------------------------------------------------------------


class Par:
    """This process's place in the parallel run: ``world == 1`` is the unsharded model."""

    def __init__(self, world: int = 1, rank: int = 0) -> None:
        self.world, self.rank = world, rank

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of ``x`` along ``dim`` (even split)."""
        if self.world == 1:
            return x
        return x.chunk(self.world, dim=dim)[self.rank].contiguous()

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All ranks' slices of ``x`` concatenated along ``dim``."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x)  # in place
        return x


class ColumnParallelLinear(nn.Module):
    """Each rank holds ``out_features / world`` rows of the weight: its output is sharded along the last dim."""

    def __init__(self, in_features: int, out_features: int, par: Par) -> None:
        super().__init__()
        self.par = par
        self.weight = nn.Parameter(torch.empty(out_features // par.world, in_features))
        self.bias = nn.Parameter(torch.empty(out_features // par.world))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Each rank holds ``in_features / world`` columns: partial products are all-reduced in place, then the bias."""

    def __init__(self, in_features: int, out_features: int, par: Par) -> None:
        super().__init__()
        self.par = par
        self.weight = nn.Parameter(torch.empty(out_features, in_features // par.world))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        self.par.all_reduce_(y)
        return y.add_(self.bias)


class Attend(nn.Module):
    """Scaled dot-product attention of ``heads`` heads; queries may be fewer tokens than keys."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, nq, width = q.shape
        split = [t.unflatten(-1, (self.heads, width // self.heads)).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*split)
        return out.transpose(1, 2).reshape(b, nq, width)


class TPSelfAttention(nn.Module):
    """Tokens all-gathered, column-parallel q/k/v (the rank's heads), row-parallel output; keeps the rank's tokens."""

    def __init__(self, dim: int, heads: int, par: Par) -> None:
        super().__init__()
        self.par = par
        self.to_q = ColumnParallelLinear(dim, dim, par)
        self.to_k = ColumnParallelLinear(dim, dim, par)
        self.to_v = ColumnParallelLinear(dim, dim, par)
        self.core = Attend(heads // par.world)
        self.to_out = RowParallelLinear(dim, dim, par)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.par.gather(x)
        out = self.to_out(self.core(self.to_q(x), self.to_k(x), self.to_v(x)))
        return self.par.local(out)


class SPSelfAttention(nn.Module):
    """Sequence-parallel attention: replicated weights, the rank's queries over all-gathered keys and values."""

    def __init__(self, dim: int, heads: int, par: Par) -> None:
        super().__init__()
        self.par = par
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.core = Attend(heads)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.par.gather(self.to_k(x)), self.par.gather(self.to_v(x))
        return self.to_out(self.core(self.to_q(x), k, v))


class TPFeedForward(nn.Module):
    def __init__(self, dim: int, ffn: int, par: Par) -> None:
        super().__init__()
        self.par = par
        self.up = ColumnParallelLinear(dim, ffn, par)
        self.act = nn.GELU(approximate="tanh")
        self.down = RowParallelLinear(ffn, dim, par)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.par.local(self.down(self.act(self.up(self.par.gather(x)))))


class Block(nn.Module):
    """Wan-style block: adaLN modulation (shift, scale, gate) around self-attention and the FFN."""

    def __init__(self, shape: Shape, index: int, par: Par) -> None:
        super().__init__()
        dim = shape.dim
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        attn = TPSelfAttention if shape.attn_mode(index) == "tp" else SPSelfAttention
        self.attn = attn(dim, shape.heads, par)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ffn = TPFeedForward(dim, shape.ffn, par)

    def forward(self, x: torch.Tensor, t_mod: torch.Tensor) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation + t_mod).chunk(6, dim=1)
        x = x + self.attn(self.norm1(x) * (1 + scale) + shift) * gate
        return x + self.ffn(self.norm2(x) * (1 + c_scale) + c_shift) * c_gate


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class WanDiT(nn.Module):
    """The DiT; on ``world`` ranks each holds its shard (names and classes are those of the unsharded model)."""

    def __init__(self, shape: Shape, par: Par | None = None) -> None:
        super().__init__()
        self.shape, self.par = shape, par or Par()
        dim = shape.dim
        self.patch_embedding = nn.Linear(shape.in_dim, dim)
        self.time_embedding = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(shape, i, self.par) for i in range(shape.layers))
        self.head_modulation = nn.Parameter(torch.empty(1, 2, dim))
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, shape.in_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        e = self.time_embedding(sinusoid(t, 256).to(dtype))
        t_mod = self.time_projection(e).unflatten(1, (6, self.shape.dim))
        h = self.patch_embedding(self.par.local(x))
        for block in self.blocks:
            h = block(h, t_mod)
        shift, scale = (self.head_modulation + e[:, None]).chunk(2, dim=1)
        out = self.proj_out(self.norm_out(h) * (1 + scale) + shift)
        return self.par.gather(out)


def init_full(shape: Shape, seed: int) -> WanDiT:
    """The unsharded model with seeded random weights (created once, on rank 0)."""
    torch.manual_seed(seed)
    model = WanDiT(shape)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 2:
                nn.init.normal_(param, std=1.0 / math.sqrt(param.shape[1]))
            else:
                nn.init.normal_(param, std=0.1)
    return model.eval()


def shard_state_dict(model: WanDiT, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut this rank's shard out of the unsharded model's state dict."""
    par, out = model.par, {}
    kinds = {name: type(module) for name, module in model.named_modules()}
    for name, tensor in full.items():
        owner = kinds.get(name.rsplit(".", 1)[0])
        if owner is ColumnParallelLinear:  # rows (output features), weight and bias
            tensor = tensor.chunk(par.world, dim=0)[par.rank]
        elif owner is RowParallelLinear and name.endswith("weight"):  # columns (input features)
            tensor = tensor.chunk(par.world, dim=1)[par.rank]
        out[name] = tensor.contiguous()
    return out


def plant_bug(model: WanDiT, bug: str, block: int) -> str:
    """Plant ``bug`` in this rank's model; returns what was done."""
    target = model.blocks[block]
    with torch.no_grad():
        if bug == "ffn-shard":
            target.ffn.up.weight.mul_(1.5)
            return f"this rank's shard of blocks.{block}.ffn.up.weight scaled by 1.5"
        target.ffn.down.bias.add_(0.5)
        return f"blocks.{block}.ffn.down.bias (added after the all-reduce) shifted by 0.5 on this rank"


def make_inputs(shape: Shape, steps: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(1, shape.tokens, shape.in_dim, generator=gen).to(device=device, dtype=dtype)
    times = torch.linspace(999.0, 0.0, steps + 1)[:-1]
    return x, [torch.full((1,), float(t), device=device) for t in times]


def denoise(model: nn.Module, x: torch.Tensor, times: list[torch.Tensor], *, traced: bool) -> torch.Tensor:
    """A few Euler steps; every side runs the same loop on the same inputs."""
    from tracediff import trace_step

    with torch.no_grad():
        for step, t in enumerate(times):
            if traced:
                with trace_step(step):
                    v = model(x, t)
            else:
                v = model(x, t)
            x = x - v / len(times)
    return x


# -- the run --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny", help="model shape (default tiny)")
    for name in ("dim", "heads", "layers", "ffn", "tokens"):
        parser.add_argument(f"--{name}", type=int, help=f"override the shape's {name}")
    parser.add_argument("--attn", choices=("tp", "sp", "mixed"), default="mixed",
                        help="attention split: tp (column/row-parallel), sp (all-gathered K/V), mixed (even/odd)")
    parser.add_argument("--backend", choices=("nccl", "gloo"),
                        help="default nccl when CUDA has >= 2 devices, else gloo on the CPU")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default cuda for nccl, cpu for gloo")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps traced (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="parallel-wan-out", help="output folder (default ./parallel-wan-out)")
    parser.add_argument("--stats", help=f"traced stats (default {CHECK_STATS}; --bench: {BENCH_STATS})")
    parser.add_argument("--trace-layers", default="", metavar="REGEX", help="traced modules (default: all)")
    parser.add_argument("--inputs", choices=("on", "off"),
                        help="also trace each module's inputs (default on for the check, off for --bench)")
    parser.add_argument("--preset", default="single-block",
                        help="first-drift tolerance preset (default single-block: atol/rtol 1e-4; float32 rounding "
                        "of split reductions over 30 layers exceeds fp32's)")
    parser.add_argument("--plant-bug", type=int, metavar="RANK", help="plant a bug in this rank's shard")
    parser.add_argument("--bug", choices=("ffn-shard", "out-bias"), default="ffn-shard",
                        help="ffn-shard: the rank's slice of ffn.up.weight scaled (a sharded tensor); out-bias: "
                        "ffn.down's bias shifted on the rank (a replicated tensor after the all-reduce)")
    parser.add_argument("--bug-block", type=int, default=0, help="block of the planted bug (default 0)")
    parser.add_argument("--bench", action="store_true", help="measure the tracing overhead per rank instead")
    parser.add_argument("--repeats", type=int, default=10, help="--bench: timed forwards per variant")
    parser.add_argument("--warmup", type=int, default=3, help="--bench: untimed forwards first")
    parser.add_argument("--json", metavar="OUT", help="--bench: write the figures here")
    parser.add_argument("--reference", metavar="WEIGHTS", help=argparse.SUPPRESS)  # the reference child
    args = parser.parse_args(argv)
    dims = {**SHAPES[args.shape]}
    for name in ("dim", "heads", "layers", "ffn", "tokens"):
        if getattr(args, name) is not None:
            dims[name] = getattr(args, name)
    args.model = Shape(**dims, attn=args.attn)
    if args.stats is None:
        args.stats = BENCH_STATS if args.bench else CHECK_STATS
    if args.inputs is None:
        args.inputs = "off" if args.bench else "on"
    if args.backend is None:
        args.backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "gloo"
    if args.device is None:
        args.device = "cuda" if args.backend == "nccl" else "cpu"
    return args


def _device(args: argparse.Namespace, local_rank: int) -> torch.device:
    if args.device == "cpu":
        return torch.device("cpu")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_split(shape: Shape, world: int) -> None:
    for name in ("heads", "ffn", "tokens", "dim"):
        if getattr(shape, name) % world:
            raise SystemExit(f"parallel_wan: {name}={getattr(shape, name)} does not split over {world} ranks")


def _config(args: argparse.Namespace):
    from tracediff import TraceConfig

    return TraceConfig(stats=args.stats, layers=args.trace_layers or None, inputs=args.inputs == "on")


def run_reference(args: argparse.Namespace) -> int:
    """The child process: the unsharded model on one device, traced as the reference side."""
    from tracediff import attach

    device = _device(args, 0)
    dtype = getattr(torch, args.dtype)
    model = WanDiT(args.model)
    model.load_state_dict(torch.load(args.reference, map_location="cpu", weights_only=True))
    model = model.to(device=device, dtype=dtype).eval()
    x, times = make_inputs(args.model, args.steps, device, dtype)
    with attach(model, side="ref", config=_config(args), output=Path(args.out) / "ref.h5", overwrite=True):
        denoise(model, x, times, traced=True)
    return 0


def _broadcast_full(args: argparse.Namespace, rank: int, device: torch.device, *, save: bool) -> dict:
    """Rank 0 creates the weights once (and saves them for the reference); the others receive them."""
    if rank == 0:
        full = init_full(args.model, args.seed).state_dict()
        if save:
            torch.save(full, Path(args.out) / "weights.pt")
    else:
        with torch.device("meta"):
            full = WanDiT(args.model).state_dict()
    out = {}
    for name, tensor in full.items():
        buf = tensor.to(device) if rank == 0 else torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        dist.broadcast(buf, src=0)
        out[name] = buf
    return out


def _sharded_model(args: argparse.Namespace, par: Par, full: dict[str, torch.Tensor], device, dtype) -> WanDiT:
    model = WanDiT(args.model, par)
    model.load_state_dict(shard_state_dict(model, full))
    return model.to(device=device, dtype=dtype).eval()


def _cli(*cli_args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("COLUMNS", "200")
    return subprocess.run([sys.executable, *cli_args], capture_output=True, text=True, env=env)


#: a sharded drift is one rank's when its shard's error is this many times every other shard's
DOMINANT = 10.0


def _finding(report: str) -> dict[str, object] | None:
    """Module and rank of first-drift's headline, or None when it found no drift.

    A rank mismatch names the rank that disagrees. A drift in a sharded tensor carries each shard's rel. L2
    error (when both sides traced ``full``); it is pinned on a rank only when that shard's error dominates the
    others', not when every shard drifts alike (accumulated rounding, or a bug before the split).
    """
    headline = next((line for line in report.splitlines() if line.startswith("first drift:")), None)
    if headline is None:
        return None
    module = re.match(r"first drift: (\S+)", headline).group(1)
    found, shards = None, None
    if "rank mismatch" in headline:
        kind = "rank mismatch (replicated tensor)"
        match = re.search(r"rank (\d+) disagrees", headline)
        found = None if match is None else int(match.group(1))
    elif "sharded over ranks" in headline:
        kind = "drift in a sharded tensor"
        by_shard = re.search(r"by shard: (.*?) \(worst:", headline)
        if by_shard:
            shards = {int(r): float(e) for r, e in re.findall(r"rank (\d+) ([^,\s]+)", by_shard.group(1))}
            worst = max(shards, key=shards.get)
            others = [e for r, e in shards.items() if r != worst]
            if shards[worst] > DOMINANT * max(others, default=0.0):
                found = worst
    else:
        kind = "drift"
    return {"module": module, "rank": found, "kind": kind, "shard_errors": shards, "headline": headline}


def check(args: argparse.Namespace, par: Par, device: torch.device) -> int:
    """Trace every rank's shard, then (rank 0) the reference, merge and first-drift."""
    from tracediff import attach

    out = Path(args.out)
    dtype = getattr(torch, args.dtype)
    full = _broadcast_full(args, par.rank, device, save=True)
    model = _sharded_model(args, par, full, device, dtype)
    del full
    planted = None
    if args.plant_bug == par.rank:
        planted = plant_bug(model, args.bug, args.bug_block)
        print(f"rank {par.rank}: planted bug: {planted}", flush=True)
    x, times = make_inputs(args.model, args.steps, device, dtype)
    groups = {"tp": list(range(par.world)), "sp": list(range(par.world))}
    with attach(model, side="port", config=_config(args), output=out / "ranks" / "port.h5", process_groups=groups,
                overwrite=True):
        denoise(model, x, times, traced=True)
    _sync(device)
    dist.barrier()
    if par.rank != 0:
        return 0
    ref = _cli(str(Path(__file__).resolve()), *sys.argv[1:], "--reference", str(out / "weights.pt"))
    (out / "weights.pt").unlink(missing_ok=True)  # 4.2 GiB at the 1.3b shape
    if ref.returncode != 0:
        print(ref.stdout + ref.stderr, flush=True)
        print("parallel_wan: the reference run failed", flush=True)
        return 2
    merged = out / "merged.h5"
    merged.unlink(missing_ok=True)
    merge = _cli("-m", "tracediff", "merge", str(out / "ranks"), "-o", str(merged), "--like", str(out / "ref.h5"))
    print(f"$ tracediff merge {out / 'ranks'} -o {merged} --like {out / 'ref.h5'}  (exit {merge.returncode})")
    print(merge.stdout + merge.stderr, flush=True)
    if merge.returncode == 2:
        return 2
    diff = _cli("-m", "tracediff", "first-drift", str(out / "ref.h5"), str(merged), "--preset", args.preset)
    print(f"$ tracediff first-drift {out / 'ref.h5'} {merged} --preset {args.preset}  (exit {diff.returncode})")
    print(diff.stdout + diff.stderr, flush=True)
    finding = _finding(diff.stdout)
    if diff.returncode not in (0, 1) or (diff.returncode == 1 and finding is None):
        print("parallel_wan: first-drift failed", flush=True)
        return 2
    summary = {"exit": diff.returncode, "finding": finding, "planted": None}
    if args.plant_bug is not None:
        summary["planted"] = {"rank": args.plant_bug, "bug": args.bug, "block": args.bug_block}
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    if finding is None:
        print("parallel_wan: no drift between the merged ranks and the single-device model", flush=True)
    else:
        rank = f"rank {finding['rank']}"
        if finding["rank"] is None:
            rank = "rank not determined"
            if finding["shard_errors"]:
                rank += f" (every shard drifts alike, rel. L2 error by rank {finding['shard_errors']}: not one " \
                    "rank's shard)"
            elif "sharded" in finding["kind"]:
                rank += " (a shard's error needs the full stat on both sides: add full to --stats, and narrow " \
                    "--trace-layers to keep the traces small)"
        print(f"parallel_wan: found {finding['kind']} at module {finding['module']}, {rank}", flush=True)
    return diff.returncode


def bench(args: argparse.Namespace, par: Par, device: torch.device) -> int:
    """Median forward time per rank, untraced and traced, interleaved; rank 0 prints and writes the table.

    Two copies of the rank's shard with the same weights: one never traced, one attached. Their forwards
    alternate, so a change in the machine's load hits both columns alike. A traced forward is timed with its
    ``trace_step`` (on a GPU the step's end queues the copies and returns; the background writer overlaps the next
    forward); writing the last steps at ``close()`` is timed on its own (``close_ms``).
    """
    from tracediff import attach, trace_step

    dtype = getattr(torch, args.dtype)
    full = _broadcast_full(args, par.rank, device, save=False)
    plain = _sharded_model(args, par, full, device, dtype)
    traced_model = _sharded_model(args, par, full, device, dtype)
    del full
    x, times = make_inputs(args.model, 1, device, dtype)
    t = times[0]

    def timed(step: int | None) -> float:
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            if step is None:
                plain(x, t)
            else:
                with trace_step(step):
                    traced_model(x, t)
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    out = Path(args.out) / "bench"
    handle = attach(traced_model, side="port", config=_config(args), output=out / "port.h5", overwrite=True)
    untraced, traced = [], []
    try:
        for step in range(args.warmup + args.repeats):
            a, b = timed(None), timed(step)
            if step >= args.warmup:
                untraced.append(a)
                traced.append(b)
    finally:
        start = time.perf_counter()
        handle.close()
        close_ms = (time.perf_counter() - start) * 1e3
    mine = {
        "rank": par.rank,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "untraced_ms": statistics.median(untraced),
        "traced_ms": statistics.median(traced),
        "close_ms": close_ms,
        "untraced_all_ms": untraced,
        "traced_all_ms": traced,
    }
    mine["overhead_pct"] = 100.0 * (mine["traced_ms"] / mine["untraced_ms"] - 1.0)
    rows: list[dict] = [None] * par.world  # type: ignore[list-item]
    dist.all_gather_object(rows, mine)
    if par.rank != 0:
        return 0
    print(f"tracing overhead per rank: shape {args.shape} {asdict(args.model)}, {args.dtype}, backend "
          f"{args.backend}, stats {args.stats}, layers {args.trace_layers or 'all'}, inputs {args.inputs}, "
          f"median of {args.repeats} forwards")
    print(f"{'rank':>4}  {'untraced ms':>12}  {'traced ms':>10}  {'overhead':>9}  {'close ms':>9}")
    for row in rows:
        print(f"{row['rank']:>4}  {row['untraced_ms']:>12.2f}  {row['traced_ms']:>10.2f}  "
              f"{row['overhead_pct']:>8.1f}%  {row['close_ms']:>9.1f}")
    if args.json:
        report = {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "torch": str(torch.__version__),
            "shape": args.shape,
            "model": asdict(args.model),
            "dtype": args.dtype,
            "backend": args.backend,
            "world_size": par.world,
            "stats": args.stats,
            "layers": args.trace_layers or None,
            "inputs": args.inputs == "on",
            "repeats": args.repeats,
            "warmup": args.warmup,
            "per_rank": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # both sides compute in true float32
        torch.backends.cudnn.allow_tf32 = False
    if args.reference:
        return run_reference(args)
    if "RANK" not in os.environ:
        raise SystemExit("parallel_wan: launch with torchrun --nproc-per-node 2 scripts/parallel_wan.py ...")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(args, local_rank)
    kwargs = {"device_id": device} if args.backend == "nccl" else {}
    dist.init_process_group(args.backend, **kwargs)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    par = Par(dist.get_world_size(), dist.get_rank())
    try:
        _check_split(args.model, par.world)
        if args.plant_bug is not None and not 0 <= args.plant_bug < par.world:
            raise SystemExit(f"parallel_wan: --plant-bug {args.plant_bug} is not a rank of {par.world}")
        code = bench(args, par, device) if args.bench else check(args, par, device)
    finally:
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
