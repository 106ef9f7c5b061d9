"""Time ``first-drift`` at 1 M records per side and ``align`` at 5 000 modules, as ``tracediff run`` traces them.

Both pairs are real traces of the bundled demo pair (a Wan-style upstream DiT
and its FastVideo-style port: ``blocks.N.self_attn.q/k/v`` against
``transformer_blocks.N.attn1.to_qkv``, other names throughout, a planted bug),
recorded through the public API (:func:`tracediff.pipeline.runner.trace_model`, the
function behind ``tracediff run``) with ``run``'s defaults: its statistics
including ``sample``, and module inputs on, which doubles the records.

(a) ``first-drift``: the pair is traced at ``--depth`` for two steps, then those
    steps are written again through the trace writer (records, samples and all)
    under new step numbers until each file holds ``--records`` records. Timed:
    ``python -m tracediff first-drift UP PORT --json`` in a fresh interpreter
    (median of ``--repeat``), and the same command in this process
    (:func:`tracediff.cli.main`), with its phases (read, align, pre-flight, diff, report).
(b) ``align``: the pair is traced at a depth that gives at least
    ``--modules`` modules per side; ``tracediff align UP PORT --json`` is timed
    the same two ways.

Targets (issue 20, 2 CPU cores): first-drift <= 5 s, align <= 2 s. Each prints
PASS or MISS; ``--json OUT`` writes every figure.

Usage::

    python scripts/bench_scale.py                 # full size
    python scripts/bench_scale.py --smoke         # seconds; tests/scripts/test_bench_scale.py runs this
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FIRST_DRIFT_TARGET_S = 5.0
ALIGN_TARGET_S = 2.0
#: Modules per side of the demo upstream: 17 outside the blocks, 22 per block (the port has 20 per block).
_UP_FIXED, _UP_PER_BLOCK = 17, 22


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000, help="records per side for first-drift (1,000,000)")
    parser.add_argument("--depth", type=int, default=40, help="DiT blocks of the first-drift pair (default 40)")
    parser.add_argument("--modules", type=int, default=5000, help="modules per side for align (default 5000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--bug", default="gelu_tanh", help="planted demo bug (default gelu_tanh, block 2)")
    parser.add_argument("--workdir", help="where to write the traces (default: a temporary folder)")
    parser.add_argument("--only", choices=("first-drift", "align"), help="run one of the two measurements")
    parser.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run each: checks that it all works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.records, args.depth, args.modules, args.repeat = 20_000, 4, 300, 1

    figures: dict[str, Any] = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), "
                   f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python scripts/bench_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)  # a folder that does not exist yet is made, not refused
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if args.only in (None, "first-drift"):
            figures["first_drift"] = bench_first_drift(work / "fd", args)
        if args.only in (None, "align"):
            figures["align"] = bench_align(work / "al", args)
    figures["load_average"] = os.getloadavg()[0]
    print_report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


# -- traces, as `tracediff run` writes them -----------------------------------------------------


def trace_pair(work: Path, *, depth: int, steps: int, bug: str | None) -> tuple[Path, Path]:
    """Trace the demo pair with ``run``'s default statistics and module inputs on (public API)."""
    import torch

    from tracediff.config import TraceConfig
    from tracediff.demo.models import DemoConfig, make_inputs, make_port, make_upstream
    from tracediff.pipeline.runner import trace_model
    from tracediff.pipeline.spec import DEFAULT_STATS

    work.mkdir(parents=True, exist_ok=True)
    cfg = DemoConfig(depth=depth)
    config = TraceConfig(stats=DEFAULT_STATS, inputs=True)
    models = {"upstream": make_upstream(0, cfg), "port": make_port(0, cfg, bug=bug)}
    paths = {}
    for side, model in models.items():
        paths[side] = work / f"{side}.h5"
        with torch.no_grad():
            result = trace_model(
                model, side=side, output=paths[side], config=config,
                steps=(make_inputs(0, cfg, step=s) for s in range(steps)), count=steps,
            )
        if result.failures or not result.records:
            raise SystemExit(f"tracing the {side} failed: {result.failures or 'no record written'}")
    return paths["upstream"], paths["port"]


