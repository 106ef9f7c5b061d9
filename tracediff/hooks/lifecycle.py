"""Close every open trace when the program ends: at normal interpreter exit, and on SIGTERM.

A traced job that forgets ``handle.close()``, calls ``sys.exit`` or dies of an
uncaught exception still exits through :mod:`atexit`, which closes its traces
cleanly (``complete = True``). SIGTERM (what schedulers and ``torchrun`` send
before SIGKILL) would skip atexit, so while a trace is open tracediff handles
it: close every open trace, then restore the default action and re-send the
signal, so the process still dies of SIGTERM as it would have.

The handler is installed only where the program has not chosen its own
(the current action is the default) and only from the main thread; a
program's own handler, or ``SIG_IGN``, is left alone, and its clean exit goes
through atexit. ``TRACEDIFF_HANDLE_SIGTERM=0`` switches the handler off. When
the last open trace closes, the default action is put back.

SIGKILL cannot be caught: the commit protocol of the writer (see
docs/trace-format.md) is what keeps such a file readable.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import warnings
from typing import Any, Protocol

from tracediff.config import parse_bool
from tracediff.errors import TraceConfigError

ENV_HANDLE_SIGTERM = "TRACEDIFF_HANDLE_SIGTERM"


class Closable(Protocol):
    def close(self) -> None: ...


_live: dict[int, Closable] = {}
_lock = threading.RLock()  # re-entered when SIGTERM arrives while the main thread holds it
_atexit_registered = False
_sigterm_installed = False


def register(handle: Closable) -> None:
    """Track an open trace handle; the first one installs the exit and SIGTERM handling."""
    global _atexit_registered
    with _lock:
        _live[id(handle)] = handle
        if not _atexit_registered:
            atexit.register(close_all)
            _atexit_registered = True
    _install_sigterm()


def unregister(handle: Closable) -> None:
    """Forget a closed handle; after the last one, give SIGTERM its default action back."""
    with _lock:
        _live.pop(id(handle), None)
        last = not _live
    if last:
        _restore_sigterm()


def open_handles() -> list[Closable]:
    """The handles not closed yet, in the order they were opened."""
    with _lock:
        return list(_live.values())


def close_all() -> None:
    """Close every open trace handle; a failure to close one never stops the others."""
    for handle in reversed(open_handles()):
        try:
            handle.close()
        except Exception as exc:  # at exit or in a signal handler nothing may escape
            warnings.warn(f"tracediff: closing {handle!r} at exit failed ({exc!r})", RuntimeWarning, stacklevel=2)


def sigterm_handler_installed() -> bool:
    """Whether tracediff's SIGTERM handler is the process's current one."""
    return _sigterm_installed and signal.getsignal(signal.SIGTERM) is _on_sigterm


def _wanted() -> bool:
    try:
        return parse_bool(os.environ.get(ENV_HANDLE_SIGTERM, "1"), source=ENV_HANDLE_SIGTERM)
    except TraceConfigError:
        return True


def _install_sigterm() -> None:
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread() or not _wanted():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the program has its own plan for SIGTERM (a handler, or SIG_IGN): respect it
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


def _restore_sigterm() -> None:
    global _sigterm_installed
    if not _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _sigterm_installed = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _sigterm_installed
    # Default action first: a second SIGTERM (an impatient scheduler) kills at once,
    # even if closing were to hang.
    signal.signal(signum, signal.SIG_DFL)
    _sigterm_installed = False
    close_all()
    os.kill(os.getpid(), signum)
