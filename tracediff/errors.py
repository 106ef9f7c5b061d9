"""The few error types tracediff raises on purpose.

Every expected failure (bad configuration, unreadable trace, unusable mapping)
is one of these, so the CLI can print a single line and exit 2 instead of a
traceback. Messages name the offending value and say what would be valid.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback
from pathlib import Path


class TracediffError(Exception):
    """Base class: an expected, user-facing failure."""


class TraceConfigError(TracediffError, ValueError):
    """A tracing setting (env var or argument) cannot be honoured."""


class TraceFormatError(TracediffError):
    """A file is not a readable tracediff trace of a supported version."""


class AlignmentError(TracediffError):
    """A mapping file or rule cannot be applied."""


class SpecError(TracediffError):
    """A run spec (TOML file or CLI flags) is incomplete or wrong."""


class DiffError(TracediffError):
    """Two traces cannot be compared (nothing aligned, no common step, bad tolerance)."""


class MergeError(TracediffError):
    """Per-rank traces cannot be merged (mixed runs, sides or world sizes; a bad shard-dim declaration)."""


#: ``TRACEDIFF_DEBUG=1`` (or ``--debug``): show the full traceback of every error instead of one line.
ENV_DEBUG = "TRACEDIFF_DEBUG"


def debug_enabled() -> bool:
    """Whether full tracebacks were asked for (``--debug`` sets the variable for child processes too)."""
    return os.environ.get(ENV_DEBUG, "").strip().lower() in ("1", "true", "yes", "on")


def _is_library(path: Path) -> bool:
    """Code that is never the user's: torch and the standard library (other installed packages may be)."""
    torch = sys.modules.get("torch")  # not imported: no frame of it can be in a traceback
    torch_file = getattr(torch, "__file__", None) if torch is not None else None
    if torch_file and path.is_relative_to(Path(torch_file).resolve().parent):
        return True
    if "site-packages" in path.parts or "dist-packages" in path.parts:
        return False  # an installed package (diffusers, transformers): the user's model code
    return path.is_relative_to(Path(sysconfig.get_paths()["stdlib"]).resolve())


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of ``exc``'s traceback that is the user's code (their model, factory or script).

    Frames of tracediff itself (its bundled demo models excepted), of torch and of the standard
    library are skipped, so an error raised by ``F.linear`` is shown where the user's forward called it.
    """
    ours = Path(__file__).resolve().parent
    demo = ours / "demo"
    found: traceback.FrameSummary | None = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith("<"):
            continue
        path = Path(frame.filename).resolve()
        if _is_library(path):
            continue
        if path.is_relative_to(ours) and not path.is_relative_to(demo):
            continue
        found = frame
    return found


def describe_user_error(exc: BaseException) -> str:
    """``ValueError: bad shape, at models.py:12 in forward: y = self.proj(x)``: the user's error, in one line.

    For messages about an exception raised by user code (a model, a factory, a traced script):
    the exception type and first line of its message, and where in the user's code it happened.
    """
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else ""
    head = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    frame = user_frame(exc)
    if frame is None:
        return head
    try:
        shown = os.path.relpath(frame.filename)
        if shown.startswith(".." + os.sep + ".."):
            shown = frame.filename
    except ValueError:  # another drive on Windows
        shown = frame.filename
    where = f"{shown}:{frame.lineno} in {frame.name}"
    code = (frame.line or "").strip()
    if len(code) > 80:
        code = code[:77] + "..."
    return f"{head}, at {where}" + (f": {code}" if code else "")


def model_call_message(side: str, step: int, exc: BaseException) -> str:
    """Why calling a side's model failed: the user's exception and the frame of their code that raised it.

    An exception raised inside the model's (or a library's) code is shown as the user's error, with
    file:line and function; one raised at the call itself (a keyword the forward does not take) points
    at the inputs factory instead.
    """
    described = describe_user_error(exc)
    if user_frame(exc) is None:
        return (f"[inputs] factory: calling the {side} model at step {step} failed with {described} "
                "(do the inputs fit the model's forward?)")
    return (f"calling the {side} model at step {step} failed: {described} (raised in the model's own code; "
            "if [inputs] factory is at fault: do the inputs fit the model's forward? --debug shows the full traceback)")
