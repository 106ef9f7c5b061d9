"""``tracediff run``: from two models to a first-drift report in one command.

Three modes:
  ``tracediff run [--demo BUG]``          the built-in demo (``--demo clean`` without its bug)
  ``tracediff run SPEC.toml [flags]``    a run spec; every spec field is also a flag
  ``tracediff run --side ref --out DIR -- python script.py ARGS``
                                         trace an unmodified script's models

A flag that has no meaning in the chosen mode is refused, never ignored.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from tracediff.commands import command_parser
from tracediff.config import names_predicate, parse_sample_size, parse_stats, parse_steps
from tracediff.errors import SpecError, debug_enabled
from tracediff.pipeline.spec import FIELDS, RunSpec, apply_overrides, load_spec, spec_from_mapping, tomllib

DEMO_CHOICES = ("clean", "gelu_tanh", "ln_eps", "rope_sign", "residual_scale")
DEFAULT_OUT_ROOT = Path("tracediff-out")
#: Script mode's trace settings: the ``[trace]`` spec fields, passed on to ``tracediff.pipeline.script``.
SCRIPT_TRACE_FIELDS = ("layers", "stats", "steps", "sample_size", "inputs")
#: A side name as ``attach`` accepts it (it becomes part of the trace's file name).
_SIDE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

DESCRIPTION = """Trace both sides of a port, align their modules and report the first layer that computes something
different. Three modes; a flag that has no meaning in the chosen mode is refused, never ignored:

  demo mode     tracediff run [--demo BUG]
                the built-in Wan-style DiT pair, one planted bug (or --demo clean)
  spec mode     tracediff run SPEC.toml [flags]
                both sides from a run spec (docs/run-spec.md); every spec field is also a flag
  script mode   tracediff run --side NAME --out DIR -- python SCRIPT.py [ARGS]
                trace the models an unmodified script calls (one side per run), then compare the two
                sides' traces with tracediff first-drift

