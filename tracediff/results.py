"""One protocol for every result tracediff returns, and one JSON encoder for all of them.

A diff, an analysis, a pre-flight check, a bisection, a traced side: each answers the same two questions the same
way. ``bool(result)`` is True when the comparison found nothing wrong (so ``assert result`` reads as a parity
check), and ``result.to_json()`` gives a JSON-ready dict. Every ``to_json`` builds its dict from plain values and
passes it through :func:`json_ready`, so NaN, infinities, numpy scalars, tuples and paths come out the same
everywhere (JSON has no NaN: a number that is not finite is ``null``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Result(Protocol):
    """What every result type offers: truthy when clean, and one JSON view."""

    def __bool__(self) -> bool: ...

    def to_json(self) -> dict[str, Any]: ...


def finite_or_none(value: float | None) -> float | None:
    """A float JSON can hold: ``None`` for a missing, NaN or infinite value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_ready(value: Any) -> Any:
    """``value`` as plain JSON types: dicts with string keys, lists, str, int, finite float, bool or None.

    Results nested inside (anything with ``to_json``) are encoded by their own ``to_json``; dataclasses without one
    become dicts of their fields.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # bool handled above; numpy ints are not ints, see below
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return json_ready(to_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: json_ready(getattr(value, field.name)) for field in dataclasses.fields(value)}
    item = getattr(value, "item", None)  # numpy (and torch) scalars, without importing either
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return json_ready(item())
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return json_ready(tolist())
    raise TypeError(f"{type(value).__name__} is not JSON-ready: give it a to_json() method")
