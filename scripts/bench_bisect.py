"""Bisection at real size: a Wan 1.3B-shaped pair with one planted bug, timed and measured.

The pair is the bundled demo (tracediff/demo: a Wan-style upstream DiT and its
FastVideo-style port, weights converted through the port's real conversion map)
scaled to the Wan2.1 1.3B shape by default: 30 blocks, dim 1536, 12 heads, FFN
8960, a 16 x 21 x 60 x 104 latent (32,760 tokens: 81 frames at 480 x 832) and
512 text tokens. One bug is planted (``--bug``, default ``gelu_tanh``: block 2's
FFN uses exact GELU where upstream uses the tanh form).

The port's written-out softmax attention (the demo's portable backend) would
hold a 12 x 32760 x 32760 score matrix; at real size it runs through
``F.scaled_dot_product_attention`` instead (same math; ``--port-attention``).

Measured, through the public API (:func:`tracediff.bisect.bisect_models`):

* one plain forward of each model (the unit of "forward passes") and the peak
  memory of that forward with both models resident (the baseline);
* bisection as it runs by default, and with ``low_memory=True`` (the upstream
  outputs and inputs kept for teacher forcing held in CPU memory): wall time,
  forward passes and single-module calls, levels drilled, peak memory added over
  the baseline (CUDA ``max_memory_allocated`` on a GPU, peak RSS on the CPU),
  and whether the planted module was named.

Targets (issue 20): forward passes <= 2 x levels drilled; peak memory added <= 25 %.

Usage (GPU machine, repo root; tracediff need not be installed)::

    PYTHONPATH=. python scripts/bench_bisect.py --device cuda --dtype float32
    python scripts/bench_bisect.py --smoke          # tiny, CPU; tests/scripts/test_bench_scale.py runs this
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PASSES_PER_LEVEL_TARGET = 2.0
MEMORY_TARGET = 0.25


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="DiT blocks (default 30, Wan 1.3B)")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn-dim", type=int, default=8960)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (default 21: 81 video frames)")
    parser.add_argument("--height", type=int, default=60, help="latent height (default 60: 480 px)")
    parser.add_argument("--width", type=int, default=104, help="latent width (default 104: 832 px)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="both models' dtype (default float32: the planted bug stands far above round-off)")
    parser.add_argument("--bug", default="gelu_tanh", help="planted demo bug (default gelu_tanh)")
    parser.add_argument("--preset", default=None, help="tolerance preset (default: bisection's default)")
    parser.add_argument("--port-attention", choices=("sdpa", "written"), default="sdpa",
                        help="port attention: F.scaled_dot_product_attention (default) or the demo's written-out one")
    parser.add_argument("--modes", default="default,low_memory", help="comma list of: default, low_memory")
    parser.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks that it all runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.smoke:
        args.layers, args.dim, args.heads, args.ffn_dim, args.text_dim, args.text_len = 4, 64, 4, 128, 32, 8
        args.frames, args.height, args.width, args.device = 2, 8, 8, "cpu"
    from tracediff.demo.models import BUGS, DemoConfig, make_inputs, make_port, make_upstream

    if args.bug not in BUGS:
        raise SystemExit(f"unknown bug {args.bug!r}; choose one of {', '.join(BUGS)}")
    if args.port_attention == "sdpa":
        import tracediff.demo.port_dit as port_dit

        port_dit.scaled_dot_product = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    cfg = DemoConfig(
        in_channels=16, out_channels=16, dim=args.dim, num_heads=args.heads, depth=args.layers, ffn_dim=args.ffn_dim,
        freq_dim=256 if not args.smoke else 32, text_dim=args.text_dim, num_frames=args.frames, height=args.height,
        width=args.width, text_len=args.text_len,
    )
    t = time.perf_counter()
    upstream = make_upstream(0, cfg).to(device=device, dtype=dtype)
    port = make_port(0, cfg, bug=args.bug).to(device=device, dtype=dtype)
    raw = make_inputs(0, cfg, step=0)
    inputs = {k: (v.to(device=device, dtype=dtype) if k != "t" else v.to(device)) for k, v in raw.items()}
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in upstream.parameters())
    tokens = args.frames * (args.height // 2) * (args.width // 2)

    figures: dict[str, Any] = {
        "machine": _machine(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python scripts/bench_bisect.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": {"layers": args.layers, "dim": args.dim, "heads": args.heads, "ffn_dim": args.ffn_dim,
                  "tokens": tokens, "text_len": args.text_len, "dtype": args.dtype, "params_per_model": params},
        "bug": args.bug,
        "expected_culprit": BUGS[args.bug].port_module,
        "build_s": round(build_s, 1),
    }
    meter = _Meter(device)
    figures["forward"] = baseline(upstream, port, inputs, meter)
    figures["modes"] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        figures["modes"][mode] = run_bisect(upstream, port, inputs, meter, figures, low_memory=mode == "low_memory",
                                            preset=args.preset)
        if args.json:  # each mode's figures as soon as they exist: a run cut short still leaves them
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print_report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


# -- measuring ------------------------------------------------------------------------------------


class _Meter:
    """Peak memory of a stretch of work: CUDA allocator peak on a GPU, resident-set peak on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):  # Linux: writing 5 resets the peak RSS (VmHWM) to the current RSS
                Path("/proc/self/clear_refs").write_text("5")

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        return _proc_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return _proc_kib("VmHWM") * 1024

    def host_peak(self) -> int:
        return _proc_kib("VmHWM") * 1024


