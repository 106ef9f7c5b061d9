"""Measure what tracing costs a forward pass of a realistically sized video DiT, against the issue's targets.

The model is the Wan2.1-style DiT of the demo (``tracediff.demo.upstream_dit``,
Wan's module structure: ``blocks.N.self_attn.q``, ``ffn.0``, ...) with random
weights, in bf16, at a Wan shape (``--shape``):

* ``1.3b``: 30 blocks, hidden 1536, FFN 8960, 12 heads;
* ``14b``: 40 blocks, hidden 5120, FFN 13824, 40 heads (28 GB of weights);

with a 16x21x60x104 latent (32,760 tokens: 81 frames at 480x832) and 512 text
tokens. ``--layers N`` cuts the depth (memory, time).

Modes, measured side by side in one run:

* untraced;
* ``attach`` with tracing switched off (no hook is registered);
* tracediff on the blocks (``^blocks\\.\\d+$``): stats only, and the default configuration;
* tracediff on every module: stats only, and the default configuration;
* a FastVideo-style hook on every module: FastVideo's own tracer
  (``fastvideo/hooks/activation_trace.py``) reproduced, per statistic one ``.float()``
  copy of the tensor and one ``.item()``, one JSON line per tensor, line-buffered.

The *default configuration* is what ``tracediff run`` and the pytest plugin record:
stats ``abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample`` and every traced
module's inputs. *Stats only* drops ``sample`` and the inputs. The FastVideo-style hook
records FastVideo's full list ``abs_mean,sum,min,max,mean,std,shape,dtype``.

Timing: ``--rounds`` rounds; each round runs every mode, in a rotating order, for
``--warmup`` forwards and then ``--repeat`` timed forwards (``--fastvideo-repeat`` for the
FastVideo-style hook), each forward one ``trace_step``, the device synchronised before
and after each forward only. A mode's overhead is, per round, its median forward over
the same round's untraced median; the figure is the median over rounds.

Honesty: every trace measured is checked when it is closed. A trace whose handle
reports failures, or that holds another number of records than the forwards must
have written (counted beforehand with plain PyTorch hooks: the model's inputs and
output, and each traced module call's output tensors, and input tensors where inputs
are traced), is REFUSED: its figure is not reported, nor any target that needs it,
and the script exits with status 3. ``--plant-failure`` adds a module whose output no
tracer can record (a meta tensor), to see that happen.

Only tracediff's public API is used (``attach``, ``TraceConfig``, ``trace_step``,
``current_step`` and the handle's ``failures``, ``records_written``, ``enabled``),
so the script runs from a checkout without installing it::

    PYTHONPATH=. python scripts/bench_overhead.py --shape 1.3b --json /tmp/bench-1.3b.json
    PYTHONPATH=. python scripts/bench_overhead.py --shape 14b --rounds 2 --json /tmp/bench-14b.json
    PYTHONPATH=. python scripts/bench_overhead.py --smoke                 # CPU, tiny, seconds (CI)

``--compile`` times ``torch.compile`` instead; ``--full-steps N`` adds the write rate of a
``full`` trace of every block against the disk's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_records, beside this script

from bench_records import CallCounts as RecordCounts  # noqa: E402
from bench_records import count_calls as count_module_calls  # noqa: E402

from tracediff import TraceConfig, attach, current_step, trace_step  # noqa: E402
from tracediff.demo.upstream_dit import WanLikeModel, rope_params  # noqa: E402

#: What ``tracediff run`` and the pytest plugin record by default (``tracediff.pipeline.spec.DEFAULT_STATS``,
#: checked by tests/scripts/test_benchmarks.py), with module inputs.
DEFAULT_STATS = "abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample"
STATS_ONLY = "abs_mean,sum,min,max,std,l2,nan_count,inf_count"
#: FastVideo's full stat list, what its tracer records when asked for everything.
FASTVIDEO_STATS = "abs_mean,sum,min,max,mean,std,shape,dtype"
BLOCKS = r"^blocks\.\d+$"

SHAPES: dict[str, dict[str, int]] = {
    "1.3b": {"dim": 1536, "layers": 30, "heads": 12, "ffn_dim": 8960},
    "14b": {"dim": 5120, "layers": 40, "heads": 40, "ffn_dim": 13824},
}

#: Targets of issue 20: overhead ceilings, and how much cheaper than the FastVideo-style hook.
TARGET_BLOCKS = 0.01
TARGET_ALL_DEFAULT = 0.08
TARGET_RATIO = 25.0


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # "untraced", "off", "tracediff", "fastvideo"
    layers: str | None = None
    stats: str = ""
    inputs: bool = False


MODES = (
    Mode("untraced", "untraced"),
    Mode("tracing off (attach, disabled)", "off"),
    Mode("blocks, stats only", "tracediff", BLOCKS, STATS_ONLY),
    Mode("blocks, default config", "tracediff", BLOCKS, DEFAULT_STATS, True),
    Mode("all modules, stats only", "tracediff", None, STATS_ONLY),
    Mode("all modules, default config", "tracediff", None, DEFAULT_STATS, True),
    Mode("FastVideo-style hook, all modules", "fastvideo", None, FASTVIDEO_STATS),
)


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
    d = args.dim // args.heads
    model.freqs = torch.cat(
        [rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)), rope_params(1024, 2 * (d // 6))], dim=1
    ).to(args.device)
    if args.plant_failure:
        plant_failure(model)
    inputs = {
        "x": torch.randn(1, 16, args.frames, args.height, args.width, device=args.device, dtype=dtype),
        "t": torch.tensor([500.0], device=args.device),
        "context": torch.randn(1, args.text_len, args.text_dim, device=args.device, dtype=dtype),
    }
    return model, inputs


class UnrecordableProbe(nn.Module):
    """Returns a meta tensor: no tracer can record its values (tracediff reports the module as failed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device="meta")


