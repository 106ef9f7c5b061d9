"""End to end, as a FastVideo contributor works: two generation scripts, two tracers, one command.

The upstream script is traced unmodified (``tracediff run --side ref -- python generate_upstream.py``);
the port's script is traced by FastVideo's own tracer (``FASTVIDEO_TRACE_*``, JSONL); then
``tracediff first-drift`` compares them over both denoising steps. Real diffusers and FastVideo Wan DiTs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import wan_bugs

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
STATS = "abs_mean,sum,min,max,mean,std,shape,dtype"  # FastVideo's full list


def _env(**extra: str) -> dict[str, str]:
    # The test process's own one-process "distributed" set-up (MASTER_PORT ...) must not leak into a script's.
    dropped = ("FASTVIDEO_TRACE_", "TRACEDIFF_", "WAN_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


def _run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def upstream_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unmodified upstream script traced by tracediff's script mode, once for all tests here."""
    out = tmp_path_factory.mktemp("ref")
    done = _run("-m", "tracediff", "run", "--side", "ref", "--out", str(out / "traces"), "--",
                sys.executable, str(HERE / "pipelines" / "generate_upstream.py"),
                env=_env(FASTVIDEO_TRACE_STATS=STATS), cwd=out)
    assert done.returncode == 0, done.stdout + done.stderr
    traces = sorted((out / "traces").glob("ref.*.h5"))
    assert [t.name for t in traces] == ["ref.WanTransformer3DModel.h5"], done.stdout + done.stderr
    return traces[0]


def _port_trace(tmp_path: Path, bug: str | None = None) -> Path:
    output = tmp_path / "port.jsonl"
    env = _env(FASTVIDEO_TRACE_ACTIVATIONS="1", FASTVIDEO_TRACE_LAYERS="", FASTVIDEO_TRACE_STATS=STATS,
               FASTVIDEO_TRACE_OUTPUT=str(output), **({"WAN_PORT_BUG": bug} if bug else {}))
    done = _run(str(HERE / "pipelines" / "generate_port.py"), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert output.stat().st_size > 0
    return output


def test_clean_port_script_has_no_drift_in_either_step(upstream_trace: Path, tmp_path: Path) -> None:
    port = _port_trace(tmp_path)
    done = _run("-m", "tracediff", "first-drift", str(upstream_trace), str(port), "--json", env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["steps"] == [0, 1], report["headline"]
    assert report["aligned_modules"] >= 50 and report["alignment_suspects"] == []


@pytest.mark.parametrize("bug_name", ["norm_eps", "cross_attn_bias"])
def test_a_bug_in_the_port_script_is_named(upstream_trace: Path, tmp_path: Path, bug_name: str) -> None:
    planted = wan_bugs.bug(bug_name)
    port = _port_trace(tmp_path, bug_name)
    done = _run("-m", "tracediff", "first-drift", str(upstream_trace), str(port), env=_env(COLUMNS="200"),
                cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    headline = next(line for line in done.stdout.splitlines() if line.startswith("first drift: "))
    assert headline.startswith(f"first drift: {planted.expected} (upstream "), headline
    assert ", step 0, " in headline  # the first step already drifts
