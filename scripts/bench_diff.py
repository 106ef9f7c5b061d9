"""Time ``tracediff first-drift`` end to end on two large stats-only traces.

The traces are real ones, grown large: the bundled demo pair (a Wan-style
upstream DiT and its FastVideo-style port with different module names, fused
qkv and a planted bug) is traced at every module for a few denoising steps, and
those steps' records are then written again under new step numbers until each
file holds ``--records`` records (1 million by default). The aligner therefore
sees the real module tables and the differ real records, at scale.

The timed part is the ``first-drift`` command itself, run in a fresh
interpreter (``python -m tracediff first-drift --json``): HDF5 read, alignment,
diff and report. Each phase is also timed in-process, and the peak resident
memory of the command is reported next to the size of the record columns.

Usage::

    python scripts/bench_diff.py                # 1M records per side, 5 repetitions
    python scripts/bench_diff.py --smoke        # seconds; CI runs this
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STATS = "abs_mean,sum,min,max,mean,std"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000, help="records per trace (default 1,000,000)")
    parser.add_argument("--depth", type=int, default=40, help="DiT blocks of the demo pair (default 40, Wan 14B)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of the command (median reported)")
    parser.add_argument("--workdir", help="where to write the traces (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny size, one run: checks that the table prints")
    args = parser.parse_args(argv)
    if args.smoke:
        args.records, args.depth, args.repeat = 20_000, 4, 1

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        up, port = make_traces(work, records=args.records, depth=args.depth)
        gen_s = time.perf_counter() - t0
        n_up, n_port = _count(up), _count(port)
        phases = time_phases(up, port)
        runs, cpus, peak_kib, exit_code, headline = [], [], 0, 0, ""
        for _ in range(args.repeat):
            seconds, cpu, peak, code, out = run_command(up, port)
            runs.append(seconds)
            cpus.append(cpu)
            peak_kib = max(peak_kib, peak)
            exit_code, headline = code, out
        column_bytes = n_up * _RECORD_BYTES + n_port * _RECORD_BYTES
        sizes = (up.stat().st_size, port.stat().st_size)

    print_table(
        args=args,
        n_up=n_up,
        n_port=n_port,
        gen_s=gen_s,
        sizes=sizes,
        phases=phases,
        runs=runs,
        cpus=cpus,
        peak_kib=peak_kib,
        column_bytes=column_bytes,
        exit_code=exit_code,
        headline=headline,
    )
    return 0


# -- trace generation ---------------------------------------------------------------------


def make_traces(work: Path, *, records: int, depth: int) -> tuple[Path, Path]:
    """Trace the demo pair for two steps, then grow each file to ``records`` records."""
    import torch

    from tracediff import TraceConfig, attach, trace_step
    from tracediff.demo.models import DemoConfig, make_inputs, make_port, make_upstream

    cfg = DemoConfig(depth=depth)
    config = TraceConfig(stats=STATS)
    seeds = {"upstream": make_upstream(0, cfg), "port": make_port(0, cfg, bug="gelu_tanh")}
    small: dict[str, Path] = {}
    for side, model in seeds.items():
        small[side] = work / f"{side}-seed.h5"
        with attach(model, side=side, config=config, output=small[side]), torch.no_grad():
            for step in range(2):
                with trace_step(step):
                    model(**make_inputs(0, cfg, step=step))
    return grow(small["upstream"], work / "upstream.h5", records), grow(small["port"], work / "port.h5", records)


def grow(seed: Path, out: Path, records: int) -> Path:
    """Write ``seed``'s steps again and again (as steps 0, 1, 2, ...) until ``out`` holds ``records``."""
    from tracediff.store.format import RECORD_COLUMNS
    from tracediff.store.reader import open_trace
    from tracediff.store.writer import StepBatch, TraceWriter

    with open_trace(seed) as trace:
        cols = trace.records.columns
        steps = sorted(set(cols["step"].tolist()))
        per_step = [np.flatnonzero(cols["step"] == s) for s in steps]
        attrs = dict(trace.meta)
        attrs["config"] = trace.config
        attrs.pop("complete", None)
        for key in ("encoding-type", "encoding-version", "format_version"):
            attrs.pop(key, None)
        writer = TraceWriter(out, attrs=attrs, module_table=trace.modules)
        written, step = 0, 0
        while written < records:
            # Several steps per commit (a commit row marks a prefix, not necessarily one step): fast to write.
            rows_list, steps_list = [], []
            while written + sum(map(len, rows_list)) < records and sum(map(len, rows_list)) < 50_000:
                rows = per_step[step % len(per_step)]
                rows = rows[: records - written - sum(map(len, rows_list))]
                rows_list.append(rows)
                steps_list.append(np.full(len(rows), step, dtype=np.int32))
                step += 1
            rows = np.concatenate(rows_list)
            columns = {name: cols[name][rows].astype(dtype) for name, dtype in RECORD_COLUMNS.items()}
            columns["seq"] = np.arange(len(rows), dtype=np.int64) + written
            columns["step"] = np.concatenate(steps_list)
            columns["sample_offset"] = np.zeros(len(rows), dtype=np.int64)
            columns["full_offset"] = np.zeros(len(rows), dtype=np.int64)
            writer.write_step(
                step - 1,
                StepBatch(
                    columns=columns,
                    shape=trace.records.shape[rows],
                    labels=[trace.records.labels[i] for i in cols["label"][rows]],
                    dtypes=[trace.records.dtypes[i] for i in cols["dtype"][rows]],
                ),
            )
            written += len(rows)
        writer.close()
    return out