def plant_failure(model: nn.Module) -> None:
    """Add ``probe``, a submodule called (by a plain PyTorch hook) after block 0, whose output is unrecordable.

    The model's output is unchanged; the all-modules traces lose the probe's record and
    report it as failed, so the benchmark must refuse them. Block-level traces do not
    select it and stay valid.
    """
    model.add_module("probe", UnrecordableProbe())

    def call_probe(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        model.probe(output)

    model.blocks[0].register_forward_hook(call_probe)


# -- what a trace must hold ------------------------------------------------------------------


class CallCounts(RecordCounts):
    """:class:`bench_records.CallCounts`, with the records each mode of this script must write."""

    def records(self, mode: Mode) -> int:
        """Records one forward must add to a trace of ``mode``."""
        if mode.kind == "fastvideo":  # one JSON line per output tensor of each traced module
            return self.output_tensors(mode.layers)
        return self.expected_records(mode.layers, mode.inputs)


def count_calls(model: nn.Module, inputs: dict[str, torch.Tensor]) -> CallCounts:
    """One forward with plain PyTorch hooks on every module, counting calls and tensors."""
    counted = count_module_calls(model, lambda: model(**inputs))
    return CallCounts(counted.calls, counted.outputs, counted.inputs)


# -- the FastVideo-style hook -----------------------------------------------------------------------


def _fastvideo_stat_fns() -> dict[str, Callable[[torch.Tensor], Any]]:
    """FastVideo's ``_STAT_FNS``: each numeric statistic makes its own float copy and reads one number back."""
    return {
        "abs_mean": lambda t: float(t.detach().float().abs().mean().item()),
        "sum": lambda t: float(t.detach().float().sum().item()),
        "min": lambda t: float(t.detach().float().min().item()),
        "max": lambda t: float(t.detach().float().max().item()),
        "mean": lambda t: float(t.detach().float().mean().item()),
        "std": lambda t: float(t.detach().float().std().item()),
        "shape": lambda t: list(t.shape),
        "dtype": lambda t: str(t.dtype),
    }


def _flatten_tensors(obj: Any, prefix: str = "out") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, (tuple, list)):
        return [pair for i, item in enumerate(obj) for pair in _flatten_tensors(item, f"{prefix}[{i}]")]
    if isinstance(obj, dict):
        return [pair for key, value in obj.items() for pair in _flatten_tensors(value, f"{prefix}.{key}")]
    return []


