"""Measure what tracing costs a forward pass of a realistically sized video DiT.

The model is the Wan2.1-style DiT of the demo (``tracediff.demo.upstream_dit``)
at the Wan 1.3B shape by default: 30 blocks, hidden 1536, FFN 8960, 12 heads,
a 16x21x60x104 latent (32,760 tokens) and 512 text tokens, in bf16, with
random weights. One run measures, in this order:

* the forward untraced (at the start and again at the end, to show drift);
* ``attach`` with tracing switched off (no hook is registered);
* tracediff stats tracing (``abs_mean,sum,min,max,mean,std``) of the blocks
  (``^blocks\\.\\d+$``) and of every module, plus ``sample`` at every module;
* the same with module inputs recorded too (``inputs=True``, what ``run`` and the
  pytest plugin do by default), at the block and all-modules level;
* the same all-modules trace with the statistics reduced the way tracediff 0.1
  did (float64 PyTorch reductions) and with PyTorch float32 reductions instead
  of the fused kernel, to show what each change is worth;
* a ``full`` trace of two blocks (small enough for the disk to keep up);
* a naive hand-written hook (one ``.float()`` copy and one ``.item()`` per
  statistic per tensor, written as JSON lines), at the block and all-modules
  level;
* the moments of one large activation by each reduction method (micro-benchmark);
* a ``full`` trace of every block for a few steps: sustained throughput to the
  disk against the disk's own sequential write speed, measured in this run.

Each forward is timed with the device synchronised before and after it only;
the figure is the median of ``--repeat`` forwards after ``--warmup`` forwards.
Peak device memory is taken per mode and compared with the untraced forward's.

Usage::

    python scripts/bench_overhead.py                      # CUDA, Wan 1.3B shape
    python scripts/bench_overhead.py --layers 40 --dim 5120 --ffn-dim 13824 --heads 40   # Wan 14B shape
    python scripts/bench_overhead.py --smoke              # CPU, tiny, seconds (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tracediff import TraceConfig, attach, trace_step  # noqa: E402
from tracediff.demo.upstream_dit import WanLikeModel  # noqa: E402
from tracediff.hooks import fused, stats  # noqa: E402
from tracediff.hooks import recorder as recorder_module  # noqa: E402
from tracediff.hooks.flatten import iter_tensors  # noqa: E402

STATS = "abs_mean,sum,min,max,mean,std"
BLOCKS = r"^blocks\.\d+$"
#: A full trace small enough for the disk to keep up: does the GPU then run at full speed?
FULL_TWO_BLOCKS = r"^blocks\.(0|1)$"


# -- the model ------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        model = WanLikeModel(
            in_dim=16, dim=args.dim, ffn_dim=args.ffn_dim, freq_dim=256, text_dim=args.text_dim, out_dim=16,
            num_heads=args.heads, num_layers=args.layers,
        )
    model = model.to_empty(device=args.device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(1.0 + 0.1 * torch.randn_like(param)) if "norm" in name else param.normal_(0, 0.02)
            else:
                param.normal_(0.0, param[0].numel() ** -0.5)
    model = model.to(dtype).eval()
    model.freqs = model.freqs if model.freqs.device.type != "meta" else _freqs(model, args)
    inputs = {
        "x": torch.randn(1, 16, args.frames, args.height, args.width, device=args.device, dtype=dtype),
        "t": torch.tensor([500.0], device=args.device),
        "context": torch.randn(1, args.text_len, args.text_dim, device=args.device, dtype=dtype),
    }
    return model, inputs


def _freqs(model: WanLikeModel, args: argparse.Namespace) -> torch.Tensor:
    from tracediff.demo.upstream_dit import rope_params

    d = args.dim // args.heads
    return torch.cat(
        [rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)), rope_params(1024, 2 * (d // 6))], dim=1
    ).to(args.device)


# -- timing ------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forwards(
    model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, *, warmup: int, repeat: int
) -> dict[str, Any]:
    """Median wall time of ``repeat`` forwards after ``warmup``; sync at the boundaries only."""
    times, enqueue = [], []
    step = 0
    with torch.no_grad():
        for i in range(warmup + repeat):
            sync(args.device)
            t0 = time.perf_counter()
            with trace_step(step):
                model(**inputs)
            t1 = time.perf_counter()
            sync(args.device)
            t2 = time.perf_counter()
            step += 1
            if i >= warmup:
                times.append(t2 - t0)
                enqueue.append(t1 - t0)
    return {"median": statistics.median(times), "times": times, "host": statistics.median(enqueue)}


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, int]]:
    out = {"peak": 0}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield out
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated()


# -- the ways of reducing moments ----------------------------------------------------------------


def moments_v1(tensor: torch.Tensor) -> torch.Tensor:
    """tracediff 0.1's moments: float64 PyTorch reductions (a float64 copy of the tensor per reduction)."""
    values, _ = stats.value_view(tensor)
    if values.numel() == 0:
        return torch.tensor([0.0, 0.0, 0.0, float("nan"), float("nan"), 0.0, 0.0], dtype=torch.float64,
                            device=values.device)
    acc = torch.float64
    low, high = torch.aminmax(values)
    return torch.stack([
        values.sum(dtype=acc),
        torch.linalg.vector_norm(values, 1, dtype=acc),
        torch.linalg.vector_norm(values, 2, dtype=acc).square(),
        low.to(acc),
        high.to(acc),
        torch.isnan(values).sum(dtype=torch.int64).to(acc),
        torch.isinf(values).sum(dtype=torch.int64).to(acc),
    ])