Exit codes: 0 no drift (script mode: traced), 1 drift found, 2 usage or input error."""

EXAMPLES = [
    ("tracediff run", "the demo: names the planted bug's module in about five seconds (exit 1)"),
    ("tracediff run --demo clean", "the demo without a bug: no drift (exit 0)"),
    ("tracediff run parity.toml --steps 1 --layers '^blocks\\.\\d+$'",
     "a run spec, one step, top-level blocks only (a flag wins over the file)"),
    ("tracediff run parity.toml --isolate-sides --bisect",
     "each side in its own process, then drill down to the module and operator that add the error"),
    ("tracediff run --side ref --out traces/ref -- python upstream/generate.py --steps 2",
     "trace the upstream's own script unmodified (then the port's with --side port, then first-drift)"),
    ("tracediff run --side port --out traces/port --stats abs_mean,l2,sample --trace-steps 0 -- python gen.py",
     "script mode honours the trace settings: these stats, the first step only"),
]


def register(subparsers: Any) -> None:
    parser = command_parser(
        subparsers,
        "run",
        help="trace both sides of a run spec (default: the built-in demo) and report the first drift",
        description=DESCRIPTION,
        examples=EXAMPLES,
    )
    parser.add_argument("target", nargs="*", metavar="SPEC | -- COMMAND",
                        help="run spec (TOML), or after '--' a Python command to trace (with --side)")
    common = parser.add_argument_group("every mode")
    common.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder (default: a new tracediff-out/<timestamp>/ for each run; "
                             "required in script mode)")
    common.add_argument("--force", action="store_true", help="overwrite traces already in --out")
    common.add_argument("--no-progress", action="store_true", help="do not show the progress display")
    demo = parser.add_argument_group("demo mode")
    demo.add_argument("--demo", nargs="?", const="gelu_tanh", choices=DEMO_CHOICES, metavar="BUG",
                      help=f"run the built-in demo with planted bug BUG ({', '.join(DEMO_CHOICES[1:])}; "
                           "default gelu_tanh) or 'clean' for none")
    both = parser.add_argument_group("demo and spec mode")
    both.add_argument("--isolate-sides", action="store_true", help="trace each side in its own Python process")
    both.add_argument("--json", action="store_true", help="print the report as JSON instead of the terminal view")
    both.add_argument("--bisect", action="store_true",
                      help="after the report, drill down to the module and operator that add the error "
                           "(teacher forcing, both models in memory; see docs/bisection.md)")
    add_spec_flags(parser, spec_title="demo and spec mode: run spec fields (a flag wins over the file; "
                                      "see docs/run-spec.md)",
                   trace_title="every mode: trace settings (script mode too; a flag wins over the file "
                               "and over FASTVIDEO_TRACE_*)")
    script = parser.add_argument_group("script mode")
    script.add_argument("--side", metavar="NAME",
                        help="trace the command's models as side NAME: any short name of letters, digits and "
                             "._- (e.g. ref, upstream, port); traces go to DIR/NAME.<ModelClass>.h5")
    script.add_argument("--model-class", metavar="REGEX",
                        help="trace only top-level models whose class name matches (default: every model "
                             "the script calls that has parameters and submodules)")
    parser.set_defaults(func=run)


def add_spec_flags(parser: argparse.ArgumentParser, *, spec_title: str | None = None,
                   trace_title: str | None = None) -> None:
    """One flag per run-spec field (``spec_from_args`` reads them back); shared with ``bisect``.

    The ``[trace]`` fields get a group of their own (``trace_title``), as ``run`` honours them in script mode too.
    """
    flags = parser.add_argument_group(spec_title or "run spec fields (a flag wins over the file; see docs/run-spec.md)")
    trace = parser.add_argument_group(trace_title) if trace_title else flags
    for spec_field in FIELDS:
        kwargs: dict[str, Any] = {"dest": f"spec__{spec_field.section}__{spec_field.key}", "help": spec_field.help}
        if spec_field.kind is dict:
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif spec_field.kind is bool:
            kwargs.update(type=_parse_bool, metavar="true|false")
        else:
            kwargs.update(type=spec_field.kind, metavar=spec_field.key.upper())
        group = trace if spec_field.section == "trace" else flags
        group.add_argument(spec_field.flag.replace("-kwargs", "-kwarg"), **kwargs)


def run(args: argparse.Namespace) -> int:
    if args.side is not None:
        return _run_script(args)
    if args.model_class is not None:
        raise SpecError("--model-class only applies to script mode (tracediff run --side NAME --out DIR -- python "
                        "SCRIPT.py); a run spec names its models by their factories")
    if len(args.target) > 1:
        raise SpecError(f"expected one run spec, got {len(args.target)}: {' '.join(args.target)}")
    spec = spec_from_args(args)
    default_out = args.out is None
    out_dir = _out_dir(args)
    from tracediff.pipeline.session import command_words, run_session  # lazy: rich's display stays off script mode

    try:
        code = run_session(spec, out_dir, isolate_sides=args.isolate_sides, as_json=args.json,
                           progress=not args.no_progress, force=args.force,
                           next_args=None if args.bisect else command_words(args))
    except BaseException:
        if default_out and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # the folder reserved for this run stayed empty: leave no trace of a failed start
        raise
    if args.bisect:
        from tracediff.pipeline.bisect import bisect_after_run  # lazy: torch only with --bisect

        code = max(code, bisect_after_run(spec, out_dir, as_json=args.json, stream=sys.stdout))
    return code


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The run spec a command line describes: the file (or the demo) with its flags applied, validated."""
    if args.target and args.demo:
        raise SpecError("give either a run spec or --demo, not both")
    spec = load_spec(args.target[0]) if args.target else demo_spec(args.demo or "gelu_tanh")
    overrides: dict[tuple[str, str], Any] = {}
    for spec_field in FIELDS:
        value = getattr(args, f"spec__{spec_field.section}__{spec_field.key}")
        if value is not None and spec_field.kind is dict:
            value = _parse_pairs(value, spec_field.flag)
        overrides[(spec_field.section, spec_field.key)] = value
    return apply_overrides(spec, overrides).validate()