class FastVideoStyleTracer:
    """FastVideo's activation tracer (``fastvideo/hooks/activation_trace.py``), reproduced with plain hooks.

    Per output tensor of each matching module: one JSON line, every statistic computed
    by its own ``t.detach().float()...item()`` (a float copy and a device sync each), a
    failing statistic written as ``"<error: ...>"``, lines written to a line-buffered
    file under a lock. FastVideo registers its hooks by wrapping ``forward`` through its
    ``ModuleHookManager``; here ``register_forward_hook`` does the same work.
    """

    def __init__(self, model: nn.Module, path: Path, layers: str | None, stats: str = FASTVIDEO_STATS) -> None:
        fns = _fastvideo_stat_fns()
        self.stats = [(name, fns[name]) for name in stats.split(",")]
        pattern = re.compile(layers) if layers else re.compile(".*")
        self.path = path
        self.file = path.open("a", buffering=1)
        self.lock = threading.Lock()
        self.records_written = 0
        self.failures: dict[str, str] = {}  # never filled: like FastVideo's, this tracer writes errors as values
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if name and pattern.search(name)
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            step = current_step()
            for label, tensor in _flatten_tensors(output):
                record: dict[str, Any] = {"module": name, "tensor": label, "step": step}
                for stat, fn in self.stats:
                    try:
                        record[stat] = fn(tensor)
                    except Exception as exc:
                        record[stat] = f"<error: {exc!r}>"
                line = json.dumps(record, default=str) + "\n"
                with self.lock:
                    self.file.write(line)
                    self.records_written += 1

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.file.close()


# -- timing ------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forwards(
    model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, *, warmup: int, repeat: int,
    first_step: int = 0,
) -> dict[str, Any]:
    """Median wall time of ``repeat`` forwards after ``warmup``, each one step; sync at the boundaries only."""
    times, enqueue = [], []
    with torch.no_grad():
        for i in range(warmup + repeat):
            sync(args.device)
            t0 = time.perf_counter()
            with trace_step(first_step + i):
                model(**inputs)
            t1 = time.perf_counter()
            sync(args.device)
            t2 = time.perf_counter()
            if i >= warmup:
                times.append(t2 - t0)
                enqueue.append(t1 - t0)
    return {"median": statistics.median(times), "times": times, "host": statistics.median(enqueue)}


class Refused(Exception):
    """A measured trace is broken: its figure must not be reported."""


def check(tracer: Any, mode: Mode, expected: int) -> None:
    """Refuse a trace that reports failures or holds another number of records than the forwards made."""
    if tracer.failures:
        raise Refused(f"the trace reports failures: {tracer.failures}")
    if tracer.records_written != expected:
        raise Refused(f"the trace holds {tracer.records_written} records where the module calls give {expected}")


