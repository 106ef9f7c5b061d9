"""Where does a traced forward spend its time? Profiles of one forward per tracing mode.

A diagnostic companion of ``bench_overhead.py`` (same model and flags): for the
untraced forward and each tracing mode it prints the host functions that took
the most time (cProfile: a host thread blocked on the device shows up here), the
CUDA runtime calls (torch.profiler: synchronisations, host allocations) and the
device kernels by total time. It also times the recorder with a no-op statistic,
which separates the recorder's own host cost from the kernels it launches.

Usage::

    python scripts/profile_overhead.py [bench_overhead flags] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_overhead as bench  # noqa: E402

from tracediff import TraceConfig, attach, trace_step  # noqa: E402
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
        "blocks": TraceConfig(layers=bench.BLOCKS, stats=bench.STATS),
        "all": TraceConfig(stats=bench.STATS),
        "all+sample": TraceConfig(stats=bench.STATS + ",sample"),
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
    return 0


def experiments(model, inputs, bargs, folder: Path, modes: dict) -> list[str]:
    """Time each tracing mode with parts of the machinery switched off, and log the writer thread."""
    from tracediff.hooks import fused
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
    real_finish = recorder_module._Staged.finish

    def timed_finish(self):
        t = time.perf_counter()
        out = real_finish(self)
        log.append(("finish", t, time.perf_counter()))
        return out

    def timed_write(self, step, batch):
        t = time.perf_counter()
        real_write(self, step, batch)
        log.append(("write_step", t, time.perf_counter()))

    recorder_module._Staged.finish, writer_module.TraceWriter.write_step = timed_finish, timed_write
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
        recorder_module._Staged.finish, writer_module.TraceWriter.write_step = real_finish, real_write

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
