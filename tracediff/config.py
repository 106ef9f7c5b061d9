"""Tracing configuration: FastVideo's ``FASTVIDEO_TRACE_*`` variables, validated once.

FastVideo silently drops an unknown stat or ignores a bad regex; tracediff refuses
them at attach time instead, because a trace that quietly recorded nothing is
discovered only hours later, when the diff comes back empty.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracediff.errors import TraceConfigError
from tracediff.moments import DERIVED_STATS

ENV_ACTIVATIONS = "FASTVIDEO_TRACE_ACTIVATIONS"
ENV_LAYERS = "FASTVIDEO_TRACE_LAYERS"
ENV_STATS = "FASTVIDEO_TRACE_STATS"
ENV_STEPS = "FASTVIDEO_TRACE_STEPS"
ENV_OUTPUT = "FASTVIDEO_TRACE_OUTPUT"
ENV_SAMPLE_SIZE = "TRACEDIFF_SAMPLE_SIZE"
#: Allow ``attach`` to replace an existing trace file (docs/reliability.md).
ENV_OVERWRITE = "TRACEDIFF_OVERWRITE"
#: Which ranks of a ``torch.distributed`` run trace (docs/distributed.md); the FastVideo-style name is accepted too.
ENV_RANKS = "TRACEDIFF_TRACE_RANKS"
ENV_RANKS_FASTVIDEO = "FASTVIDEO_TRACE_RANKS"
#: Also record each traced module's tensor inputs, so first-drift can tell a module's own error
#: from one made before it ran, in its caller's code (docs/first-drift.md).
ENV_INPUTS = "TRACEDIFF_TRACE_INPUTS"

#: Stats FastVideo's own tracer accepts, with its default selection.
FASTVIDEO_STATS = ("abs_mean", "sum", "min", "max", "mean", "std", "shape", "dtype")
FASTVIDEO_DEFAULT_STATS = ("abs_mean", "sum")
#: tracediff's additions: norms, non-finite counts, and element-level captures.
EXTRA_STATS = ("l2", "nan_count", "inf_count", "sample", "full")
KNOWN_STATS = FASTVIDEO_STATS + EXTRA_STATS

DEFAULT_OUTPUT = "tracediff-trace-<side>-<pid>.h5"
DEFAULT_SAMPLE_SIZE = 256
#: Most step (or rank) numbers a list such as ``0-999`` may select: it is held as a set.
MAX_LISTED_STEPS = 1_000_000

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None


def names_predicate(names: NamesFilter, *, source: str = "layers") -> Callable[[str], bool]:
    """Turn every accepted layer-selection form into one predicate.

    Args:
        names: a regex (``re.search`` semantics, empty = all), a list of exact
            module names, a predicate, or ``None`` for all.
        source: what to call the value in an error message (an env var name or
            an argument name).

    Raises:
        TraceConfigError: the regex does not compile.
    """
    if names is None or names == "":
        return lambda name: True
    if callable(names):
        return names
    if isinstance(names, str):
        try:
            pattern = re.compile(names)
        except re.error as exc:
            raise TraceConfigError(
                f"{source}={names!r} is not a valid Python regex ({exc}); "
                r"use e.g. '^blocks\.\d+$', or leave it empty to trace every module"
            ) from None
        return lambda name: pattern.search(name) is not None
    wanted = frozenset(names)
    return lambda name: name in wanted


def check_layers_match(names: Sequence[str], layers: str | None, *, side: str, source: str) -> None:
    """Refuse a layer regex that selects none of a side's modules, before a trace of nothing is written.

    The two sides of a port name their modules differently by definition (``blocks.3``
    upstream, ``transformer_blocks.3`` in the port), so one regex for both often fits
    one side only; the message names the side, shows its real names and the per-side flag.

    Args:
        names: the side's module names (``named_modules()``; the root ``""`` is ignored).
        layers: the regex (``re.search``); empty or ``None`` selects everything.
        side: ``upstream`` or ``port``.
        source: the spec field the regex came from (``[trace] layers`` or ``[port] layers``).

    Raises:
        TraceConfigError: the regex does not compile, or matches no module of the side.
    """
    if not layers:
        return
    predicate = names_predicate(layers, source=source)
    modules = [name for name in names if name]
    if any(predicate(name) for name in modules):
        return
    shown = ", ".join(example_names(modules)) or "(it has no submodules)"
    flag = f"--{side}-layers"
    if source == "[trace] layers":
        hint = f"the sides' names differ: give the {side} its own regex with {flag} (or [{side}] layers)"
    else:
        hint = f"fix {flag} (or [{side}] layers), or leave it empty to trace every module"
    raise TraceConfigError(f"{source}='{layers}' matches no module of the {side} model "
                           f"({len(modules)} modules, e.g. {shown}); {hint}")


def example_names(names: Sequence[str], limit: int = 6) -> list[str]:
    """A few module names worth showing: the first of each repeated list (``blocks.0``), then top-level ones."""
    numbered: dict[str, list[str]] = {}
    for name in names:
        parent, _, last = name.rpartition(".")
        if last.isdigit():
            numbered.setdefault(parent, []).append(name)
    repeated = sorted((group for group in numbered.values() if len(group) > 1), key=len, reverse=True)
    picks = [group[0] for group in repeated[:1]]
    picks += [name for name in names if "." not in name and name not in picks]
    return picks[:limit]


def parse_bool(value: str | None, *, source: str = ENV_ACTIVATIONS, default: bool = False) -> bool:
    """FastVideo's master switch: unset or empty is ``default`` (off), ``0`` is off."""
    if value is None or not value.strip():
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise TraceConfigError(f"{source}={value!r} is not a switch value; use 1/true/on or 0/false/off")