def run_mode(
    mode: Mode, model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, folder: Path,
    counts: CallCounts, tag: str,
) -> dict[str, Any]:
    """Attach ``mode``'s tracer, time forwards, close it, check what it wrote; timings and peak memory."""
    repeat = args.fastvideo_repeat if mode.kind == "fastvideo" else args.repeat
    path = folder / f"{tag}.{'jsonl' if mode.kind == 'fastvideo' else 'h5'}"
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tracer: Any = None
    if mode.kind == "off":
        tracer = attach(model, side="port", config=TraceConfig(enabled=False), output=path)
        if tracer.enabled:
            raise Refused("attach registered hooks with tracing switched off")
    elif mode.kind == "tracediff":
        config = TraceConfig(layers=mode.layers, stats=mode.stats, inputs=mode.inputs)
        tracer = attach(model, side="port", config=config, output=path)
    elif mode.kind == "fastvideo":
        tracer = FastVideoStyleTracer(model, path, mode.layers, mode.stats)
    try:
        row = time_forwards(model, inputs, args, warmup=args.warmup, repeat=repeat)
    finally:
        if tracer is not None:
            tracer.close()
    row["peak"] = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0
    if mode.kind in ("tracediff", "fastvideo"):
        try:
            check(tracer, mode, counts.records(mode) * (args.warmup + repeat))
        finally:
            path.unlink(missing_ok=True)
    return row


# -- the run -------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    """The flags (profile_overhead.py takes the same)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.3b", help="Wan model shape (default 1.3b)")
    parser.add_argument("--layers", type=int, help="DiT blocks (default: the shape's; fewer cut memory and time)")
    parser.add_argument("--dim", type=int, help="hidden size (default: the shape's)")
    parser.add_argument("--ffn-dim", type=int, help="FFN size (default: the shape's)")
    parser.add_argument("--heads", type=int, help="attention heads (default: the shape's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    parser.add_argument("--height", type=int, default=60, help="latent height (60 = 480 px)")
    parser.add_argument("--width", type=int, default=104, help="latent width (104 = 832 px)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every mode, interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="forwards per mode and round before timing")
    parser.add_argument("--repeat", type=int, default=3, help="timed forwards per mode and round")
    parser.add_argument("--fastvideo-repeat", type=int, default=2, help="timed forwards of the FastVideo-style hook")
    parser.add_argument("--full-steps", type=int, default=0,
                        help="steps of a full-tensor trace of every block (0 = skip)")
    parser.add_argument("--disk-bytes", type=float, default=8e9, help="bytes written by the disk-speed test")
    parser.add_argument("--workdir", help="folder for trace files (default: a temporary folder)")
    parser.add_argument("--json", help="also write all figures to this JSON file")
    parser.add_argument("--plant-failure", action="store_true",
                        help="add a module whose output cannot be recorded: the all-modules figures must be refused")
    parser.add_argument("--full-only", action="store_true", help="only the full-trace write rate and the disk")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, one repetition (CI)")
    parser.add_argument("--compile", action="store_true",
                        help="only torch.compile: eager and compiled forwards, untraced and traced")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = make_parser().parse_args(argv)
    shape = SHAPES[args.shape]
    for key in ("layers", "dim", "ffn_dim", "heads"):
        if getattr(args, key) is None:
            setattr(args, key, shape[key])
    if args.smoke:
        args.device, args.dtype = "cpu", "float32"
        args.layers, args.dim, args.ffn_dim, args.heads, args.text_dim, args.text_len = 2, 64, 128, 4, 32, 8
        args.frames, args.height, args.width = 2, 8, 8
        args.rounds, args.warmup, args.repeat, args.fastvideo_repeat = 1, 1, 1, 1
        args.full_steps = min(args.full_steps, 1)
        args.disk_bytes = 1e6
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    model, inputs = build(args)
    folder = Path(tempfile.mkdtemp(prefix="tracediff-bench-", dir=args.workdir))
    print(f"bench_overhead: {describe(args)}", flush=True)
    try:
        if args.full_only:
            return full_only(model, inputs, args, folder)
        if args.compile:
            return compile_only(model, inputs, args, folder)
        return overhead(model, inputs, args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def overhead(model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, folder: Path) -> int:
    counts = count_calls(model, inputs)
    rounds: dict[str, list[dict[str, Any]]] = {mode.name: [] for mode in MODES}
    refused: dict[str, str] = {}
    for r in range(args.rounds):
        order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
        for mode in order:
            if mode.name in refused:
                continue
            try:
                row = run_mode(mode, model, inputs, args, folder, counts, f"r{r}-{MODES.index(mode)}")
            except Refused as exc:
                refused[mode.name] = str(exc)
                print(f"  round {r + 1}: {mode.name:<36} REFUSED: {exc}", flush=True)
                continue
            rounds[mode.name].append(row)
            print(f"  round {r + 1}: {mode.name:<36} {row['median'] * 1e3:9.1f} ms", flush=True)
    full = disk = None
    if args.full_steps > 0:
        full = full_trace_throughput(model, inputs, args, folder)
        disk = disk_write_speed(folder, int(args.disk_bytes))
    results = summarise(rounds, refused, counts)
    report(args, results, counts, full, disk)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "device": device_name(args), "command": command(), "date": now(),
            "results": results, "refused": refused, "rounds": rounds, "full": full, "disk_bytes_per_s": disk,
        }, indent=2, default=str))
    return 3 if refused else 0