def _proc_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def baseline(upstream: torch.nn.Module, port: torch.nn.Module, inputs: dict[str, Any], meter: _Meter) -> dict:
    """One warm-up, then one timed plain forward of each model; the peak with both models resident."""
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, model in (("upstream", upstream), ("port", port)):
            model(**inputs)  # warm-up (kernels, allocator)
            meter.reset()
            resident = meter.current()
            meter.sync()
            t = time.perf_counter()
            model(**inputs)
            meter.sync()
            out[f"{name}_s"] = time.perf_counter() - t
            out[f"{name}_peak"] = meter.peak()
            out["resident"] = resident
    out["peak"] = max(out["upstream_peak"], out["port_peak"])
    return out


def run_bisect(upstream: torch.nn.Module, port: torch.nn.Module, inputs: dict[str, Any], meter: _Meter,
               figures: dict[str, Any], *, low_memory: bool, preset: str | None) -> dict[str, Any]:
    from tracediff.bisect import bisect_models

    meter.reset()
    meter.sync()
    t = time.perf_counter()
    result = bisect_models(upstream, port, inputs, tolerance=preset, low_memory=low_memory)
    meter.sync()
    wall = time.perf_counter() - t
    peak = meter.peak()
    base = figures["forward"]["peak"]
    forward_s = (figures["forward"]["upstream_s"] + figures["forward"]["port_s"]) / 2
    levels = len(result.path)
    culprit = result.culprit
    return {
        "wall_s": wall,
        "forward_passes": result.forward_passes,
        "module_calls": result.module_calls,
        "levels": levels,
        "passes_per_level": result.forward_passes / max(levels, 1),
        "wall_in_forwards": wall / forward_s if forward_s > 0 else float("nan"),
        "peak": peak,
        "added": peak - base,
        "added_fraction": (peak - base) / base if base else float("nan"),
        "host_peak": meter.host_peak(),
        "culprit": culprit,
        "culprit_ok": culprit == figures["expected_culprit"],
        "passes_pass": result.forward_passes <= PASSES_PER_LEVEL_TARGET * levels,
        "memory_pass": (peak - base) <= MEMORY_TARGET * base,
    }


def _machine(device: torch.device) -> str:
    host = f"{platform.node()} ({os.cpu_count()} CPUs), torch {torch.__version__}"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"{torch.cuda.get_device_name(device)} ({total:.0f} GiB), {host}"
    return f"CPU {platform.machine()}, {host}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_report(f: dict[str, Any]) -> None:
    s = f["shape"]
    fw = f["forward"]
    print()
    print("tracediff bench_bisect: bisection of a planted bug at real size")
    print(f"machine   : {f['machine']}")
    print(f"date      : {f['date']}")
    print(f"command   : {f['command']}".rstrip())
    print(f"model     : demo DiT pair, {s['layers']} blocks, dim {s['dim']}, {s['heads']} heads, ffn {s['ffn_dim']}, "
          f"{s['tokens']} tokens + {s['text_len']} text, {s['dtype']}, {s['params_per_model'] / 1e9:.3f} B params each "
          f"(built in {f['build_s']} s)")
    print(f"bug       : {f['bug']} (expected culprit {f['expected_culprit']})")
    print()
    print("| measurement | value |")
    print("|---|---|")
    print(f"| plain forward: upstream / port (s) | {fw['upstream_s']:.3f} / {fw['port_s']:.3f} |")
    print(f"| memory: both models resident / peak of a plain forward | {_gib(fw['resident'])} / {_gib(fw['peak'])} |")
    for mode, m in f["modes"].items():
        print(f"| {mode}: culprit | {m['culprit']} ({'ok' if m['culprit_ok'] else 'WRONG'}) |")
        print(f"| {mode}: wall time (s) / in plain forwards | {m['wall_s']:.2f} / {m['wall_in_forwards']:.1f} |")
        print(f"| {mode}: forward passes / levels / single-module calls | {m['forward_passes']} / {m['levels']} / "
              f"{m['module_calls']} |")
        print(f"| {mode}: peak memory / added over a plain forward | {_gib(m['peak'])} / {_gib(m['added'])} "
              f"({100 * m['added_fraction']:+.1f} %) |")
        print(f"| {mode}: host peak RSS | {_gib(m['host_peak'])} |")
        print(f"| {mode}: target forward passes <= 2 x levels | {'PASS' if m['passes_pass'] else 'MISS'} "
              f"({m['passes_per_level']:.1f} per level) |")
        print(f"| {mode}: target peak memory added <= 25 % | {'PASS' if m['memory_pass'] else 'MISS'} |")


if __name__ == "__main__":
    raise SystemExit(main())
