"""Resolve ``package.module:attr`` and ``path/to/file.py:attr`` references.

Run specs name user code this way (model factories, input builders, call
functions, param maps). Every failure names the spec field and the reference,
because "ModuleNotFoundError: No module named 'upstream'" alone does not say
which of six references in a spec was wrong.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tracediff.errors import SpecError


def resolve(reference: str, *, field: str, base: Path | None = None) -> Any:
    """Import the object a reference names.

    Args:
        reference: ``pkg.mod:attr`` (``attr`` may be dotted) or ``file.py:attr``.
        field: spec field the reference came from, for error messages.
        base: directory that relative file paths are resolved against (the spec's).

    Raises:
        SpecError: malformed reference, module or file not importable, attribute missing.
    """
    if not isinstance(reference, str) or ":" not in reference:
        raise SpecError(f"{field}={reference!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    target, _, attr = reference.rpartition(":")
    if not target or not attr:
        raise SpecError(f"{field}={reference!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    module = _load_file(target, field, reference, base) if target.endswith(".py") else _import(target, field, reference)
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise SpecError(f"{field}={reference!r}: {target} has no attribute {attr!r}") from None
    return value


def call_with_supported(fn: Callable[..., Any], kwargs: Mapping[str, Any], *, field: str) -> Any:
    """Call ``fn`` with the keyword arguments its signature accepts.

    Factories differ (``make_inputs(seed, step)`` vs ``make_inputs(step)``); the
    runner offers ``seed``/``step``/``device``/``dtype`` and each takes what it knows.
    Exceptions raised by the user's code are turned into a SpecError naming the field.
    """
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    chosen = {key: value for key, value in kwargs.items() if takes_any or key in parameters}
    try:
        return fn(**chosen)
    except SpecError:
        raise
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SpecError(f"{field}: {name}({_args(chosen)}) raised {type(exc).__name__}: {_first_line(exc)}") from exc


def _import(target: str, field: str, reference: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise SpecError(f"{field}={reference!r}: cannot import {target!r} ({exc})") from None
    except Exception as exc:
        raise SpecError(f"{field}={reference!r}: importing {target!r} raised {type(exc).__name__}: "
                        f"{_first_line(exc)}") from exc


def _load_file(target: str, field: str, reference: str, base: Path | None) -> Any:
    path = Path(target)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise SpecError(f"{field}={reference!r}: file {str(path)!r} does not exist")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"_tracediff_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"{field}={reference!r}: {str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise SpecError(f"{field}={reference!r}: running {str(path)!r} raised {type(exc).__name__}: "
                        f"{_first_line(exc)}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _args(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if not hasattr(v, "shape"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"
