"""Traced runs for the crash tests, forked from one warm process.

``python traced_run.py REPO``: imports torch once, then for each JSON request
on stdin forks a child and prints ``{"pid": ...}`` at once and
``{"status": ..., "seconds": ...}`` (the ``waitpid`` status) when the child is
gone. Forking from a warm interpreter makes a traced run start in
milliseconds, so a test can kill dozens of them at random moments.

A request ``{"out": path, "steps": n}`` traces TinyNet for ``n`` steps into
``out``. With ``"mode"`` the child instead ends its run in that way and then
leaves the interpreter normally (so atexit runs, as in any program):
``close`` (handle closed), ``forget`` (never closed), ``sys-exit``
(``sys.exit(3)`` inside the run), ``raise`` (an uncaught exception),
``own-handler`` (the program installs its own SIGTERM handler first and stops
cleanly when it fires), ``ignore-term`` (SIGTERM ignored), ``wait-term`` (waits
for SIGTERM after 2 steps). Such a child prints ``{"sigterm_handler": bool}``
after attaching and ``{"ready": true}`` when it waits for a signal, and writes
its stderr to ``"stderr"``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, sys.argv[1])

import torch  # noqa: E402

from tests.conftest import TinyNet  # noqa: E402
from tracediff import TraceConfig, attach, trace_step  # noqa: E402

STATS = "abs_mean,sum,min,max,sample,full"


def inputs(steps: int) -> list[torch.Tensor]:
    return [torch.randn(8, 4, generator=torch.Generator().manual_seed(step)) for step in range(steps)]


def model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(dim=16)


def traced_run(out: str, steps: int) -> None:
    torch.set_num_threads(1)
    net, xs = model(), inputs(steps)
    config = TraceConfig(stats=STATS, sample_size=16)
    with attach(net, side="ref", config=config, output=out), torch.no_grad():
        for step in range(steps):
            with trace_step(step):
                net(xs[step])


def zygote() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            child(request)  # returns only by raising: the child leaves this loop, and the interpreter
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status, "seconds": time.monotonic() - start}), flush=True)


def child(request: dict) -> None:
    if "stderr" in request:
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    mode = request.get("mode")
    if mode is None:
        code = 0
        try:
            traced_run(request["out"], request["steps"])
        except BaseException:
            code = 1
        os._exit(code)
    once(request["out"], request["steps"], mode)
    raise SystemExit(0)


def once(out: str, steps: int, mode: str) -> None:
    net, xs = model(), inputs(steps)
    stop = [False]
    if mode == "own-handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.__setitem__(0, True))
    elif mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handle = attach(net, side="ref", config=TraceConfig(stats=STATS, sample_size=16), output=out)
    from tracediff.hooks import lifecycle

    print(json.dumps({"sigterm_handler": lifecycle.sigterm_handler_installed()}), flush=True)
    for step in range(steps):
        with trace_step(step), torch.no_grad():
            net(xs[step])
        if mode == "sys-exit" and step == 1:
            sys.exit(3)
        if mode == "raise" and step == 1:
            raise RuntimeError("the program's own bug")
        if mode in ("own-handler", "ignore-term", "wait-term") and step == 1:
            print(json.dumps({"ready": True}), flush=True)  # the test sends SIGTERM now
            # ignore-term: SIGTERM changes nothing, the run goes on after a pause;
            # own-handler: the program's handler asks it to stop; wait-term: SIGTERM kills it.
            deadline = time.monotonic() + (0.5 if mode == "ignore-term" else 30)
            while not stop[0] and time.monotonic() < deadline:
                time.sleep(0.01)
            if stop[0]:
                break
    if mode == "close":
        handle.close()


if __name__ == "__main__":
    zygote()