def demo_spec(bug: str) -> RunSpec:
    """The bundled demo spec, with the chosen planted bug (or none for ``clean``)."""
    text = resources.files("tracediff.demo").joinpath("demo.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    data["port"]["kwargs"] = {} if bug == "clean" else {"bug": bug}
    return spec_from_mapping(data, source=f"demo ({bug})", base_dir=Path.cwd())


def _out_dir(args: argparse.Namespace) -> Path:
    return args.out if args.out is not None else new_out_dir()


def new_out_dir(root: Path = DEFAULT_OUT_ROOT) -> Path:
    """A fresh ``root/<timestamp>[-N]`` folder, created here so that runs started in the same second never share one.

    ``mkdir`` without ``exist_ok`` is atomic: of several processes trying the same name, exactly
    one creates it and the others move on to the next suffix.
    """
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for number in range(1, 10_000):
        path = root / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise SpecError(f"{str(root)!r} already holds 10,000 folders named {stamp}*; pass --out DIR")


def _parse_pairs(items: list[str], flag: str) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"{flag} {item!r}: expected KEY=VALUE (VALUE in TOML syntax, e.g. depth=4 or name=\"x\")")
        try:
            parsed[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key.strip()] = raw  # a bare word is taken as a string
    return parsed


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _run_script(args: argparse.Namespace) -> int:
    """Script mode: run an unmodified Python command with the models it calls traced."""
    command = list(args.target)
    if not args.side:
        raise SpecError("tracing a command needs --side NAME (e.g. --side ref) and --out DIR")
    if not _SIDE_NAME.match(args.side):
        raise SpecError(f"--side {args.side!r} is not a valid side name; use letters, digits and ._- "
                        "(e.g. ref, upstream, port)")
    _refuse_outside_script_mode(args)
    if not command:
        raise SpecError("--side given but no command: put the command after '--', e.g. -- python generate.py")
    if args.out is None:
        raise SpecError("tracing a command needs --out DIR (where the traces go)")
    if args.out.exists() and not args.out.is_dir():
        raise SpecError(f"--out {str(args.out)!r} is a file; give a folder for the traces")
    program = Path(command[0]).name
    if not (program.startswith("python") or command[0] == sys.executable):
        raise SpecError(f"can only trace Python commands ('python script.py …' or 'python -m module …'), "
                        f"got {command[0]!r}")
    rest = command[1:]
    if not rest:
        raise SpecError(f"the command {' '.join(command)!r} names no script or -m module to run")
    if rest[0] != "-m" and not Path(rest[0]).is_file():
        raise SpecError(f"script {rest[0]!r} does not exist")
    settings = _script_trace_settings(args)
    existing = sorted(args.out.glob(f"{args.side}.*.h5")) if args.out.is_dir() else []
    if existing and not args.force:
        raise SpecError(f"--out {str(args.out)!r} already holds {existing[0].name}; pass --force to overwrite it "
                        "or choose another folder")
    for path in existing:
        path.unlink()
    with tempfile.TemporaryDirectory(prefix="tracediff-script-") as scratch:
        status_file = Path(scratch) / "status.json"
        tracer = [sys.executable, "-m", "tracediff.pipeline.script", "--side", args.side, "--out", str(args.out),
                  "--status", str(status_file), *settings]
        if args.model_class:
            tracer += ["--model-class", args.model_class]
        proc = subprocess.run([*tracer, "--", *rest], env=dict(os.environ))
        status = json.loads(status_file.read_text()) if status_file.is_file() else None
    traces = sorted(args.out.glob(f"{args.side}.*.h5")) if args.out.is_dir() else []
    kept = f"; traces written before it: {', '.join(str(t) for t in traces)}" if traces else ""
    if status is None:
        raise SpecError(f"the traced command ended with exit status {proc.returncode} before tracediff could "
                        f"report (os._exit or a signal){kept}")
    if status["outcome"] == "error":
        raise SpecError(status["message"])
    if status["outcome"] == "raised":
        hint = "" if debug_enabled() else " (--debug shows the full traceback)"
        raise SpecError(f"the traced script raised {status['message']}{hint}{kept}")
    if status["outcome"] == "exit" and status["code"] != 0:
        raise SpecError(f"the traced command exited with code {status['code']} (tracediff exits 2 for any failure "
                        f"of the command; its own output above says why){kept}")
    if not traces:
        raise SpecError(f"the command ran but called no model with parameters; nothing traced in {args.out}")
    for trace in traces:
        print(f"traced {trace}")
    return 0


def _refuse_outside_script_mode(args: argparse.Namespace) -> None:
    """Script mode takes --out, --force, --model-class and the trace settings; any other flag is refused."""
    mode = "in script mode (--side): the script builds, loads and calls its models itself"
    given = [flag for flag, value in (("--demo", args.demo), ("--isolate-sides", args.isolate_sides),
                                      ("--json", args.json), ("--bisect", args.bisect)) if value]
    hints: dict[str, str] = {}
    for spec_field in FIELDS:
        if spec_field.section == "trace" and spec_field.key in SCRIPT_TRACE_FIELDS:
            continue
        if getattr(args, f"spec__{spec_field.section}__{spec_field.key}") is not None:
            flag = spec_field.flag.replace("-kwargs", "-kwarg")
            given.append(flag)
            if spec_field.section == "tolerance":
                hints[flag] = (f"; tolerances apply when the two traces are compared: "
                               f"tracediff first-drift REF.h5 PORT.h5 {flag} VALUE")
            elif flag == "--steps":
                hints[flag] = "; to record only some of the script's calls use --trace-steps (e.g. 0-2)"
    if given:
        flag = given[0]
        raise SpecError(f"{flag} does not apply {mode}{hints.get(flag, '')}. Script mode takes --out, --force, "
                        "--model-class and the trace settings --layers, --stats, --trace-steps, --sample-size, "
                        "--trace-inputs")


def _script_trace_settings(args: argparse.Namespace) -> list[str]:
    """The trace flags for ``tracediff.pipeline.script``, validated here so a mistake names the flag given."""
    out: list[str] = []
    layers = args.spec__trace__layers
    if layers is not None:
        names_predicate(layers, source="--layers")
        out += ["--layers", layers]
    if args.spec__trace__stats is not None:
        out += ["--stats", ",".join(parse_stats(args.spec__trace__stats, source="--stats"))]
    if args.spec__trace__steps is not None:
        parse_steps(args.spec__trace__steps, source="--trace-steps")
        out += ["--trace-steps", args.spec__trace__steps]
    if args.spec__trace__sample_size is not None:
        out += ["--sample-size", str(parse_sample_size(args.spec__trace__sample_size, source="--sample-size"))]
    if args.spec__trace__inputs is not None:
        out += ["--trace-inputs", "true" if args.spec__trace__inputs else "false"]
    return out
