"""The tolerance model: how much difference between port and upstream is still "the same".

A :class:`Tolerance` has the two knobs of ``torch.testing.assert_close``
(``atol``, ``rtol``: an element fails when ``|port - ref| > atol + rtol * |ref|``)
plus two for traces that only hold statistics: ``stat_rtol``, the relative drift
a stat (abs-mean, L2 norm, max, ...) may show, and ``abs_mean_limit``, a bound on
the abs-mean drift that applies even when elements are compared (bf16 runs
tolerate large element errors but not a systematic shift in magnitude).

Presets and per-module overrides are plain data (:data:`PRESETS`,
:class:`Override`), never ``if`` chains, so a parity test can print exactly
what it applied. See docs/tolerance.md for how the numbers were chosen.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from tracediff.errors import DiffError

_FIELDS = ("atol", "rtol", "stat_rtol", "abs_mean_limit")


def _check_value(name: str, value: float | None, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise DiffError(f"tolerance {name}={value!r} must be a finite number >= 0")


def _num(value: float) -> str:
    return f"{value:.2g}"


@dataclass(frozen=True)
class Override:
    """Different tolerances for the modules whose name matches ``pattern``.

    Fields left ``None`` keep the base tolerance's value. The pattern is a Python
    regex applied with ``re.search`` to the port module name and to the upstream
    module name; either matching is enough, so a rule can be written in whichever
    naming the user knows.
    """

    pattern: str
    atol: float | None = None
    rtol: float | None = None
    stat_rtol: float | None = None
    abs_mean_limit: float | None = None
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "_regex", re.compile(self.pattern))
        except re.error as exc:
            raise DiffError(f"tolerance override {self.pattern!r} is not a valid regex ({exc})") from None
        for name in _FIELDS:
            _check_value(name, getattr(self, name), allow_none=True)

    def matches(self, *names: str | None) -> bool:
        return any(name is not None and self._regex.search(name) is not None for name in names)

    def changes(self) -> dict[str, float]:
        """The fields this override sets."""
        return {name: getattr(self, name) for name in _FIELDS if getattr(self, name) is not None}


@dataclass(frozen=True)
class Tolerance:
    """What counts as drift. Truthiness is not used; compare with :meth:`describe`.

    Attributes:
        atol: absolute tolerance per element (and the "is zero" scale of stats).
        rtol: relative tolerance per element, relative to the upstream value.
        stat_rtol: relative drift a stat may show when a record has no elements
            to compare (stats-only traces, FastVideo JSONL); ``None`` means ``rtol``.
        abs_mean_limit: relative abs-mean drift that fails a record even when its
            elements pass; ``None`` disables the check.
        overrides: per-module exceptions; the first matching override wins.
        name: preset name, or ``"custom"``.
    """

    atol: float = 1e-5
    rtol: float = 1.3e-6
    stat_rtol: float | None = None
    abs_mean_limit: float | None = None
    overrides: tuple[Override, ...] = ()
    name: str = "custom"

    def __post_init__(self) -> None:
        for item in _FIELDS:
            _check_value(item, getattr(self, item), allow_none=item in ("stat_rtol", "abs_mean_limit"))
        object.__setattr__(self, "overrides", tuple(self.overrides))

    @property
    def stat_limit(self) -> float:
        """The effective stat drift threshold (``stat_rtol``, else ``rtol``)."""
        return self.rtol if self.stat_rtol is None else self.stat_rtol

    def for_module(self, port: str | None, upstream: str | None = None) -> Tolerance:
        """The tolerance that applies to one module pair, overrides resolved.

        Returns:
            A tolerance without overrides; ``self`` (minus overrides) when none matches.
        """
        for override in self.overrides:
            if override.matches(port, upstream):
                changes = override.changes()
                return replace(
                    self,
                    overrides=(),
                    atol=changes.get("atol", self.atol),
                    rtol=changes.get("rtol", self.rtol),
                    stat_rtol=changes.get("stat_rtol", self.stat_rtol),
                    abs_mean_limit=changes.get("abs_mean_limit", self.abs_mean_limit),
                )
        return replace(self, overrides=()) if self.overrides else self

    def with_overrides(self, overrides: Iterable[Override]) -> Tolerance:
        """A copy with ``overrides`` tried before the existing ones."""
        return replace(self, overrides=(*overrides, *self.overrides))

    def describe(self) -> str:
        """One line for reports: ``preset fp32: atol 1e-05, rtol 1.3e-06, ...``."""
        parts = [f"atol {_num(self.atol)}", f"rtol {_num(self.rtol)}", f"stat drift {_num(self.stat_limit)}"]
        if self.abs_mean_limit is not None:
            parts.append(f"abs-mean drift {_num(self.abs_mean_limit)}")
        if self.overrides:
            parts.append(f"{len(self.overrides)} override(s)")
        prefix = f"preset {self.name}" if self.name != "custom" else "custom tolerance"
        return f"{prefix}: {', '.join(parts)}"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in _FIELDS}
        out["stat_rtol"] = self.stat_limit
        out["name"] = self.name
        out["overrides"] = [{"pattern": o.pattern, **o.changes()} for o in self.overrides]
        return out


#: Named tolerances for the scopes a parity test uses; docs/tolerance.md explains each.
PRESETS: Mapping[str, Tolerance] = {
    # torch.testing.assert_close's own float32 defaults: same math, same precision.
    "fp32": Tolerance(atol=1e-5, rtol=1.3e-6, stat_rtol=1e-5, name="fp32"),
    "single-block": Tolerance(atol=1e-4, rtol=1e-4, stat_rtol=1e-4, name="single-block"),
    "encoder": Tolerance(atol=1e-3, rtol=1e-3, stat_rtol=1e-3, name="encoder"),
    "dit-aligned": Tolerance(atol=1e-2, rtol=1e-2, stat_rtol=1e-2, name="dit-aligned"),
    "vae-fp32": Tolerance(atol=5e-2, rtol=5e-2, stat_rtol=5e-2, name="vae-fp32"),
    "dit-bf16": Tolerance(atol=0.1, rtol=0.1, stat_rtol=0.05, abs_mean_limit=0.05, name="dit-bf16"),
}
DEFAULT_PRESET = "fp32"


def preset(name: str) -> Tolerance:
    """Look up a preset by name.

    Raises:
        DiffError: unknown name; the message lists the valid ones.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise DiffError(f"unknown tolerance preset {name!r}; choose one of {', '.join(PRESETS)}") from None


