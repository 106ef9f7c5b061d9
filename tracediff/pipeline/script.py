"""Trace a Python script that knows nothing of tracediff.

``python -m tracediff.pipeline.script --side ref --out DIR -- script.py ARGS…``
runs the script in this process with a global forward pre-hook. The first time
a module is called while no other module is running, and it owns parameters,
it is taken to be one of the script's models: the recorder is attached to it
and writes ``DIR/<side>.<ModelClass>.h5``. Each later top-level call of that
model counts as one step. The script's source is never touched.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import re
import runpy
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tracediff.config import ENV_INPUTS, ENV_STATS, TraceConfig, parse_bool
from tracediff.errors import TracediffError, debug_enabled, describe_user_error
from tracediff.hooks import TraceHandle, attach
from tracediff.pipeline.spec import DEFAULT_STATS

_depth = threading.local()


class ScriptTracer:
    """Attaches the recorder to every model a script calls at top level."""

    def __init__(self, *, side: str, out_dir: Path, config: TraceConfig, model_filter: re.Pattern[str] | None) -> None:
        self.side = side
        self.out_dir = out_dir
        self.config = config
        self.model_filter = model_filter
        self.handles: dict[int, TraceHandle] = {}
        self.skipped: set[int] = set()
        self._late_inputs: set[int] = set()
        self._hooks: list[Any] = []

    def install(self) -> None:
        self._hooks.append(nn.modules.module.register_module_forward_pre_hook(self._pre))
        self._hooks.append(
            nn.modules.module.register_module_forward_hook(self._post, with_kwargs=True, always_call=True)
        )
        atexit.register(self.close)

    def _pre(self, module: nn.Module, args: Any) -> None:
        depth = getattr(_depth, "value", 0)
        _depth.value = depth + 1
        if depth or id(module) in self.handles or id(module) in self.skipped:
            return
        if not self._is_model(module):
            self.skipped.add(id(module))
            return
        name = type(module).__name__
        taken = {handle.path.name for handle in self.handles.values() if handle.path}
        filename = f"{self.side}.{name}.h5"
        counter = 1
        while filename in taken:
            counter += 1
            filename = f"{self.side}.{name}.{counter}.h5"
        # 'tracediff run --side' has already refused (or, with --force, removed) earlier traces in --out.
        handle = attach(module, side=self.side, config=self.config, output=self.out_dir / filename, overwrite=True)
        self.handles[id(module)] = handle
        # The recorder's root pre-hook was registered during this very call, too late for
        # torch to run it now: start the step here, and record the inputs (keyword ones
        # included, which a global pre-hook cannot see) when the call returns.
        recorder = handle.recorder
        if recorder is not None:
            recorder.begin_call(module, args, {}, record_inputs=False)
            self._late_inputs.add(id(module))

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any = None) -> None:
        # (torch calls an always_call hook without the output when the forward raised)
        _depth.value = max(getattr(_depth, "value", 1) - 1, 0)
        if id(module) in self._late_inputs:
            self._late_inputs.discard(id(module))
            recorder = self.handles[id(module)].recorder
            if recorder is not None:
                recorder.record_late_inputs(args, kwargs)

    def _is_model(self, module: nn.Module) -> bool:
        if self.model_filter is not None:
            return self.model_filter.search(type(module).__name__) is not None
        return next(module.parameters(), None) is not None and next(module.children(), None) is not None

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for handle in self.handles.values():
            handle.close()


def main(argv: list[str] | None = None) -> int:
    """Run the script traced; report how it ended in ``--status`` (for ``tracediff run``) and the exit code."""
    parser = argparse.ArgumentParser(prog="python -m tracediff.pipeline.script")
    parser.add_argument("--side", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model-class", default=None)
    parser.add_argument("--status", type=Path, default=None, help="JSON file telling the parent how the script ended")
    parser.add_argument("--layers", default=None)
    parser.add_argument("--stats", default=None)
    parser.add_argument("--trace-steps", default=None)
    parser.add_argument("--sample-size", default=None)
    parser.add_argument("--trace-inputs", default=None)
    parser.add_argument("target", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    target = [item for item in args.target if item != "--"] if args.target[:1] == ["--"] else args.target
    report = _Status(args.status)
    try:
        tracer = ScriptTracer(
            side=args.side,
            out_dir=args.out,
            config=script_config(args),
            model_filter=re.compile(args.model_class) if args.model_class else None,
        )
    except TracediffError as exc:
        return report.error(str(exc))
    except re.error as exc:
        return report.error(f"--model-class {args.model_class!r} is not a valid Python regex ({exc})")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return report.error(f"--out {str(args.out)!r}: cannot create the folder ({exc.strerror or exc})")
    tracer.install()
    sys.argv = list(target)
    try:
        if target[0] == "-m":
            sys.argv = target[1:]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(target[0]).resolve().parent))
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return report.exit(exc.code or 0)
        print(exc.code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1
        return report.exit(1)
    except KeyboardInterrupt:
        report.exit(130)
        raise
    except TracediffError as exc:  # raised by tracediff's own hooks while the script ran (e.g. attach refused)
        if debug_enabled():
            traceback.print_exc()
        return report.error(str(exc))
    except Exception as exc:
        if debug_enabled():
            traceback.print_exc()
        return report.raised(describe_user_error(exc))
    finally:
        tracer.close()
    return report.exit(0)


def script_config(args: argparse.Namespace) -> TraceConfig:
    """The trace settings of ``tracediff run``'s flags; then ``FASTVIDEO_TRACE_*``; then ``run``'s defaults.

    Script mode records what every other ``run`` mode records by default (the stats of
    ``tracediff.pipeline.spec.DEFAULT_STATS``, module inputs), not FastVideo's two stats.
    """
    inputs = (parse_bool(args.trace_inputs, source="--trace-inputs") if args.trace_inputs is not None
              else parse_bool(os.environ.get(ENV_INPUTS), source=ENV_INPUTS, default=True))
    stats = args.stats if args.stats is not None else (os.environ.get(ENV_STATS) or DEFAULT_STATS)
    overrides: dict[str, Any] = {"enabled": True, "inputs": inputs, "stats": stats}
    if args.layers is not None:
        overrides["layers"] = args.layers or None
    if args.trace_steps is not None:
        overrides["steps"] = args.trace_steps
    if args.sample_size is not None:
        overrides["sample_size"] = args.sample_size
    config = TraceConfig.from_env(**overrides)
    if args.layers:
        config = dataclasses.replace(config, layers_source="--layers")
    return config


class _Status:
    """How the traced script ended, written for ``tracediff run``; the exit code is 2 for any failure."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def _write(self, **data: Any) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(data))

    def exit(self, code: int) -> int:
        self._write(outcome="exit", code=code)
        return code

    def raised(self, message: str) -> int:
        self._write(outcome="raised", message=message)
        if self.path is None:
            print(f"tracediff run: error: the traced script raised {message}", file=sys.stderr)
        return 2

    def error(self, message: str) -> int:
        self._write(outcome="error", message=message)
        if self.path is None:
            print(f"tracediff run: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
