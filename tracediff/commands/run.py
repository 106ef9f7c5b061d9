"""``tracediff run``: from two models to a first-drift report in one command.

Three forms:
  ``tracediff run``                      the built-in demo (``--demo clean`` without its bug)
  ``tracediff run SPEC.toml [flags]``    a run spec; every spec field is also a flag
  ``tracediff run --side ref --out DIR -- python script.py ARGS``
                                         trace an unmodified script's models
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from tracediff.errors import SpecError
from tracediff.spec import FIELDS, RunSpec, apply_overrides, load_spec, spec_from_mapping

DEMO_CHOICES = ("clean", "gelu_tanh", "ln_eps", "rope_sign", "residual_scale")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="trace both sides of a run spec (default: the built-in demo) and report the first drift",
        description=__doc__.split("\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", nargs="*", metavar="SPEC | -- COMMAND",
                        help="run spec (TOML), or after '--' a Python command to trace (with --side)")
    parser.add_argument("--demo", nargs="?", const="gelu_tanh", choices=DEMO_CHOICES, metavar="BUG",
                        help=f"run the built-in demo with planted bug BUG ({', '.join(DEMO_CHOICES[1:])}; "
                             "default gelu_tanh) or 'clean' for none")
    parser.add_argument("--out", type=Path, help="output folder (default tracediff-out/<timestamp>/)")
    parser.add_argument("--force", action="store_true", help="overwrite traces already in --out")
    parser.add_argument("--isolate-sides", action="store_true", help="trace each side in its own Python process")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the terminal view")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress display")
    parser.add_argument("--bisect", action="store_true",
                        help="after the report, drill down to the module and operator that add the error "
                             "(teacher forcing, both models in memory; see docs/bisection.md)")
    parser.add_argument("--side", help="script mode: name of the side the command's models are traced as")
    parser.add_argument("--model-class", metavar="REGEX",
                        help="script mode: trace only top-level models whose class name matches")
    add_spec_flags(parser)
    parser.set_defaults(func=run)


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per run-spec field (``spec_from_args`` reads them back); shared with ``bisect``."""
    flags = parser.add_argument_group("run spec fields (a flag wins over the file; see docs/run-spec.md)")
    for spec_field in FIELDS:
        kwargs: dict[str, Any] = {"dest": f"spec__{spec_field.section}__{spec_field.key}", "help": spec_field.help}
        if spec_field.kind is dict:
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif spec_field.kind is bool:
            kwargs.update(type=_parse_bool, metavar="true|false")
        else:
            kwargs.update(type=spec_field.kind, metavar=spec_field.key.upper())
        flags.add_argument(spec_field.flag.replace("-kwargs", "-kwarg"), **kwargs)


def run(args: argparse.Namespace) -> int:
    if args.side is not None:
        return _run_script(args)
    if len(args.target) > 1:
        raise SpecError(f"expected one run spec, got {len(args.target)}: {' '.join(args.target)}")
    spec = spec_from_args(args)
    out_dir = _out_dir(args)
    from tracediff.session import run_session

    code = run_session(spec, out_dir, isolate_sides=args.isolate_sides, as_json=args.json,
                       progress=not args.no_progress, force=args.force)
    if args.bisect:
        from tracediff.bisect.integrate import bisect_after_run

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
    from tracediff.spec import tomllib

    text = resources.files("tracediff.demo").joinpath("demo.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    data["port"]["kwargs"] = {} if bug == "clean" else {"bug": bug}
    return spec_from_mapping(data, source=f"demo ({bug})", base_dir=Path.cwd())


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("tracediff-out") / stamp


def _parse_pairs(items: list[str], flag: str) -> dict[str, Any]:
    from tracediff.spec import tomllib

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
    if not command:
        raise SpecError("--side given but no command: put the command after '--', e.g. -- python generate.py")
    if args.out is None:
        raise SpecError("tracing a command needs --out DIR (where the traces go)")
    program = Path(command[0]).name
    if not (program.startswith("python") or command[0] == sys.executable):
        raise SpecError(f"can only trace Python commands ('python script.py …' or 'python -m module …'), "
                        f"got {command[0]!r}")
    rest = command[1:]
    if not rest:
        raise SpecError(f"the command {' '.join(command)!r} names no script or -m module to run")
    if rest[0] != "-m" and not Path(rest[0]).is_file():
        raise SpecError(f"script {rest[0]!r} does not exist")
    existing = sorted(args.out.glob(f"{args.side}.*.h5")) if args.out.is_dir() else []
    if existing and not args.force:
        raise SpecError(f"--out {str(args.out)!r} already holds {existing[0].name}; pass --force to overwrite it "
                        "or choose another folder")
    for path in existing:
        path.unlink()
    tracer = [sys.executable, "-m", "tracediff.script_tracer", "--side", args.side, "--out", str(args.out)]
    if args.model_class:
        tracer += ["--model-class", args.model_class]
    env = dict(os.environ)
    proc = subprocess.run([*tracer, "--", *rest], env=env)
    traces = sorted(args.out.glob(f"{args.side}.*.h5")) if args.out.is_dir() else []
    if proc.returncode != 0:
        print(f"tracediff run: the traced command exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode if proc.returncode != 1 else 2
    if not traces:
        raise SpecError(f"the command ran but called no model with parameters; nothing traced in {args.out}")
    for trace in traces:
        print(f"traced {trace}")
    return 0
