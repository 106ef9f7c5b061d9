"""Run specs: the TOML file (and CLI flags) that say how to build and run both sides.

The file's sections and keys are a table of :class:`Field` rows, so the TOML
reader, the CLI flags and the documentation all come from one list. Every
mistake is a :class:`SpecError` naming the section and key.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracediff.errors import SpecError
from tracediff.tolerance import Tolerance, ToleranceChoiceError, resolve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SIDES = ("upstream", "port")
DEFAULT_STATS = "abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample"


@dataclass(frozen=True)
class Field:
    """One spec key: where it lives, its type, its CLI flag, what it means."""

    section: str
    key: str
    kind: type
    flag: str
    help: str


_SIDE_FIELDS = [
    ("factory", str, "Python factory 'pkg.module:function' or 'file.py:function' returning the model (required)"),
    ("kwargs", dict, "keyword arguments for the factory (TOML table; flag form KEY=VALUE, repeatable)"),
    ("weights", str, "local .safetensors file or folder of them, loaded into the built model"),
    ("hf", str, "Hugging Face model id resolved from the local cache only (offline)"),
    ("revision", str, "revision of the Hugging Face model id"),
    ("convert", str, "'module:function' turning the loaded state dict into this side's names"),
    ("strict", bool, "load weights with strict=True (default true)"),
    ("call", str, "how to call the model: a method name, or 'module:function(model, inputs)'; default model(**inputs)"),
    ("context", str, "'module:function(inputs)' returning the context manager every forward must run in "
                     "(FastVideo: set_forward_context); entered around each call, bisection's included"),
    ("device", str, "device for this side (overrides [run] device)"),
    ("dtype", str, "dtype for this side (overrides [run] dtype)"),
    ("layers", str, "regex of this side's module names to trace (overrides [trace] layers; the sides' names "
                    "usually differ)"),
]

FIELDS: list[Field] = [
    *(Field(side, key, kind, f"--{side}-{key.replace('_', '-')}", text) for side in SIDES
      for key, kind, text in _SIDE_FIELDS),
    Field("inputs", "factory", str, "--inputs-factory", "'module:function' giving one step's inputs (required)"),
    Field("inputs", "kwargs", dict, "--inputs-kwarg", "keyword arguments for the inputs factory"),
    Field("run", "device", str, "--device", "device for both sides (default cpu)"),
    Field("run", "dtype", str, "--dtype", "dtype for both sides' parameters and floating inputs (default: as built)"),
    Field("run", "seed", int, "--seed", "seed for torch and the factories (default 0)"),
    Field("run", "steps", int, "--steps", "number of denoising steps = calls of each model (default 1)"),
    Field("align", "map", str, "--map", "mapping file (TOML/JSON) of upstream→port module names"),
    Field("align", "param_map", str, "--param-map", "checkpoint param_names_mapping: a file or 'module:ATTR'"),
    Field("tolerance", "preset", str, "--preset", "tolerance preset (see docs/tolerance.md)"),
    Field("tolerance", "atol", float, "--atol", "absolute tolerance (with --rtol, instead of a preset)"),
    Field("tolerance", "rtol", float, "--rtol", "relative tolerance"),
    Field("trace", "layers", str, "--layers", "regex of module names to trace on both sides (default: all); "
          "--upstream-layers/--port-layers set one side's"),
    Field("trace", "stats", str, "--stats", f"comma list of stats (default {DEFAULT_STATS})"),
    Field("trace", "steps", str, "--trace-steps", "steps to record, e.g. '0,2-4' (default: all)"),
    Field("trace", "sample_size", int, "--sample-size", "elements kept per tensor by the sample stat"),
    Field("trace", "inputs", bool, "--trace-inputs",
          "also record every module's inputs, to tell a module's own error from its caller's (default true)"),
]
_BY_SECTION: dict[str, dict[str, Field]] = {}
for _field in FIELDS:
    _BY_SECTION.setdefault(_field.section, {})[_field.key] = _field


@dataclass(frozen=True)
class SideSpec:
    """How to build and call one side."""

    name: str
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    hf: str | None = None
    revision: str | None = None
    convert: str | None = None
    strict: bool = True
    call: str | None = None
    context: str | None = None
    device: str | None = None
    dtype: str | None = None
    #: this side's layer regex; ``None`` follows ``[trace] layers``, ``""`` traces every module
    layers: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """A whole run: both sides, inputs, steps, alignment, tolerance, trace settings."""

    upstream: SideSpec
    port: SideSpec
    inputs_factory: str | None = None
    inputs_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str | None = None
    seed: int = 0
    steps: int = 1
    map: str | None = None
    param_map: str | None = None
    preset: str | None = None
    atol: float | None = None
    rtol: float | None = None
    layers: str = ""
    stats: str = DEFAULT_STATS
    trace_steps: str | None = None
    sample_size: int | None = None
    trace_inputs: bool = True
    base_dir: Path = Path(".")
    source: str = "<flags>"

    def side(self, name: str) -> SideSpec:
        return self.upstream if name == "upstream" else self.port

    def layers_for(self, name: str) -> tuple[str, str]:
        """A side's layer regex and the spec field it came from: ``[SIDE] layers``, else ``[trace] layers``."""
        own = self.side(name).layers
        return (own, f"[{name}] layers") if own is not None else (self.layers, "[trace] layers")

    def validate(self) -> RunSpec:
        """Check what every run needs; return self for chaining.

        Raises:
            SpecError: a required field is missing or a value is out of range.
        """
        for side in SIDES:
            spec = self.side(side)
            if not spec.factory:
                raise SpecError(f"{self.source}: [{side}] factory is required "
                                f"(e.g. factory = \"mypkg.models:build_{side}\", or --{side}-factory)")
            if spec.weights and spec.hf:
                raise SpecError(f"{self.source}: [{side}] has both weights and hf; give one source of weights")
        if not self.inputs_factory:
            raise SpecError(f"{self.source}: [inputs] factory is required "
                            "(a function returning a dict of model inputs, or --inputs-factory)")
        if self.steps < 1:
            raise SpecError(f"{self.source}: [run] steps={self.steps} must be >= 1")
        self.tolerance()
        return self

    def tolerance(self) -> Tolerance:
        """The ``[tolerance]`` the run applies, by the one rule set (:func:`tracediff.tolerance.resolve`).

        Raises:
            SpecError: atol without rtol (or the reverse), or a preset and atol/rtol both.
            DiffError: an unknown preset, or a value that is not a finite number >= 0.
        """
        try:
            return resolve(preset_name=self.preset, atol=self.atol, rtol=self.rtol)
        except ToleranceChoiceError as exc:
            raise SpecError(f"{self.source}: [tolerance] {exc}") from None