def parse_stats(value: str | Iterable[str] | None, *, source: str = ENV_STATS) -> tuple[str, ...]:
    """Parse a comma list of stat names, keeping order and dropping repeats."""
    if value is None:
        return FASTVIDEO_DEFAULT_STATS
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [item.strip() for item in items if item.strip()]
    if not names:
        return FASTVIDEO_DEFAULT_STATS
    unknown = [name for name in names if name not in KNOWN_STATS]
    if unknown:
        raise TraceConfigError(
            f"{source}={_show(value)} has unknown stat {unknown[0]!r}; valid: {', '.join(KNOWN_STATS)}"
        )
    return tuple(dict.fromkeys(names))


def parse_steps(
    value: str | Iterable[int] | None, *, source: str = ENV_STEPS, what: str = "step"
) -> frozenset[int] | None:
    """Parse ``0,2,5-7`` into a set of step indices; empty means every step."""
    if value is None:
        return None
    if not isinstance(value, str):
        listed = list(value)
        bad = [s for s in listed if not isinstance(s, int) or isinstance(s, bool) or s < 0]
        if bad:
            raise TraceConfigError(f"{source}={listed!r} contains {bad[0]!r}; {what}s are integers >= 0")
        return frozenset(listed) if listed else None
    if not value.strip():
        return None
    steps: set[int] = set()
    for part in value.split(","):
        token = part.strip()
        if not token:
            continue
        match = re.fullmatch(r"([0-9]+)(?:\s*-\s*([0-9]+))?", token)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise TraceConfigError(
                f"{source}={value!r} has invalid item {token!r}; use {what} indices and "
                f"ascending ranges separated by commas, e.g. '{'0,2,10-12' if what == 'step' else '0,2-3'}'"
            )
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high - low + 1 + len(steps) > MAX_LISTED_STEPS:  # a typo such as 0-10000000000 must not fill the memory
            raise TraceConfigError(
                f"{source}={value!r} selects more than {MAX_LISTED_STEPS:,} {what}s (item {token!r}); "
                f"list at most {MAX_LISTED_STEPS:,}, or leave it empty for all"
            )
        steps.update(range(low, high + 1))
    return frozenset(steps)


def parse_sample_size(value: str | int | None, *, source: str = ENV_SAMPLE_SIZE) -> int:
    """How many elements the ``sample`` stat keeps per tensor."""
    if value is None or value == "":
        return DEFAULT_SAMPLE_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = -1
    if size < 1:
        raise TraceConfigError(f"{source}={value!r} is not a positive integer; use e.g. 256")
    return size


def parse_ranks(value: str | Iterable[int] | None, *, source: str = ENV_RANKS) -> frozenset[int] | None:
    """Parse ``0,2-3`` into the set of ranks that trace; empty means every rank."""
    return parse_steps(value, source=source, what="rank")


def resolve_output(template: str, *, side: str, rank: int = 0, pid: int | None = None) -> Path:
    """Fill ``<pid>``, ``<rank>`` and ``<side>`` into an output path template."""
    text = (
        template.replace("<pid>", str(os.getpid() if pid is None else pid))
        .replace("<rank>", str(rank))
        .replace("<side>", side)
    )
    return Path(text)


def check_output_writable(path: Path, *, source: str = ENV_OUTPUT) -> None:
    """Fail at attach time, not at the first flush an hour later."""
    if path.exists() and path.is_dir():
        raise TraceConfigError(f"{source}={str(path)!r} is a directory; give a file path ending in .h5")
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise TraceConfigError(
            f"{source}={str(path)!r}: directory {str(parent)!r} is not writable; "
            "choose a path in a writable directory"
        )