def grow(seed: Path, out: Path, records: int) -> Path:
    """Write ``seed``'s steps again and again (as steps 0, 1, 2, ...) through the trace writer until ``records``."""
    from tracediff.store.format import RECORD_COLUMNS
    from tracediff.store.reader import open_trace
    from tracediff.store.writer import StepBatch, TraceWriter

    with open_trace(seed) as trace:
        cols = trace.records.columns
        steps = sorted(set(cols["step"].tolist()))
        per_step = [np.flatnonzero(cols["step"] == s) for s in steps]
        attrs = dict(trace.meta)
        attrs["config"] = trace.config
        for key in ("complete", "encoding-type", "encoding-version", "format_version"):
            attrs.pop(key, None)
        writer = TraceWriter(out, attrs=attrs, module_table=trace.modules)
        written, step = 0, 0
        while written < records:
            # one commit per step, as the recorder makes them
            rows = per_step[step % len(per_step)][: records - written]
            columns = {name: cols[name][rows].astype(dtype) for name, dtype in RECORD_COLUMNS.items()}
            columns["seq"] = np.arange(len(rows), dtype=np.int64) + written
            columns["step"] = np.full(len(rows), step, dtype=np.int32)
            lens = columns["sample_len"].astype(np.int64)
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            columns["sample_offset"] = np.where(lens > 0, starts, -1)
            src = cols["sample_offset"][rows]
            index = np.repeat(src - starts, lens) + np.arange(int(lens.sum()))
            columns["full_offset"] = np.zeros(len(rows), dtype=np.int64)
            columns["full_len"] = np.zeros(len(rows), dtype=np.int64)
            columns["full_kind"] = np.zeros(len(rows), dtype=np.int8)
            writer.write_step(
                step,
                StepBatch(
                    columns=columns,
                    shape=trace.records.shape[rows],
                    labels=[trace.records.labels[i] for i in cols["label"][rows]],
                    dtypes=[trace.records.dtypes[i] for i in cols["dtype"][rows]],
                    samples=trace.samples[index] if index.size else None,
                ),
            )
            written += len(rows)
            step += 1
        writer.close()
    return out


def _count(path: Path) -> tuple[int, int, int]:
    """Records, modules, steps of a trace."""
    from tracediff.store.reader import open_trace

    with open_trace(path) as trace:
        return len(trace.records), len(trace.modules.names), len(np.unique(trace.records.columns["step"]))


# -- measurements -------------------------------------------------------------------------------