#: Float dtypes at which the ``fp32`` preset is the honest yardstick (float64 parts, e.g. rotary tables, are fine).
FP32_DTYPES = frozenset(("float32", "float64"))


def resolve(*, preset_name: str | None = None, atol: float | None = None, rtol: float | None = None,
            overrides: Iterable[Override] = ()) -> Tolerance:
    """The one rule set every entry point applies (spec file, ``run``, ``first-drift``, ``bisect``, the plugin).

    A preset by name (the default preset without one), or ``atol`` and ``rtol`` together instead of a preset (the
    statistics then follow ``rtol``, an override's included, with no abs-mean limit); per-module overrides on top.

    Raises:
        ToleranceChoiceError: ``atol`` without ``rtol`` (or the reverse), or a preset and ``atol``/``rtol`` both.
        DiffError: an unknown preset, or a value that is not a finite number >= 0.
    """
    if (atol is None) != (rtol is None):
        raise ToleranceChoiceError("give atol and rtol together, or a preset")
    if preset_name is not None and atol is not None:
        raise ToleranceChoiceError("give either preset or atol/rtol, not both")
    if atol is not None and rtol is not None:
        base = Tolerance(atol=atol, rtol=rtol)
    else:
        base = preset(preset_name or DEFAULT_PRESET)
    overrides = list(overrides)
    return base.with_overrides(overrides) if overrides else base


class ToleranceChoiceError(DiffError):
    """A combination of tolerance settings the rule set refuses; callers prefix where it was given."""


def looser_than(tolerance: Tolerance, reference: Tolerance) -> bool:
    """Every knob of ``tolerance`` at least ``reference``'s and one of them larger (overrides ignored)."""
    mine = (tolerance.atol, tolerance.rtol, tolerance.stat_limit)
    theirs = (reference.atol, reference.rtol, reference.stat_limit)
    pairs = list(zip(mine, theirs, strict=True))
    return all(a >= b for a, b in pairs) and any(a > b for a, b in pairs)


def ran_in_fp32(dtypes: Iterable[str]) -> bool:
    """Whether a run's recorded floating dtypes (both sides) are float32, with no half-precision anywhere."""
    floats = {name.removeprefix("torch.") for name in dtypes if "float" in name or "half" in name}
    return "float32" in floats and floats <= FP32_DTYPES


def fp32_note(tolerance: Tolerance, *, dtypes: Iterable[str], passed: tuple[str, float] | None) -> str | None:
    """The line that says a loose preset hid an fp32 difference, or ``None``.

    A preset chosen for a bf16 or cross-kernel scope (``dit-aligned``, ``dit-bf16``...)
    hides real bugs when both sides actually ran in float32: a wrong GELU variant is
    ~50x the fp32 tolerance and still "no drift" under ``dit-aligned``. The run then
    says so instead of exiting 0 in silence.

    Args:
        tolerance: what the run applied.
        dtypes: the floating dtypes recorded on both sides.
        passed: the first record the ``fp32`` preset flags that ``tolerance`` passed, as
            (module name, its fp32 ``ratio``); ``None`` when there is none.
    """
    reference = PRESETS[DEFAULT_PRESET]
    if passed is None or not looser_than(tolerance, reference) or not ran_in_fp32(dtypes):
        return None
    module, ratio = passed
    chosen = f"preset {tolerance.name}" if tolerance.name != "custom" else (
        f"tolerance atol {_num(tolerance.atol)}, rtol {_num(tolerance.rtol)}")
    times = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
    return (f"note: {chosen} passed {module}, which the {reference.name} preset flags ({times}\u00d7 its tolerance); "
            f"both sides ran in float32 \u2014 use preset = \"{reference.name}\" for an fp32 parity test")


def parse_override(text: str) -> Override:
    """Parse the CLI form ``REGEX=key:value[,key:value...]``.

    The split is at the *last* ``=``, so a regex may itself contain ``=``
    (values never do). Keys are ``atol``, ``rtol``, ``stat_rtol``, ``abs_mean_limit``.

    Raises:
        DiffError: malformed text, unknown key or bad number.
    """
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern or not spec:
        raise DiffError(f"--override {text!r}: expected REGEX=key:value[,key:value], e.g. 'blocks\\.3\\.=atol:1e-3'")
    values: dict[str, float] = {}
    for item in spec.split(","):
        key, colon, raw = item.strip().partition(":")
        if not colon or key not in _FIELDS:
            raise DiffError(
                f"--override {text!r}: item {item.strip()!r} is not key:value with key in {', '.join(_FIELDS)}"
            )
        try:
            values[key] = float(raw)
        except ValueError:
            raise DiffError(f"--override {text!r}: {key} value {raw!r} is not a number") from None
    return Override(pattern, **values)