# -- measurement ------------------------------------------------------------------------------

def _record_bytes() -> int:
    """On-disk bytes of one record's columns (see tracediff/store/format.py), shape included."""
    from tracediff.store.format import MAX_DIMS, RECORD_COLUMNS

    return sum(d.itemsize for d in RECORD_COLUMNS.values()) + 8 * MAX_DIMS


_RECORD_BYTES = _record_bytes()


def _count(path: Path) -> int:
    from tracediff.store.reader import open_trace

    with open_trace(path) as trace:
        return len(trace.records)


def time_phases(up: Path, port: Path) -> dict[str, float]:
    """The command's phases, timed in this process (read, align, diff, report)."""
    import io

    from rich.console import Console

    from tracediff.align import align
    from tracediff.diff import diff_traces
    from tracediff.report import render_terminal, to_json
    from tracediff.store.load import load_trace

    out: dict[str, float] = {}
    t = time.perf_counter()
    with load_trace(up) as a, load_trace(port) as b:
        out["read"] = time.perf_counter() - t
        t = time.perf_counter()
        alignment = align(a, b)
        out["align"] = time.perf_counter() - t
        t = time.perf_counter()
        result = diff_traces(a, b, alignment)
        out["diff"] = time.perf_counter() - t
        t = time.perf_counter()
        json.dumps(to_json(result))
        render_terminal(result, Console(file=io.StringIO(), width=160))
        out["report"] = time.perf_counter() - t
    return out


#: Peak RSS (KiB) of the running process, from /proc (``ru_maxrss`` of a child can carry its parent's peak).
_PEAK_RSS = "[int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]"


def run_command(up: Path, port: Path) -> tuple[float, float, int, int, str]:
    """Run ``python -m tracediff first-drift --json`` once: wall and CPU seconds, peak RSS (KiB), exit, headline."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['tracediff', 'first-drift', sys.argv[1], sys.argv[2], '--json']\n"
        "try:\n"
        "    runpy.run_module('tracediff', run_name='__main__')\n"
        "finally:\n"
        f"    sys.stderr.write('\\nPEAK_RSS_KIB ' + str({_PEAK_RSS}) + '\\n')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(up), str(port)], capture_output=True, text=True, env=env, cwd=REPO
    )
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak = 0
    for line in proc.stderr.splitlines():
        if line.startswith("PEAK_RSS_KIB "):
            peak = int(line.split()[1])
    if proc.returncode not in (0, 1):
        raise SystemExit(f"first-drift failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    headline = ""
    try:
        first = json.loads(proc.stdout).get("first_drift") or {}
        headline = f"{first.get('port', '?')} step {first.get('step', '?')} ({first.get('kind', '?')})"
    except json.JSONDecodeError:
        headline = "(unparsed)"
    return seconds, cpu, peak, proc.returncode, headline


def baseline_rss_kib() -> int:
    """Peak RSS of an interpreter that only imports the command's modules: the fixed cost."""
    code = (
        "import tracediff.cli, tracediff.align, tracediff.diff, tracediff.report, tracediff.store.load, h5py\n"
        f"print({_PEAK_RSS})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    return int(proc.stdout.strip() or 0)


def print_table(**f: object) -> None:
    args = f["args"]
    runs = sorted(f["runs"])  # type: ignore[arg-type]
    median = float(np.median(runs))
    base = baseline_rss_kib()
    peak = int(f["peak_kib"])  # type: ignore[arg-type]
    n = int(f["n_up"]) + int(f["n_port"])  # type: ignore[arg-type]
    phases = f["phases"]
    print()
    print("tracediff bench_diff: first-drift on two stats-only traces")
    print(f"machine   : {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), "
          f"Python {platform.python_version()}")
    print(f"date      : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"command   : python scripts/bench_diff.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"traces    : {f['n_up']:,} + {f['n_port']:,} records (demo pair, depth {args.depth}, stats {STATS})")
    print(f"files     : {f['sizes'][0] / 1e6:.1f} MB + {f['sizes'][1] / 1e6:.1f} MB, generated in {f['gen_s']:.1f} s")
    print()
    print("| measurement | value |")
    print("|---|---|")
    print(f"| first-drift end to end, median of {len(runs)} (s) | {median:.2f} |")
    print(f"| first-drift runs (s) | {', '.join(f'{r:.2f}' for r in f['runs'])} |")  # type: ignore[union-attr]
    print(f"| first-drift CPU time (user+sys), median (s) | {float(np.median(f['cpus'])):.2f} |")
    for name, seconds in phases.items():  # type: ignore[union-attr]
        print(f"| in-process phase: {name} (s) | {seconds:.2f} |")
    print(f"| peak RSS of the command (MB) | {peak / 1024:.0f} |")
    print(f"| peak RSS of an interpreter with the imports only (MB) | {base / 1024:.0f} |")
    print(f"| record columns of both traces (MB) | {int(f['column_bytes']) / 1e6:.0f} |")  # type: ignore[arg-type]
    print(f"| memory above imports per record (bytes) | {max(peak - base, 0) * 1024 / max(n, 1):.0f} |")
    print(f"| exit code / first drift | {f['exit_code']} / {f['headline']} |")
    print(f"| target: <= 5 s | {'met' if median <= 5.0 else 'MISSED'} |")


if __name__ == "__main__":
    raise SystemExit(main())