def spec_path(value: str | None, base: Path) -> str | None:
    """Resolve a spec-relative file path (``map``, ``param_map``); leave 'module:ATTR' references alone."""
    if value is None:
        return None
    candidate = Path(value)
    if not candidate.is_absolute() and (base / candidate).exists():
        return str(base / candidate)
    return value


def load_spec(path: str | Path) -> RunSpec:
    """Read and check a TOML run spec.

    Raises:
        SpecError: file missing or unparsable, unknown section or key, wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: run spec not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    return spec_from_mapping(data, source=str(path), base_dir=path.resolve().parent)


def spec_from_mapping(data: Mapping[str, Any], *, source: str, base_dir: Path) -> RunSpec:
    """Build a spec from parsed TOML, checking every section, key and type."""
    values: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        known = _BY_SECTION.get(section)
        if known is None:
            raise SpecError(f"{source}: unknown section [{section}]; valid sections: {', '.join(_BY_SECTION)}")
        if not isinstance(table, Mapping):
            raise SpecError(f"{source}: [{section}] must be a table, got {type(table).__name__}")
        for key, value in table.items():
            spec_field = known.get(key)
            if spec_field is None:
                raise SpecError(f"{source}: unknown key {key!r} in [{section}]; valid keys: {', '.join(known)}")
            values.setdefault(section, {})[key] = _check_type(spec_field, value, source)
    return _build(values, source=source, base_dir=base_dir)


def apply_overrides(spec: RunSpec, overrides: Mapping[tuple[str, str], Any]) -> RunSpec:
    """Apply CLI flag values (``(section, key) -> value``); a flag wins over the file."""
    values = _to_sections(spec)
    for (section, key), value in overrides.items():
        if value is None:
            continue
        spec_field = _BY_SECTION[section][key]
        if spec_field.kind is dict:
            merged = dict(values.get(section, {}).get(key, {}))
            merged.update(value)
            value = merged
        values.setdefault(section, {})[key] = _check_type(spec_field, value, spec_field.flag)
    return _build(values, source=spec.source, base_dir=spec.base_dir)


def _build(values: dict[str, dict[str, Any]], *, source: str, base_dir: Path) -> RunSpec:
    sides = {side: SideSpec(name=side, **values.get(side, {})) for side in SIDES}
    run = values.get("run", {})
    trace = values.get("trace", {})
    tolerance = values.get("tolerance", {})
    align = values.get("align", {})
    inputs = values.get("inputs", {})
    return RunSpec(
        upstream=sides["upstream"],
        port=sides["port"],
        inputs_factory=inputs.get("factory"),
        inputs_kwargs=dict(inputs.get("kwargs", {})),
        device=run.get("device", "cpu"),
        dtype=run.get("dtype"),
        seed=run.get("seed", 0),
        steps=run.get("steps", 1),
        map=align.get("map"),
        param_map=align.get("param_map"),
        preset=tolerance.get("preset"),
        atol=tolerance.get("atol"),
        rtol=tolerance.get("rtol"),
        layers=trace.get("layers", ""),
        stats=trace.get("stats", DEFAULT_STATS),
        trace_steps=trace.get("steps"),
        sample_size=trace.get("sample_size"),
        trace_inputs=trace.get("inputs", True),
        base_dir=base_dir,
        source=source,
    )


def _to_sections(spec: RunSpec) -> dict[str, dict[str, Any]]:
    values: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        side_spec = spec.side(side)
        values[side] = {key: getattr(side_spec, key) for key in _BY_SECTION[side]}
    values["inputs"] = {"factory": spec.inputs_factory, "kwargs": spec.inputs_kwargs}
    values["run"] = {"device": spec.device, "dtype": spec.dtype, "seed": spec.seed, "steps": spec.steps}
    values["align"] = {"map": spec.map, "param_map": spec.param_map}
    values["tolerance"] = {"preset": spec.preset, "atol": spec.atol, "rtol": spec.rtol}
    values["trace"] = {"layers": spec.layers, "stats": spec.stats, "steps": spec.trace_steps,
                       "sample_size": spec.sample_size, "inputs": spec.trace_inputs}
    return {section: {k: v for k, v in table.items() if v is not None} for section, table in values.items()}


def _check_type(spec_field: Field, value: Any, source: str) -> Any:
    kind = spec_field.kind
    where = f"[{spec_field.section}] {spec_field.key}"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise SpecError(f"{source}: {where}={value!r} must be an integer")
    if not isinstance(value, kind):
        raise SpecError(f"{source}: {where}={value!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}[kind]

