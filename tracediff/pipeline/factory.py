"""Resolve ``package.module:attr`` and ``path/to/file.py:attr`` references.

Run specs name user code this way (model factories, input builders, call
functions, param maps). Every failure names the spec field and the reference,
because "ModuleNotFoundError: No module named 'upstream'" alone does not say
which of six references in a spec was wrong.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tracediff.errors import SpecError, describe_user_error


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


def call_with_supported(
    fn: Callable[..., Any],
    offered: Mapping[str, Any],
    *,
    field: str,
    user: Mapping[str, Any] | None = None,
    user_field: str | None = None,
) -> Any:
    """Call ``fn`` with the framework's ``offered`` arguments it accepts, plus every ``user`` argument.

    Factories differ (``make_inputs(seed, step)`` vs ``make_inputs(step)``); the
    runner offers ``seed``/``step``/``device``/``dtype`` and each takes what it knows
    (a callable whose signature cannot be read gets none of them). What the user
    wrote (a spec's ``kwargs``, ``--port-kwarg``) is never dropped: a key the
    function does not take is an error (:func:`check_kwargs`), because a misspelt
    ``bugg = ...`` silently ignored gives a clean run of the wrong model. User
    values win over offered ones of the same name. Exceptions raised by the
    user's code are turned into a SpecError naming the field.
    """
    user = dict(user or {})
    check_kwargs(fn, user, field=user_field or field)
    parameters = _parameters(fn)
    takes_any = parameters is not None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = _keyword_names(parameters)
    chosen = {key: value for key, value in offered.items() if takes_any or key in accepted}
    chosen.update(user)
    try:
        return fn(**chosen)
    except SpecError:
        raise
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SpecError(f"{field}: {name}({_args(chosen)}) raised {describe_user_error(exc)}") from exc


def check_kwargs(fn: Callable[..., Any], user: Mapping[str, Any], *, field: str) -> None:
    """Refuse keyword arguments ``fn`` cannot take, before anything runs.

    A function with ``**kwargs`` (or one whose signature cannot be read) takes anything.

    Raises:
        SpecError: one line naming ``field``, the unknown key(s), a close match when
            there is one, the valid names and the signature.
    """
    parameters = _parameters(fn)
    if parameters is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = _keyword_names(parameters)
    unknown = [key for key in user if key not in accepted]
    if not unknown:
        return
    name = getattr(fn, "__name__", None) or repr(fn)
    keys = ", ".join(repr(key) for key in unknown)
    guesses = {key: close[0] for key in unknown
               if (close := difflib.get_close_matches(key, accepted, n=1, cutoff=0.6))}
    if len(unknown) == 1 and guesses:
        hint = f" (did you mean {next(iter(guesses.values()))!r}?)"
    elif guesses:
        hint = " (did you mean " + ", ".join(f"{v!r} for {k!r}" for k, v in guesses.items()) + "?)"
    else:
        hint = ""
    valid = ", ".join(accepted) if accepted else "none (it takes no keyword arguments)"
    raise SpecError(f"{field}: {name}() has no parameter{'s' if len(unknown) > 1 else ''} {keys}{hint}; "
                    f"valid keys: {valid} (signature {_signature_text(fn, name)})")


def _parameters(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None


def _keyword_names(parameters: Mapping[str, inspect.Parameter] | None) -> list[str]:
    """Parameters that can be passed by keyword (not positional-only, not ``*args``/``**kwargs``)."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name, p in (parameters or {}).items() if p.kind in keyword]


def _signature_text(fn: Callable[..., Any], name: str) -> str:
    """``name(a, b=1, *, c=None)``: annotations left out, they are long and often strings."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return name
    empty = inspect.Parameter.empty
    bare = signature.replace(parameters=[p.replace(annotation=empty) for p in signature.parameters.values()],
                             return_annotation=inspect.Signature.empty)
    text = f"{name}{bare}"
    return text if len(text) <= 300 else text[:297] + "..."


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