@dataclass(frozen=True)
class TraceConfig:
    """What to trace, validated. Build it with :meth:`from_env` or directly.

    Attributes:
        enabled: master switch; when false, ``attach`` registers no hook at all.
        layers: module selection (regex, list of names or predicate).
        stats: stat names, see :data:`KNOWN_STATS`.
        steps: step indices to record, ``None`` for all.
        output: output path template (``<pid>``, ``<rank>``, ``<side>`` placeholders).
        sample_size: elements kept per tensor by the ``sample`` stat.
        overwrite: replace an existing trace file at the output path (default: refuse).
        inputs: also record every traced module's tensor inputs (``input[0]``, ``input.x``),
            not only the model's own; doubles the records, and lets first-drift blame the
            caller's code when a module's input already differs.
    """

    enabled: bool = True
    layers: NamesFilter = None
    stats: tuple[str, ...] = FASTVIDEO_DEFAULT_STATS
    steps: frozenset[int] | None = None
    output: str = DEFAULT_OUTPUT
    sample_size: int = DEFAULT_SAMPLE_SIZE
    #: what to call the layer selection in error messages (env var or argument name)
    layers_source: str = "layers"
    #: ranks of a distributed run that trace, ``None`` for all (``TRACEDIFF_TRACE_RANKS``)
    ranks: frozenset[int] | None = None
    #: what to call the rank selection in error messages
    ranks_source: str = "ranks"
    #: replace an existing file at the output path (``TRACEDIFF_OVERWRITE``); off, attach refuses
    overwrite: bool = False
    #: record each traced module's inputs too (``TRACEDIFF_TRACE_INPUTS``)
    inputs: bool = False
    layer_predicate: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stats", parse_stats(self.stats, source="stats"))
        object.__setattr__(self, "steps", parse_steps(self.steps, source="steps"))
        object.__setattr__(self, "sample_size", parse_sample_size(self.sample_size, source="sample_size"))
        object.__setattr__(self, "layer_predicate", names_predicate(self.layers, source=self.layers_source))
        object.__setattr__(self, "ranks", parse_ranks(self.ranks, source=self.ranks_source))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> TraceConfig:
        """Read the ``FASTVIDEO_TRACE_*`` variables; keyword overrides win.

        Raises:
            TraceConfigError: naming the variable, its value and what is valid.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "enabled": parse_bool(env.get(ENV_ACTIVATIONS)),
            "layers": env.get(ENV_LAYERS) or None,
            "stats": parse_stats(env.get(ENV_STATS)),
            "steps": parse_steps(env.get(ENV_STEPS)),
            "output": env.get(ENV_OUTPUT) or DEFAULT_OUTPUT,
            "sample_size": parse_sample_size(env.get(ENV_SAMPLE_SIZE)),
            "overwrite": parse_bool(env.get(ENV_OVERWRITE), source=ENV_OVERWRITE),
            "inputs": parse_bool(env.get(ENV_INPUTS), source=ENV_INPUTS),
        }
        ranks_source, ranks = _ranks_from_env(env)
        if ranks is not None:
            values["ranks"], values["ranks_source"] = ranks, ranks_source
        if values["layers"] is not None:
            values["layers_source"] = ENV_LAYERS
        if overrides.get("layers") is not None:
            values["layers_source"] = "layers"
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def needs_moments(self) -> bool:
        return any(stat in DERIVED_STATS for stat in self.stats)

    @property
    def layers_description(self) -> str:
        """A printable form of the layer selection for trace metadata."""
        if self.layers is None or self.layers == "":
            return ""
        if isinstance(self.layers, str):
            return self.layers
        if callable(self.layers):
            return f"<predicate {getattr(self.layers, '__name__', 'callable')}>"
        return ",".join(self.layers)

    def wants_step(self, step: int) -> bool:
        return self.steps is None or step in self.steps


def _ranks_from_env(env: Mapping[str, str]) -> tuple[str, frozenset[int] | None]:
    """``TRACEDIFF_TRACE_RANKS``, or FastVideo's spelling; both set and different is an error."""
    ours, theirs = env.get(ENV_RANKS, "").strip(), env.get(ENV_RANKS_FASTVIDEO, "").strip()
    if ours and theirs and parse_ranks(ours) != parse_ranks(theirs, source=ENV_RANKS_FASTVIDEO):
        raise TraceConfigError(
            f"{ENV_RANKS}={ours!r} and {ENV_RANKS_FASTVIDEO}={theirs!r} disagree; set one of them"
        )
    if ours:
        return ENV_RANKS, parse_ranks(ours)
    if theirs:
        return ENV_RANKS_FASTVIDEO, parse_ranks(theirs, source=ENV_RANKS_FASTVIDEO)
    return ENV_RANKS, None


def _show(value: str | Iterable[object]) -> str:
    return repr(value if isinstance(value, str) else ",".join(map(str, value)))
