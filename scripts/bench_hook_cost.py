"""Host cost of tracing, per traced module call, on a model where the hooks dominate: the demo DiT on the CPU.

The demo's Wan-style DiT (``tracediff.demo.models.make_upstream``, default tiny
config: 4 blocks, hidden 64, 32 tokens) runs in about a millisecond, so what a
traced forward adds is almost all the recorder's own Python: flattening, step
and call bookkeeping, launching the reductions, building the step's records
and writing them at the step's end (synchronously, on the CPU). The figure is

    (traced forward - untraced forward) / traced module calls per forward

in microseconds, for each configuration:

* ``default``: what ``tracediff run`` and the pytest plugin record (every module,
  stats ``abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample``, module inputs);
* ``stats-only``: every module, the same stats without ``sample``, no module inputs;
* ``blocks``: the default configuration restricted to ``^blocks\\.\\d+$``.

Every configuration is measured in the same process as the untraced forward,
interleaved: each round runs every mode (in a rotating order) for ``--repeat``
forwards after ``--warmup``; the figure is the median over rounds of the per-round
difference. Both CPU time (``time.process_time``, steady on a shared machine) and
wall time are reported. A trace that failed (``handle.failures``) or holds fewer
records than the counted module calls give is refused, not reported.

Only the public API is used (``tracediff.attach``, ``TraceConfig``, ``trace_step``
and the handle's ``failures`` / ``records_written``).

``--baseline-root DIR`` compares two source trees (DIR holding another
``tracediff`` package, e.g. ``git archive HEAD tracediff | tar -x -C DIR``):
each round runs this measurement once under DIR and once under this
repository, alternately, in fresh interpreters, and reports both and their ratio.

Usage::

    PYTHONPATH=. python scripts/bench_hook_cost.py
    PYTHONPATH=. python scripts/bench_hook_cost.py --baseline-root /tmp/before --rounds 5
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parent.parent
try:
    import tracediff  # noqa: F401  (a PYTHONPATH or an install wins: --baseline-root relies on it)
except ImportError:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_records, beside this script
from bench_records import TraceRefused, check_trace, count_calls  # noqa: E402

import tracediff  # noqa: E402
from tracediff import TraceConfig, attach, trace_step  # noqa: E402
from tracediff.demo.models import DemoConfig, make_inputs, make_upstream  # noqa: E402

#: What ``tracediff run`` and the pytest plugin record by default (tracediff/pipeline/spec.py).
DEFAULT_STATS = "abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample"
STATS_ONLY = "abs_mean,sum,min,max,std,l2,nan_count,inf_count"
BLOCKS = r"^blocks\.\d+$"
MODES: dict[str, dict[str, Any]] = {
    "default": {"layers": None, "stats": DEFAULT_STATS, "inputs": True},
    "stats-only": {"layers": None, "stats": STATS_ONLY, "inputs": False},
    "blocks": {"layers": BLOCKS, "stats": DEFAULT_STATS, "inputs": True},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forwards(model: nn.Module, inputs: dict[str, torch.Tensor], count: int, first_step: int) -> tuple[float, float]:
    """CPU and wall seconds of ``count`` forwards, each its own step (device synchronised before and after)."""
    device = inputs["x"].device
    _sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(count):
        with trace_step(first_step + i):
            model(**inputs)
    _sync(device)
    return time.process_time() - c0, time.perf_counter() - w0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    config = DemoConfig(depth=args.depth)
    model = make_upstream(0, config).to(args.device)
    inputs = {name: value.to(args.device) for name, value in make_inputs(0, config).items()}
    counts = count_calls(model, lambda: model(**inputs))
    folder = Path(tempfile.mkdtemp(prefix="tracediff-hookcost-", dir=args.workdir))
    names = ["untraced", *args.modes]
    per_round: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    per_forward = args.repeat + args.warmup
    with torch.no_grad():
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                handle = None
                if name != "untraced":
                    spec = MODES[name]
                    cfg = TraceConfig(layers=spec["layers"], stats=spec["stats"], inputs=spec["inputs"])
                    handle = attach(model, side="port", config=cfg, output=folder / f"{name}-{r}.h5")
                try:
                    _forwards(model, inputs, args.warmup, 0)
                    cpu, wall = _forwards(model, inputs, args.repeat, args.warmup)
                finally:
                    if handle is not None:
                        handle.close()
                if handle is not None:
                    spec = MODES[name]
                    check_trace(handle, name, counts.expected_records(spec["layers"], spec["inputs"]) * per_forward)
                    (folder / f"{name}-{r}.h5").unlink()
                per_round[name].append((cpu / args.repeat, wall / args.repeat))
    folder.rmdir()
    result: dict[str, Any] = {
        "tracediff": str(Path(tracediff.__file__).parent),
        "modules": len(counts.calls) - 1,
        "untraced_cpu_ms": statistics.median(c for c, _ in per_round["untraced"]) * 1e3,
        "untraced_wall_ms": statistics.median(w for _, w in per_round["untraced"]) * 1e3,
        "modes": {},
    }
    for name in args.modes:
        spec = MODES[name]
        calls = counts.traced_calls(spec["layers"])
        records = counts.expected_records(spec["layers"], spec["inputs"])
        base = per_round["untraced"]
        d_cpu = [c - b[0] for (c, _), b in zip(per_round[name], base, strict=True)]
        d_wall = [w - b[1] for (_, w), b in zip(per_round[name], base, strict=True)]
        result["modes"][name] = {
            "traced_calls": calls,
            "records": records,
            "forward_cpu_ms": statistics.median(c for c, _ in per_round[name]) * 1e3,
            "forward_wall_ms": statistics.median(w for _, w in per_round[name]) * 1e3,
            "us_per_call_cpu": statistics.median(d_cpu) / calls * 1e6,
            "us_per_call_wall": statistics.median(d_wall) / calls * 1e6,
            "us_per_record_cpu": statistics.median(d_cpu) / records * 1e6,
            "rounds_us_per_call_cpu": [d / calls * 1e6 for d in d_cpu],
        }
    return result


# -- reporting ----------------------------------------------------------------------------------------


def describe(args: argparse.Namespace) -> list[str]:
    cfg = DemoConfig(depth=args.depth)
    return [
        f"machine : CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}, "
        f"{args.threads} intra-op thread(s), host {platform.node()}"
        + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        f"date    : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"command : python scripts/bench_hook_cost.py {' '.join(sys.argv[1:])}".rstrip(),
        f"model   : demo WanLikeModel, {cfg.depth} blocks, dim {cfg.dim}, ffn {cfg.ffn_dim}, "
        f"{cfg.num_frames * cfg.height * cfg.width // 4} tokens, float32 on {args.device}",
        f"timing  : {args.rounds} rounds x (untraced + {len(args.modes)} modes, rotating order), each "
        f"{args.repeat} forwards after {args.warmup}; medians over rounds",
    ]


def print_table(result: dict[str, Any]) -> None:
    print(f"tracediff from {result['tracediff']}; untraced forward {result['untraced_cpu_ms']:.2f} ms CPU, "
          f"{result['untraced_wall_ms']:.2f} ms wall")
    print()
    print("| mode | traced calls / forward | records / forward | forward CPU (ms) | vs untraced | "
          "µs per traced call (CPU) | µs per call (wall) | µs per record (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in result["modes"].items():
        ratio = row["forward_cpu_ms"] / result["untraced_cpu_ms"]
        print(f"| {name} | {row['traced_calls']} | {row['records']} | {row['forward_cpu_ms']:.2f} | {ratio:.1f}x | "
              f"{row['us_per_call_cpu']:.1f} | {row['us_per_call_wall']:.1f} | {row['us_per_record_cpu']:.1f} |")


def worker_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--rounds", str(args.inner_rounds), "--repeat", str(args.repeat), "--warmup", str(args.warmup),
            "--depth", str(args.depth), "--threads", str(args.threads), "--device", args.device,
            "--modes", *args.modes]
    if args.workdir:
        argv += ["--workdir", args.workdir]
    return argv


def compare(args: argparse.Namespace) -> int:
    """Alternate fresh interpreters on the baseline tree and this one; medians of per-run figures."""
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    roots = {"baseline": str(Path(args.baseline_root).resolve()), "current": str(REPO)}
    for r in range(args.rounds):
        for which in (("baseline", "current") if r % 2 == 0 else ("current", "baseline")):
            env = dict(os.environ, PYTHONPATH=roots[which])
            proc = subprocess.run([sys.executable, __file__, "--worker", *worker_argv(args)], env=env,
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                return proc.returncode
            runs[which].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for line in describe(args):
        print(line)
    print(f"compare : baseline {roots['baseline']} vs current {roots['current']}: {args.rounds} alternating "
          f"runs each of {args.inner_rounds} round(s)")
    print()
    print("| mode | baseline µs/call (CPU) | current µs/call (CPU) | current / baseline (CPU) | "
          "baseline µs/call (wall) | current µs/call (wall) | current / baseline (wall) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary: dict[str, Any] = {}

    def median_of(which: str, name: str, key: str) -> float:
        return statistics.median(run["modes"][name][key] for run in runs[which])

    for name in args.modes:
        before, after = median_of("baseline", name, "us_per_call_cpu"), median_of("current", name, "us_per_call_cpu")
        wb, wa = median_of("baseline", name, "us_per_call_wall"), median_of("current", name, "us_per_call_wall")
        summary[name] = {"baseline_us_per_call_cpu": before, "current_us_per_call_cpu": after,
                         "baseline_us_per_call_wall": wb, "current_us_per_call_wall": wa}
        print(f"| {name} | {before:.1f} | {after:.1f} | {after / before:.2f} | {wb:.1f} | {wa:.1f} | {wa / wb:.2f} |")
    for key, what in (("untraced_cpu_ms", "CPU"), ("untraced_wall_ms", "wall")):
        ub = statistics.median(run[key] for run in runs["baseline"])
        ua = statistics.median(run[key] for run in runs["current"])
        print(f"| untraced forward (ms {what}) | {ub:.2f} | {ua:.2f} | {ua / ub:.2f} | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=10, help="timed forwards per mode per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--depth", type=int, default=DemoConfig().depth, help="blocks of the demo DiT")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), or cuda: host cost with the fused kernel; wall time is the figure there")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--workdir", help="folder for trace files (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--baseline-root", help="compare with the tracediff package under this folder")
    parser.add_argument("--inner-rounds", type=int, default=2, help="with --baseline-root: rounds per run")
    parser.add_argument("--smoke", action="store_true", help="one short round (CI)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.rounds, args.repeat, args.warmup, args.inner_rounds = 1, 2, 1, 1
    if args.baseline_root:
        return compare(args)
    try:
        result = measure(args)
    except TraceRefused as exc:
        print(f"REFUSED: {exc}; no figure reported", file=sys.stderr)
        return 3
    if args.worker:
        print(json.dumps(result))
        return 0
    for line in describe(args):
        print(line)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