def run_cli(args: list[str]) -> tuple[float, int, str]:
    """``python -m tracediff ARGS`` in a fresh interpreter: wall seconds, exit code, stdout."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tracediff", *args], capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise SystemExit(f"tracediff {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, proc.returncode, proc.stdout


def run_in_process(args: list[str]) -> tuple[float, int, str]:
    """The same command through :func:`tracediff.cli.main` in this process (imports already paid)."""
    from tracediff.cli import main as cli_main

    buffer = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buffer):
        code = cli_main(args)
    seconds = time.perf_counter() - t
    if code not in (0, 1):
        raise SystemExit(f"tracediff {' '.join(args)} failed in-process (exit {code})")
    return seconds, code, buffer.getvalue()


def first_drift_phases(up: Path, port: Path) -> dict[str, float]:
    """What ``first-drift`` does, phase by phase, in this process."""
    from rich.console import Console

    from tracediff.align.aligner import align
    from tracediff.diff import diff_traces
    from tracediff.preflight import check_traces
    from tracediff.render.preflight import preflight_json, render_preflight
    from tracediff.render.report import render_terminal, to_json
    from tracediff.store.load import load_trace

    out: dict[str, float] = {}
    t = time.perf_counter()
    with load_trace(up) as a, load_trace(port) as b:
        out["read"] = time.perf_counter() - t
        t = time.perf_counter()
        alignment = align(a, b)
        out["align"] = time.perf_counter() - t
        t = time.perf_counter()
        preflight = check_traces(a, b, alignment=alignment)
        out["preflight"] = time.perf_counter() - t
        t = time.perf_counter()
        result = diff_traces(a, b, alignment)
        out["diff"] = time.perf_counter() - t
        t = time.perf_counter()
        json.dumps({**to_json(result), "preflight": preflight_json(preflight, result)})
        console = Console(file=io.StringIO(), width=160)
        render_preflight(preflight, console, diff=result)
        render_terminal(result, console)
        out["report"] = time.perf_counter() - t
    return out


def bench_first_drift(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    seed_up, seed_port = trace_pair(work / "seed", depth=args.depth, steps=2, bug=args.bug)
    up, port = grow(seed_up, work / "upstream.h5", args.records), grow(seed_port, work / "port.h5", args.records)
    gen_s = time.perf_counter() - t
    (n_up, m_up, s_up), (n_port, m_port, _) = _count(up), _count(port)
    argv = ["first-drift", str(up), str(port), "--json"]
    cli = [run_cli(argv) for _ in range(args.repeat)]
    inproc = [run_in_process(argv) for _ in range(args.repeat)]
    phases = [first_drift_phases(up, port) for _ in range(max(1, min(args.repeat, 3)))]
    found = json.loads(cli[-1][2]).get("first_drift") or {}
    median = statistics.median(s for s, _, _ in cli)
    return {
        "records": [n_up, n_port],
        "modules": [m_up, m_port],
        "steps": s_up,
        "depth": args.depth,
        "file_mb": [round(up.stat().st_size / 1e6, 1), round(port.stat().st_size / 1e6, 1)],
        "generated_s": round(gen_s, 1),
        "cli_s": [round(s, 3) for s, _, _ in cli],
        "cli_median_s": round(median, 3),
        "in_process_s": [round(s, 3) for s, _, _ in inproc],
        "in_process_median_s": round(statistics.median(s for s, _, _ in inproc), 3),
        "phases_median_s": {k: round(statistics.median(p[k] for p in phases), 3) for k in phases[0]},
        "exit_code": cli[-1][1],
        "first_drift": f"{found.get('port', '?')} step {found.get('step', '?')} {found.get('tensor', '')}".strip(),
        "target_s": FIRST_DRIFT_TARGET_S,
        "pass": median <= FIRST_DRIFT_TARGET_S,
    }


def bench_align(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    depth = max(4, -(-(args.modules - _UP_FIXED) // _UP_PER_BLOCK))
    port_depth = depth
    # the port has fewer modules per block (fused qkv): deepen both until the port also reaches the count
    while port_depth * 20 + 18 < args.modules:
        port_depth += 1
    t = time.perf_counter()
    up, port = trace_pair(work, depth=port_depth, steps=1, bug=args.bug)
    gen_s = time.perf_counter() - t
    (n_up, m_up, _), (n_port, m_port, _) = _count(up), _count(port)
    argv = ["align", str(up), str(port), "--json"]
    cli = [run_cli(argv) for _ in range(args.repeat)]
    inproc = [run_in_process(argv) for _ in range(args.repeat)]
    api = []
    from tracediff.align.aligner import align
    from tracediff.store.reader import open_trace

    with open_trace(up) as a, open_trace(port) as b:
        for _ in range(args.repeat):
            t = time.perf_counter()
            alignment = align(a, b)
            api.append(time.perf_counter() - t)
    pairs = json.loads(cli[-1][2])
    median = statistics.median(s for s, _, _ in cli)
    return {
        "modules": [m_up, m_port],
        "records": [n_up, n_port],
        "depth": port_depth,
        "generated_s": round(gen_s, 1),
        "pairs": len(alignment.pairs),
        "groups": len(alignment.groups),
        "suspects": len(alignment.suspects),
        "json_keys": sorted(pairs)[:8],
        "cli_s": [round(s, 3) for s, _, _ in cli],
        "cli_median_s": round(median, 3),
        "in_process_s": [round(s, 3) for s, _, _ in inproc],
        "in_process_median_s": round(statistics.median(s for s, _, _ in inproc), 3),
        "align_api_median_s": round(statistics.median(api), 3),
        "target_s": ALIGN_TARGET_S,
        "pass": median <= ALIGN_TARGET_S,
    }


def print_report(f: dict[str, Any]) -> None:
    print()
    print("tracediff bench_scale: first-drift and align at scale, traces as `tracediff run` writes them")
    print(f"machine   : {f['machine']}")
    print(f"date      : {f['date']}, load average {f['load_average']:.1f} at the end")
    print(f"command   : {f['command']}".rstrip())
    print()
    print("| measurement | value |")
    print("|---|---|")
    fd = f.get("first_drift")
    if fd:
        print(f"| first-drift traces: records per side | {fd['records'][0]:,} + {fd['records'][1]:,} "
              f"({fd['steps']} steps, depth {fd['depth']}, {fd['modules'][0]} / {fd['modules'][1]} modules) |")
        print(f"| first-drift files (MB) | {fd['file_mb'][0]} + {fd['file_mb'][1]} "
              f"(generated in {fd['generated_s']} s) |")
        print(f"| first-drift CLI, fresh interpreter, median of {len(fd['cli_s'])} (s) | {fd['cli_median_s']:.2f} |")
        print(f"| first-drift CLI runs (s) | {', '.join(f'{s:.2f}' for s in fd['cli_s'])} |")
        print(f"| first-drift in-process (cli.main), median (s) | {fd['in_process_median_s']:.2f} |")
        phases = " / ".join(f"{k} {v:.2f}" for k, v in fd["phases_median_s"].items())
        print(f"| first-drift phases (s) | {phases} |")
        print(f"| first-drift exit / finding | {fd['exit_code']} / {fd['first_drift']} |")
        print(f"| target: first-drift <= {fd['target_s']:g} s | {'PASS' if fd['pass'] else 'MISS'} |")
    al = f.get("align")
    if al:
        print(f"| align: modules per side | {al['modules'][0]:,} + {al['modules'][1]:,} (depth {al['depth']}, "
              f"{al['records'][0]:,} + {al['records'][1]:,} records) |")
        print(f"| align: pairs / groups / suspects | {al['pairs']} / {al['groups']} / {al['suspects']} |")
        print(f"| align CLI, fresh interpreter, median of {len(al['cli_s'])} (s) | {al['cli_median_s']:.2f} |")
        print(f"| align CLI runs (s) | {', '.join(f'{s:.2f}' for s in al['cli_s'])} |")
        print(f"| align in-process (cli.main), median (s) | {al['in_process_median_s']:.2f} |")
        print(f"| align() API alone, median (s) | {al['align_api_median_s']:.2f} |")
        print(f"| target: align <= {al['target_s']:g} s | {'PASS' if al['pass'] else 'MISS'} |")


if __name__ == "__main__":
    raise SystemExit(main())
