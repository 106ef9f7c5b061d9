"""Where does a traced forward spend its time? Profiles of one forward per tracing mode.

A diagnostic companion of ``bench_overhead.py`` (same model and flags): for the
untraced forward and each tracing mode it prints the host functions that took
the most time (cProfile: a host thread blocked on the device shows up here), the
CUDA runtime calls (torch.profiler: synchronisations, host allocations) and the
device kernels by total time. It also times the recorder with a no-op statistic,
which separates the recorder's own host cost from the kernels it launches, and
times the moments of single activations of the model's sizes by each reduction
method (the fused kernel in several shapes, PyTorch float32 reductions,
tracediff 0.1's float64 ones). Unlike ``bench_overhead.py``, which uses only the
public API, this diagnostic reaches into the recorder to switch its parts off.

Usage::

    python scripts/profile_overhead.py [bench_overhead flags] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_overhead as bench  # noqa: E402

from tracediff import TraceConfig, attach, trace_step  # noqa: E402
from tracediff.hooks import (  # noqa: E402
    fused,
    staging,  # noqa: E402
    stats,
)
from tracediff.hooks import recorder as recorder_module  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="folder for the full reports")
    parser.add_argument("--smoke", action="store_true")
    args, rest = parser.parse_known_args()
    bargs = bench.parse(rest + (["--smoke"] if args.smoke else []))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, inputs = bench.build(bargs)
    folder = Path(bench.tempfile.mkdtemp(prefix="tracediff-profile-", dir=bargs.workdir))
    modes = {
        "untraced": None,
        "blocks": TraceConfig(layers=bench.BLOCKS, stats=bench.STATS_ONLY),
        "all": TraceConfig(stats=bench.STATS_ONLY),
        "all+sample": TraceConfig(stats=bench.DEFAULT_STATS),
        "all default": TraceConfig(stats=bench.DEFAULT_STATS, inputs=True),
    }
    summary = []
    for name, config in modes.items():
        handle = attach(model, side="port", config=config, output=folder / f"{name}.h5") if config else None
        step = [0]

        def forward(step: list[int] = step) -> None:
            with torch.no_grad(), trace_step(step[0]):
                model(**inputs)
            step[0] += 1

        for _ in range(2):
            forward()
        bench.sync(bargs.device)
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        forward()
        profiler.disable()
        host = time.perf_counter() - t0
        bench.sync(bargs.device)
        total = time.perf_counter() - t0
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if bargs.device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            forward()
            bench.sync(bargs.device)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        kernels = ""
        if len(activities) > 1:
            kernels = prof.key_averages().table(sort_by="self_device_time_total", row_limit=15)
        if handle is not None:
            handle.close()
        (out / f"profile-{name.replace('+', '-')}.txt").write_text(
            f"{name}: host {host * 1e3:.1f} ms, total {total * 1e3:.1f} ms\n\n"
            f"== cProfile (tottime) ==\n{text.getvalue()}\n== torch.profiler (self CPU) ==\n{table}\n"
            f"== torch.profiler (self device) ==\n{kernels}\n"
        )
        summary.append(f"{name:12s} host {host * 1e3:8.1f} ms   total {total * 1e3:8.1f} ms")
        print(summary[-1], flush=True)
        print(text.getvalue().split("\n", 8)[-1][:2500], flush=True)

    summary += experiments(model, inputs, bargs, folder, modes)
    print("\n".join(summary))
    micro: list[dict] = []
    micro_moments(bargs, micro)
    print("\n| moments of one activation | method | time (ms) | read rate (GB/s) |")
    print("|---|---|---:|---:|")
    for item in micro:
        print(f"| {item['shape']} | {item['method']} | {item['ms']:.3f} | {item['gbps']:.0f} |")
    return 0


# -- the ways of reducing moments (moved here from bench_overhead.py: they patch the recorder) ----------


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
                bench.sync(args.device)
                reps = 10
                t = time.perf_counter()
                for _ in range(reps):
                    fn(x)
                bench.sync(args.device)
                seconds = (time.perf_counter() - t) / reps
            results.append({"shape": f"{tokens}x{width}", "method": method, "ms": seconds * 1e3,
                            "gbps": x.numel() * x.element_size() / seconds / 1e9})
        del x


def experiments(model, inputs, bargs, folder: Path, modes: dict) -> list[str]:
    """Time each tracing mode with parts of the machinery switched off, and log the writer thread."""
    from tracediff.store import writer as writer_module

    lines: list[str] = []
    constant = torch.zeros(7, dtype=torch.float64, device=bargs.device)
    real_moments, real_write, real_bg = recorder_module.moments, writer_module.TraceWriter.write_step, None
    real_bg = recorder_module.BackgroundWriter
    variants = {
        "default": {},
        "no-op stats": {"moments": lambda tensor: constant},
        "writer no-op": {"write": lambda self, step, batch: None},
        "synchronous writes": {"background": lambda writer: None},
        "no-op stats + writer no-op": {"moments": lambda tensor: constant, "write": lambda self, step, batch: None},
    }
    for mode in ("blocks", "all"):
        for name, patch in variants.items():
            recorder_module.moments = patch.get("moments", real_moments)
            writer_module.TraceWriter.write_step = patch.get("write", real_write)
            recorder_module.BackgroundWriter = patch.get("background", real_bg)
            try:
                with attach(model, side="port", config=modes[mode], output=folder / f"x-{mode}-{len(lines)}.h5"):
                    row = bench.time_forwards(model, inputs, bargs, warmup=2, repeat=5)
            finally:
                recorder_module.moments, writer_module.TraceWriter.write_step = real_moments, real_write
                recorder_module.BackgroundWriter = real_bg
            lines.append(f"{mode:6s} {name:28s} {row['median'] * 1e3:8.1f} ms (host {row['host'] * 1e3:.1f} ms)")
            print(lines[-1], flush=True)

    # When does the writer thread work, and for how long, relative to the forward?
    log: list[tuple[str, float, float]] = []
    real_finish = staging.Staged.finish

    def timed_finish(self):
        t = time.perf_counter()
        out = real_finish(self)
        log.append(("finish", t, time.perf_counter()))
        return out

    def timed_write(self, step, batch):
        t = time.perf_counter()
        real_write(self, step, batch)
        log.append(("write_step", t, time.perf_counter()))

    staging.Staged.finish, writer_module.TraceWriter.write_step = timed_finish, timed_write
    try:
        for mode in ("blocks", "all", "all+sample"):
            log.clear()
            starts = []
            with attach(model, side="port", config=modes[mode], output=folder / f"log-{mode}.h5") as handle:
                for step in range(4):
                    bench.sync(bargs.device)
                    starts.append(time.perf_counter())
                    with torch.no_grad(), trace_step(step):
                        model(**inputs)
                    bench.sync(bargs.device)
                handle.recorder.drain()
            t0 = starts[0]
            events = ", ".join(f"{k} +{(a - t0) * 1e3:.0f}..{(b - t0) * 1e3:.0f}" for k, a, b in log)
            lines.append(f"writer thread, {mode}: forwards start at "
                         f"{', '.join(f'+{(s - t0) * 1e3:.0f}' for s in starts)} ms; {events} ms")
            print(lines[-1], flush=True)
    finally:
        staging.Staged.finish, writer_module.TraceWriter.write_step = real_finish, real_write

    # Host cost of one launch.
    if bargs.device.startswith("cuda"):
        x = torch.randn(1536, device=bargs.device, dtype=torch.bfloat16)
        for name, fn in (("torch.sum", lambda: x.sum()), ("fused.launch", lambda: fused.launch(x)),
                         ("stats.moments", lambda: recorder_module.moments(x))):
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(2000):
                fn()
            host = (time.perf_counter() - t) / 2000
            torch.cuda.synchronize()
            lines.append(f"host time per call, {name}: {host * 1e6:.1f} us")
            print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
