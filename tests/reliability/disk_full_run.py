"""Traced runs that hit a full disk, for test_disk_full.py (run in a subprocess: limits are per process).

``python disk_full_run.py REPO PLAN.json``: PLAN is a list of runs, each
``{"out": path, "limit": fraction or null, "sigxfsz": "ignore"|"default",
"fill": {"path": p, "leave": bytes, "at_step": k} or null}``. The first run
is the reference. Each run traces STEPS steps of a model whose steps are
large, under a ``ulimit -f`` of ``header + limit * (reference size - header)``
bytes (set after attaching, lifted after the run), or after filling the
filesystem at ``fill.path`` to leave ``fill.leave`` bytes free once step
``fill.at_step`` ends. Prints one JSON line per run: how many steps the program ran (always
all of them, or the test fails) and the tracediff warnings it got.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import warnings

sys.path.insert(0, sys.argv[1])

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tracediff import TraceConfig, attach, trace_step  # noqa: E402

STEPS = 24


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def fill(path: str, leave: int) -> None:
    stats = os.statvfs(os.path.dirname(path))
    free = stats.f_bfree * stats.f_frsize
    with open(path, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def one(run: dict, reference: str) -> dict:
    torch.manual_seed(0)
    model = Wide()
    xs = [torch.randn(128, 256, generator=torch.Generator().manual_seed(s)) for s in range(STEPS)]  # 0.5 MiB a step
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN if run.get("sigxfsz") == "ignore" else signal.SIG_DFL)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    ran = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = attach(model, side="ref", config=TraceConfig(stats="abs_mean,sum,sample,full"), output=run["out"])
        limit = None
        if run.get("limit") is not None:
            header = os.path.getsize(run["out"])
            limit = int(header + run["limit"] * (os.path.getsize(reference) - header))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            outputs = []
            for step in range(STEPS):
                with trace_step(step), torch.no_grad():
                    outputs.append(model(xs[step]))
                ran += 1
                plan = run.get("fill")
                if plan and step == plan["at_step"]:
                    fill(plan["path"], plan["leave"])
            handle.close()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    if run.get("fill"):
        os.unlink(run["fill"]["path"])  # give the space back for the next run
    with torch.no_grad():
        same = all(torch.equal(y, model(x)) for x, y in zip(xs, outputs, strict=True))
    ours = [str(w.message) for w in caught if str(w.message).startswith("tracediff")]
    return {"out": run["out"], "limit": limit, "steps_run": ran, "outputs_unchanged": same, "warnings": ours}


if __name__ == "__main__":
    with open(sys.argv[2]) as plan_file:
        plan = json.load(plan_file)
    for run in plan:
        print(json.dumps(one(run, plan[0]["out"])), flush=True)