@contextlib.contextmanager
def moments_method(name: str) -> Iterator[None]:
    """Run tracediff with another reduction method: ``fused`` (default), ``torch-f32`` or ``v1-f64``."""
    saved_fn, saved_ok = recorder_module.moments, fused._state["ok"]
    try:
        if name == "v1-f64":
            recorder_module.moments = moments_v1
        elif name == "torch-f32":
            fused._state["ok"] = False
        yield
    finally:
        recorder_module.moments, fused._state["ok"] = saved_fn, saved_ok


#: Kernel shapes tried in the micro-benchmark: (elements per iteration, warps, programs).
FUSED_CONFIGS = ((4096, 8, 1024), (2048, 8, 1024), (2048, 8, 2048), (1024, 4, 2048), (4096, 16, 1024),
                 (2048, 4, 4096))


def _fused_config(block: int, warps: int, programs: int) -> Callable[[torch.Tensor], Any]:
    def run(x: torch.Tensor) -> Any:
        with torch.cuda.device(x.device):
            return fused.launch(x, block=block, warps=warps, programs=programs)

    return run


def micro_moments(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """Moments of single activations of the model's sizes, per method."""
    dtype = getattr(torch, args.dtype)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    for width in (args.dim, args.ffn_dim):
        x = torch.randn(tokens, width, device=args.device, dtype=dtype)
        methods: list[tuple[str, Callable[[torch.Tensor], Any]]] = [
            ("fused", stats.moments), ("torch-f32", stats.moments), ("v1-f64", moments_v1),
        ]
        if fused.supports(x):
            for block, warps, programs in FUSED_CONFIGS:
                methods.append((f"fused {block}/{warps}w/{programs}p", _fused_config(block, warps, programs)))
        for method, fn in methods:
            if method.startswith("fused") and not fused.supports(x):
                continue
            with moments_method(method):
                for _ in range(3):
                    fn(x)
                sync(args.device)
                reps = 10
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn(x)
                sync(args.device)
                seconds = (time.perf_counter() - t0) / reps
            results.append({"shape": f"{tokens}x{width}", "method": method, "ms": seconds * 1e3,
                            "gbps": x.numel() * x.element_size() / seconds / 1e9})
        del x


# -- the naive hook ---------------------------------------------------------------------------------


class NaiveTracer:
    """What a hand-written tracing hook does: per tensor a float copy, per statistic a ``.item()``."""

    def __init__(self, model: nn.Module, path: Path, layers: str | None) -> None:
        import re

        pattern = re.compile(layers) if layers else None
        self.file = path.open("w")
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if name and (pattern is None or pattern.search(name))
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for label, tensor in iter_tensors(output):
                x = tensor.detach().float()
                record = {"name": name, "label": label, "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
                record["abs_mean"] = x.abs().mean().item()
                record["sum"] = x.sum().item()
                record["min"] = x.min().item()
                record["max"] = x.max().item()
                record["mean"] = x.mean().item()
                record["std"] = x.std().item()
                self.file.write(json.dumps(record) + "\n")

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.file.close()


# -- disk ---------------------------------------------------------------------------------------------


def disk_write_speed(folder: Path, nbytes: int) -> float:
    """Sequential write speed (bytes/s) of ``folder``'s disk: 64 MiB writes, then fsync, timed together."""
    block = os.urandom(1 << 20) * 64
    path = folder / "disk-speed.bin"
    written = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while written < nbytes:
            written += os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return written / seconds


def h5_write_speed(folder: Path, nbytes: int, chunk: int) -> float:
    """Append float32 data to a chunked HDF5 dataset the way the trace writer does; bytes/s, fsync included."""
    import h5py
    import numpy as np

    from tracediff.store.writer import WRITE_SLICE

    path = folder / f"h5-speed-{chunk}.h5"
    piece = np.random.default_rng(0).standard_normal(16 << 20, dtype=np.float32)  # 64 MiB
    written = 0
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        data = f.create_dataset("v", shape=(0,), maxshape=(None,), dtype="f4", chunks=(chunk,))
        while written < nbytes:
            start = data.shape[0]
            data.resize((start + piece.size,))
            for lo in range(0, piece.size, WRITE_SLICE):
                data[start + lo : start + lo + WRITE_SLICE] = piece[lo : lo + WRITE_SLICE]
            written += piece.nbytes
        f.flush()
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return written / seconds


def full_trace_throughput(
    model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    """Trace every block's full output for ``--full-steps`` steps; bytes on disk over wall time (fsync included).

    The writer thread's time is split into building the step (waiting for the copies, converting) and
    writing it, per step.
    """
    from tracediff.store import writer as writer_module

    path = folder / "full.h5"
    config = TraceConfig(layers=BLOCKS, stats="full")
    phases: dict[str, list[float]] = {"build": [], "write": []}
    real_finish, real_write = recorder_module._Staged.finish, writer_module.TraceWriter.write_step

    def finish(self: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_finish(self)
        finally:
            phases["build"].append(time.perf_counter() - t)

    def write(self: Any, step: int, batch: Any) -> None:
        t = time.perf_counter()
        try:
            real_write(self, step, batch)
        finally:
            phases["write"].append(time.perf_counter() - t)

    recorder_module._Staged.finish, writer_module.TraceWriter.write_step = finish, write
    try:
        result = _full_trace(model, inputs, args, path, config)
    finally:
        recorder_module._Staged.finish, writer_module.TraceWriter.write_step = real_finish, real_write
    result["writer_build"] = phases["build"][2:]
    result["writer_write"] = phases["write"][2:]
    return result


def _full_trace(
    model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, path: Path, config: TraceConfig
) -> dict[str, Any]:
    with torch.no_grad():
        handle = attach(model, side="port", config=config, output=path)
        for step in (-2, -1):  # warm-up: pinned buffers for two steps in flight get allocated once
            with trace_step(step + 2):
                model(**inputs)
        handle.recorder.drain()
        start_bytes = path.stat().st_size
        sync(args.device)
        forward_times = []
        t0 = time.perf_counter()
        for step in range(2, args.full_steps + 2):
            s0 = time.perf_counter()
            with trace_step(step):
                model(**inputs)
            sync(args.device)
            forward_times.append(time.perf_counter() - s0)
        handle.close()
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        seconds = time.perf_counter() - t0
    written = path.stat().st_size - start_bytes
    path.unlink()
    return {"bytes": written, "seconds": seconds, "rate": written / seconds,
            "forward": statistics.median(forward_times), "forwards": forward_times}


# -- the run -------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    """The flags (profile_overhead.py takes the same)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=30, help="DiT blocks (30: Wan 1.3B, 40: Wan 14B)")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--ffn-dim", type=int, default=8960)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    parser.add_argument("--height", type=int, default=60, help="latent height (60 = 480 px)")
    parser.add_argument("--width", type=int, default=104, help="latent width (104 = 832 px)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--naive-repeat", type=int, default=3, help="timed forwards of the slow modes")
    parser.add_argument("--full-steps", type=int, default=3, help="steps of the full-tensor trace (0 = skip)")
    parser.add_argument("--disk-bytes", type=float, default=8e9, help="bytes written by the disk-speed test")
    parser.add_argument("--workdir", help="folder for trace files (default: a temporary folder)")
    parser.add_argument("--json", help="also write all figures to this JSON file")
    parser.add_argument("--full-only", action="store_true", help="only the full-trace write rate and the disk")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, one repetition (CI)")
    parser.add_argument("--compile", action="store_true",
                        help="only torch.compile: eager and compiled forwards, untraced and traced")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.device, args.dtype = "cpu", "float32"
        args.layers, args.dim, args.ffn_dim, args.heads, args.text_dim, args.text_len = 2, 64, 128, 4, 32, 8
        args.frames, args.height, args.width = 2, 8, 8
        args.warmup, args.repeat, args.naive_repeat, args.full_steps, args.disk_bytes = 1, 1, 1, 1, 1e6
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    model, inputs = build(args)
    tmp = tempfile.mkdtemp(prefix="tracediff-bench-", dir=args.workdir)
    folder = Path(tmp)
    rows: dict[str, dict[str, Any]] = {}

    def measure(name: str, make: Callable[[], Any] | None, repeat: int | None = None,
                method: str = "fused") -> None:
        with peak_memory(args.device) as mem, moments_method(method):
            handle = make() if make is not None else None
            try:
                row = time_forwards(model, inputs, args, warmup=args.warmup, repeat=repeat or args.repeat)
            finally:
                if handle is not None:
                    handle.close()
        row["peak"] = mem["peak"]
        rows[name] = row
        for trace in folder.glob("trace-*.h5"):
            trace.unlink()
        print(f"  {name:<34} {row['median'] * 1e3:9.1f} ms", flush=True)

    def traced(layers: str | None, stats_: str = STATS, inputs: bool = False) -> Callable[[], Any]:
        def make() -> Any:
            out = folder / f"trace-{len(rows)}.h5"
            config = TraceConfig(layers=layers, stats=stats_, inputs=inputs)
            return attach(model, side="port", config=config, output=out)

        return make

    print(f"bench_overhead: {describe(args)}", flush=True)
    if args.full_only:
        return full_only(model, inputs, args, folder)
    if args.compile:
        return compile_only(model, inputs, args, folder)
    measure("untraced", None)
    measure("tracing off (attach, disabled)", lambda: attach(model, config=TraceConfig(enabled=False)))
    measure("tracediff stats, blocks", traced(BLOCKS))
    measure("tracediff stats, all modules", traced(None))
    measure("tracediff stats+sample, all modules", traced(None, STATS + ",sample"))
    measure("tracediff stats + module inputs, blocks", traced(BLOCKS, inputs=True))
    measure("tracediff stats + module inputs, all modules", traced(None, inputs=True))
    measure("tracediff full, 2 blocks", traced(FULL_TWO_BLOCKS, "full"))
    measure("  same, torch f32 reductions", traced(None), method="torch-f32")
    measure("  same, v0.1 f64 reductions", traced(None), repeat=args.naive_repeat, method="v1-f64")
    measure("naive hook, blocks", lambda: NaiveTracer(model, folder / "naive-blocks.jsonl", BLOCKS))
    measure("naive hook, all modules", lambda: NaiveTracer(model, folder / "naive-all.jsonl", None),
            repeat=args.naive_repeat)
    measure("untraced (again)", None)
    hooks = {
        "blocks": sum(1 for n, _ in model.named_modules() if n and __import__("re").search(BLOCKS, n)),
        "all": sum(1 for n, _ in model.named_modules() if n),
    }
    micro: list[dict[str, Any]] = []
    micro_moments(args, micro)
    disk = full = None
    h5: dict[int, float] = {}
    if args.full_steps > 0:
        full = full_trace_throughput(model, inputs, args, folder)
        disk = disk_write_speed(folder, int(args.disk_bytes))
        from tracediff.store.format import FULL_CHUNK, VALUE_CHUNK

        for chunk in (VALUE_CHUNK, FULL_CHUNK, 1 << 20):
            h5[chunk] = h5_write_speed(folder, int(args.disk_bytes) // 2, chunk)
    shutil.rmtree(folder, ignore_errors=True)
    report(args, rows, hooks, micro, full, disk, h5)
    return 0


def full_only(model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, folder: Path) -> int:
    """The full-trace write rate against the disk, nothing else."""
    from tracediff.store.format import FULL_CHUNK, VALUE_CHUNK

    base = time_forwards(model, inputs, args, warmup=args.warmup, repeat=3)["median"]
    full = full_trace_throughput(model, inputs, args, folder)
    disk = disk_write_speed(folder, int(args.disk_bytes))
    h5 = {chunk: h5_write_speed(folder, int(args.disk_bytes) // 2, chunk) for chunk in (VALUE_CHUNK, FULL_CHUNK)}
    shutil.rmtree(folder, ignore_errors=True)
    print()
    print(f"machine : {device_name(args)}, host {platform.node()}")
    print(f"date    : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"command : python scripts/bench_overhead.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"full trace of every block: {full['bytes'] / 1e9:.2f} GB in {full['seconds']:.2f} s over {args.full_steps} "
          f"steps = {full['rate'] / 1e9:.2f} GB/s (close and fsync included); forward while tracing "
          f"{full['forward'] * 1e3:.0f} ms vs {base * 1e3:.0f} ms untraced")
    print(f"disk: sequential write {disk / 1e9:.2f} GB/s (os.write + fsync); h5py appends of float32 in "
          + ", ".join(f"{c}-element chunks {r / 1e9:.2f} GB/s" for c, r in h5.items()))
    print("writer thread per step: build (wait for copies, convert) "
          + ", ".join(f"{t:.2f}" for t in full["writer_build"]) + " s; write "
          + ", ".join(f"{t:.2f}" for t in full["writer_write"]) + " s; forwards "
          + ", ".join(f"{t:.2f}" for t in full["forwards"]) + " s")
    print(f"full trace write rate / disk sequential write: {full['rate'] / disk * 100:.0f} %; "
          f"/ h5py appends in {FULL_CHUNK}-element chunks: {full['rate'] / h5[FULL_CHUNK] * 100:.0f} %")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name(args), "full": full,
                                               "disk_bytes_per_s": disk, "h5_bytes_per_s": h5}, indent=2, default=str))
    return 0


def compile_only(model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, folder: Path) -> int:
    """What tracing costs a ``torch.compile``d forward (inductor), against eager.

    Each compiled mode starts from ``torch.compiler.reset()`` and compiles in its warm-up
    forwards (``attach`` refuses a model compiled without hooks, whose code would skip them);
    its first forward's time (compile included) is reported apart.
    """
    rows: dict[str, dict[str, Any]] = {}

    def measure(name: str, compiled: bool, layers: str | None = None, traced: bool = False) -> None:
        torch.compiler.reset()
        handle = None
        if traced:
            config = TraceConfig(layers=layers, stats=STATS)
            handle = attach(model, side="port", config=config, output=folder / f"trace-{len(rows)}.h5")
        target = torch.compile(model) if compiled else model
        try:
            first = time_forwards(target, inputs, args, warmup=0, repeat=1)["median"]
            row = time_forwards(target, inputs, args, warmup=max(args.warmup - 1, 0), repeat=args.repeat)
        finally:
            if handle is not None:
                handle.close()
        row["first"] = first
        rows[name] = row
        for trace in folder.glob("trace-*.h5"):
            trace.unlink()
        print(f"  {name:<40} {row['median'] * 1e3:9.1f} ms  (first forward {first:.1f} s)", flush=True)

    measure("eager, untraced", False)
    measure("eager, stats, blocks", False, BLOCKS, True)
    measure("eager, stats, all modules", False, None, True)
    measure("compiled, untraced", True)
    measure("compiled, stats, blocks", True, BLOCKS, True)
    measure("compiled, stats, all modules", True, None, True)
    shutil.rmtree(folder, ignore_errors=True)
    eager = rows["eager, untraced"]["median"]
    base = rows["compiled, untraced"]["median"]
    print()
    print("tracediff bench_overhead --compile")
    print(f"machine : {device_name(args)}, host {platform.node()}")
    print(f"date    : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"command : python scripts/bench_overhead.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"model   : {describe(args)}; torch.compile default (inductor); stats {STATS}")
    print(f"timing  : median of {args.repeat} forwards after {args.warmup} warm-up (compile in the first)")
    print()
    print("| mode | forward (ms) | vs compiled untraced | vs eager untraced | first forward (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['median'] * 1e3:.1f} | {(row['median'] / base - 1) * 100:+.1f} % | "
              f"{(row['median'] / eager - 1) * 100:+.1f} % | {row['first']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name(args), "rows": rows},
                                              indent=2, default=str))
    return 0


def describe(args: argparse.Namespace) -> str:
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    return (f"WanLikeModel {args.layers} blocks, dim {args.dim}, ffn {args.ffn_dim}, {args.heads} heads, "
            f"{tokens} video + {args.text_len} text tokens, {args.dtype} on {args.device}")


def device_name(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (torch {torch.__version__})"


def report(
    args: argparse.Namespace,
    rows: dict[str, dict[str, Any]],
    hooks: dict[str, int],
    micro: list[dict[str, Any]],
    full: dict[str, Any] | None,
    disk: float | None,
    h5: dict[int, float],
) -> None:
    base = statistics.median(rows["untraced"]["times"] + rows["untraced (again)"]["times"])
    base_peak = max(rows["untraced"]["peak"], 1)

    def overhead(name: str) -> float:
        return rows[name]["median"] / base - 1.0

    print()
    print("tracediff bench_overhead")
    print(f"machine : {device_name(args)}, host {platform.node()}")
    print(f"date    : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"command : python scripts/bench_overhead.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"model   : {describe(args)}; hooks: blocks {hooks['blocks']}, all modules {hooks['all']}")
    print(f"timing  : median of {args.repeat} forwards after {args.warmup} warm-up "
          f"({args.naive_repeat} for the slow modes); stats {STATS}")
    print()
    print("| mode | forward (ms) | overhead | host enqueue (ms) | peak mem added (MiB) | of model peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        added = (row["peak"] - rows["untraced"]["peak"]) / 2**20
        print(f"| {name.strip()} | {row['median'] * 1e3:.1f} | {overhead(name) * 100:+.1f} % | "
              f"{row['host'] * 1e3:.1f} | {added:.1f} | {added * 2**20 / base_peak * 100:.2f} % |")
    print()
    untraced_spread = abs(rows["untraced (again)"]["median"] / rows["untraced"]["median"] - 1.0)
    naive = overhead("naive hook, all modules")
    ours = overhead("tracediff stats, all modules")
    ratio = naive / ours if ours > 0 else float("inf")
    print("| target | measured | verdict |")
    print("|---|---|---|")
    off = overhead("tracing off (attach, disabled)")
    print(f"| tracing off: no measurable difference | {off * 100:+.2f} % (untraced run-to-run "
          f"{untraced_spread * 100:.2f} %) | {'met' if abs(off) <= max(untraced_spread, 0.01) else 'MISSED'} |")
    block = overhead("tracediff stats, blocks")
    print(f"| block-level stats <= 3 % | {block * 100:+.2f} % | {'met' if block <= 0.03 else 'MISSED'} |")
    print(f"| all-modules stats <= 15 % | {ours * 100:+.2f} % | {'met' if ours <= 0.15 else 'MISSED'} |")
    print(f"| naive / tracediff overhead, all modules >= 5x | {naive * 100:.1f} % / {ours * 100:.2f} % = "
          f"{ratio:.1f}x | {'met' if ratio >= 5 else 'MISSED'} |")
    worst = max(rows[n]["peak"] for n in ("tracediff stats, blocks", "tracediff stats, all modules"))
    added = (worst - rows["untraced"]["peak"]) / base_peak
    print(f"| peak memory added by stats tracing <= 1 % | {added * 100:.2f} % of {base_peak / 2**30:.2f} GiB | "
          f"{'met' if added <= 0.01 else 'MISSED'} |")
    if full is not None and disk is not None:
        print(f"| full trace write rate vs disk sequential write | {full['rate'] / 1e9:.2f} GB/s vs "
              f"{disk / 1e9:.2f} GB/s ({full['rate'] / disk * 100:.0f} %) | (reported) |")
    print()
    print("| moments of one activation | method | time (ms) | read rate (GB/s) |")
    print("|---|---|---:|---:|")
    for item in micro:
        print(f"| {item['shape']} | {item['method']} | {item['ms']:.3f} | {item['gbps']:.0f} |")
    if full is not None:
        print()
        print(f"full trace: {full['bytes'] / 1e9:.2f} GB written in {full['seconds']:.2f} s over {args.full_steps} "
              f"steps (close and fsync included), forward while tracing {full['forward'] * 1e3:.0f} ms "
              f"vs {base * 1e3:.0f} ms untraced")
        print(f"disk: sequential write {disk / 1e9:.2f} GB/s (os.write + fsync); h5py appends of float32 in "
              + ", ".join(f"{c}-element chunks {r / 1e9:.2f} GB/s" for c, r in h5.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "device": device_name(args), "rows": rows, "micro": micro, "full": full,
            "disk_bytes_per_s": disk, "h5_bytes_per_s": h5, "hooks": hooks,
        }, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