def summarise(
    rounds: dict[str, list[dict[str, Any]]], refused: dict[str, str], counts: CallCounts
) -> dict[str, dict[str, Any]]:
    """Per mode: median forward, median per-round overhead against that round's untraced forward, memory."""
    base_rounds = rounds["untraced"]
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        if mode.name in refused or not rounds[mode.name]:
            out[mode.name] = {"refused": refused.get(mode.name, "not measured")}
            continue
        mine = rounds[mode.name]
        ratios = [m["median"] / b["median"] - 1.0 for m, b in zip(mine, base_rounds, strict=False)]
        base_peak = max(b["peak"] for b in base_rounds) if base_rounds else 0
        out[mode.name] = {
            "forward_ms": statistics.median(m["median"] for m in mine) * 1e3,
            "overhead": statistics.median(ratios) if ratios else 0.0,
            "overhead_rounds": ratios,
            "host_ms": statistics.median(m["host"] for m in mine) * 1e3,
            "peak_added_mib": (max(m["peak"] for m in mine) - base_peak) / 2**20,
            "base_peak_gib": base_peak / 2**30,
            "traced_calls": counts.traced_calls(mode.layers) if mode.kind in ("tracediff", "fastvideo") else 0,
            "records_per_forward": counts.records(mode) if mode.kind in ("tracediff", "fastvideo") else 0,
        }
    untraced = [b["median"] for b in base_rounds]
    if len(untraced) > 1:
        out["untraced"]["spread"] = (max(untraced) - min(untraced)) / statistics.median(untraced)
    return out


def targets(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows: PASS, MISS, or REFUSED when a figure it needs was refused."""

    def figure(name: str) -> float | None:
        return None if "refused" in results[name] else results[name]["overhead"]

    rows: list[tuple[str, str, str]] = []
    for name in ("blocks, stats only", "blocks, default config"):
        value = figure(name)
        rows.append((f"{name} <= {TARGET_BLOCKS * 100:.0f} %",
                     "—" if value is None else f"{value * 100:+.2f} %",
                     "REFUSED" if value is None else ("PASS" if value <= TARGET_BLOCKS else "MISS")))
    value = figure("all modules, default config")
    rows.append((f"all modules, default config <= {TARGET_ALL_DEFAULT * 100:.0f} %",
                 "—" if value is None else f"{value * 100:+.2f} %",
                 "REFUSED" if value is None else ("PASS" if value <= TARGET_ALL_DEFAULT else "MISS")))
    fastvideo = figure("FastVideo-style hook, all modules")
    label = f"FastVideo-style overhead / tracediff default overhead, all modules >= {TARGET_RATIO:.0f}x"
    if value is None or fastvideo is None:
        rows.append((label, "—", "REFUSED"))
    else:
        ratio = fastvideo / value if value > 0 else float("inf")
        rows.append((label, f"{fastvideo * 100:.1f} % / {value * 100:.2f} % = {ratio:.1f}x",
                     "PASS" if ratio >= TARGET_RATIO else "MISS"))
    return rows


def report(
    args: argparse.Namespace, results: dict[str, dict[str, Any]], counts: CallCounts,
    full: dict[str, Any] | None, disk: float | None,
) -> None:
    print()
    print("tracediff bench_overhead")
    print(f"machine : {device_name(args)}, host {platform.node()}")
    print(f"date    : {now()}")
    print(f"command : {command()}")
    print(f"model   : {describe(args)}; modules traced: blocks {counts.traced_calls(BLOCKS)} calls, "
          f"all {counts.traced_calls(None)} calls per forward")
    print(f"timing  : {args.rounds} round(s) of every mode, rotating order; per mode and round {args.repeat} "
          f"forwards ({args.fastvideo_repeat} for the FastVideo-style hook) after {args.warmup} warm-up; "
          "overhead = median over rounds of (mode / same round's untraced - 1)")
    print(f"configs : default = stats {DEFAULT_STATS} + module inputs; stats only = {STATS_ONLY}; "
          f"FastVideo-style = {FASTVIDEO_STATS}")
    spread = results["untraced"].get("spread")
    if spread is not None:
        print(f"noise   : untraced forward, spread over rounds {spread * 100:.2f} %")
    print()
    print("| mode | forward (ms) | overhead | host enqueue (ms) | records / forward | peak mem added (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        row = results[mode.name]
        if "refused" in row:
            print(f"| {mode.name} | REFUSED: {row['refused']} | | | | |")
            continue
        overhead_text = "—" if mode.kind == "untraced" else f"{row['overhead'] * 100:+.1f} %"
        print(f"| {mode.name} | {row['forward_ms']:.1f} | {overhead_text} | {row['host_ms']:.1f} | "
              f"{row['records_per_forward'] or '—'} | {row['peak_added_mib']:.1f} |")
    print()
    print("| target | measured | verdict |")
    print("|---|---|---|")
    for target, measured, verdict in targets(results):
        print(f"| {target} | {measured} | {verdict} |")
    if full is not None and disk is not None:
        print()
        print(f"full trace of every block: {full['bytes'] / 1e9:.2f} GB in {full['seconds']:.2f} s over "
              f"{args.full_steps} steps = {full['rate'] / 1e9:.2f} GB/s (close and fsync included); disk sequential "
              f"write {disk / 1e9:.2f} GB/s (os.write + fsync): {full['rate'] / disk * 100:.0f} %")
    refused = [name for name, row in results.items() if "refused" in row]
    if refused:
        print()
        print(f"REFUSED: {len(refused)} mode(s) measured a broken trace; their figures are not reported "
              f"({', '.join(refused)})")


# -- full-tensor traces and the disk --------------------------------------------------------------------


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


def full_trace_throughput(
    model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    """Trace every block's full output for ``--full-steps`` steps after two warm-up steps: bytes over wall time.

    Timed from the first timed step to the trace closed (every step written) and fsynced.
    """
    path = folder / "full.h5"
    config = TraceConfig(layers=BLOCKS, stats="full")
    with torch.no_grad():
        handle = attach(model, side="port", config=config, output=path)
        for step in range(2):  # warm-up: pinned buffers for two steps in flight get allocated once
            with trace_step(step):
                model(**inputs)
        sync(args.device)
        start_bytes = path.stat().st_size
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
    if handle.failures:
        raise Refused(f"the full trace reports failures: {handle.failures}")
    written = path.stat().st_size - start_bytes
    path.unlink()
    return {"bytes": written, "seconds": seconds, "rate": written / seconds,
            "forward": statistics.median(forward_times), "forwards": forward_times}


def full_only(model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, folder: Path) -> int:
    """The full-trace write rate against the disk, nothing else."""
    base = time_forwards(model, inputs, args, warmup=args.warmup, repeat=3)["median"]
    full = full_trace_throughput(model, inputs, args, folder)
    disk = disk_write_speed(folder, int(args.disk_bytes))
    print()
    print(f"machine : {device_name(args)}, host {platform.node()}")
    print(f"date    : {now()}")
    print(f"command : {command()}")
    print(f"full trace of every block: {full['bytes'] / 1e9:.2f} GB in {full['seconds']:.2f} s over {args.full_steps} "
          f"steps = {full['rate'] / 1e9:.2f} GB/s (close and fsync included); forward while tracing "
          f"{full['forward'] * 1e3:.0f} ms vs {base * 1e3:.0f} ms untraced")
    print(f"disk: sequential write {disk / 1e9:.2f} GB/s (os.write + fsync); full trace / disk: "
          f"{full['rate'] / disk * 100:.0f} %")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name(args), "full": full,
                                               "disk_bytes_per_s": disk}, indent=2, default=str))
    return 0


# -- torch.compile ---------------------------------------------------------------------------------------


def compile_only(model: nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace, folder: Path) -> int:
    """What tracing (default configuration) costs a ``torch.compile``d forward (inductor), against eager.

    Each compiled mode starts from ``torch.compiler.reset()`` and compiles in its warm-up
    forwards (``attach`` refuses a model compiled without hooks, whose code would skip them);
    its first forward's time (compile included) is reported apart.
    """
    rows: dict[str, dict[str, Any]] = {}

    def measure(name: str, compiled: bool, layers: str | None = None, traced: bool = False) -> None:
        torch.compiler.reset()
        handle = None
        if traced:
            config = TraceConfig(layers=layers, stats=DEFAULT_STATS, inputs=True)
            handle = attach(model, side="port", config=config, output=folder / f"trace-{len(rows)}.h5")
        target = torch.compile(model) if compiled else model
        try:
            first = time_forwards(target, inputs, args, warmup=0, repeat=1)["median"]
            row = time_forwards(target, inputs, args, warmup=max(args.warmup - 1, 0), repeat=args.repeat,
                                first_step=1)
        finally:
            if handle is not None:
                handle.close()
        if handle is not None and handle.failures:
            raise Refused(f"{name}: the trace reports failures: {handle.failures}")
        row["first"] = first
        rows[name] = row
        for trace in folder.glob("trace-*.h5"):
            trace.unlink()
        print(f"  {name:<40} {row['median'] * 1e3:9.1f} ms  (first forward {first:.1f} s)", flush=True)

    measure("eager, untraced", False)
    measure("eager, default config, blocks", False, BLOCKS, True)
    measure("eager, default config, all modules", False, None, True)
    measure("compiled, untraced", True)
    measure("compiled, default config, blocks", True, BLOCKS, True)
    measure("compiled, default config, all modules", True, None, True)
    eager = rows["eager, untraced"]["median"]
    base = rows["compiled, untraced"]["median"]
    print()
    print("tracediff bench_overhead --compile")
    print(f"machine : {device_name(args)}, host {platform.node()}")
    print(f"date    : {now()}")
    print(f"command : {command()}")
    print(f"model   : {describe(args)}; torch.compile default (inductor); stats {DEFAULT_STATS} + module inputs")
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


# -- descriptions ------------------------------------------------------------------------------------------


def describe(args: argparse.Namespace) -> str:
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    shape = "smoke" if args.smoke else f"Wan {args.shape} shape"
    return (f"WanLikeModel ({shape}) {args.layers} blocks, dim {args.dim}, ffn {args.ffn_dim}, {args.heads} heads, "
            f"{tokens} video + {args.text_len} text tokens, {args.dtype} on {args.device}"
            + (", with an unrecordable probe module planted" if args.plant_failure else ""))


def device_name(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (torch {torch.__version__})"


def command() -> str:
    return f"python scripts/bench_overhead.py {' '.join(sys.argv[1:])}".rstrip()


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


if __name__ == "__main__":
    raise SystemExit(main())
