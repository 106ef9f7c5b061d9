"""Crashes that read as findings (issue 19, problem 3): each one, as a new user meets it.

A TorchScript submodule or a module refusing hooks, ``--out`` naming a file, an error inside the
user's own model or factory, ``--debug``, and default output folders of runs started together.
Expected failures are one line and exit 2, never a traceback and never exit 1 ("drift found").
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.cli_helpers import REPO, assert_one_line_error, run_cli
from tracediff import attach, open_trace
from tracediff.config import TraceConfig
from tracediff.errors import TraceConfigError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, scripted=False, boom=False):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Sequential(nn.Linear(8, 8), nn.GELU())
            if scripted:
                self.b = torch.jit.script(self.b)
            self.c = nn.Linear(8, 8)
            self.boom = boom

        def forward(self, x):
            if self.boom:
                return self.explode(x)
            return self.c(self.b(self.a(x)))

        def explode(self, x):
            raise ValueError("rotary table too short")


    class RefusesHooks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x)

        def register_forward_pre_hook(self, *args, **kwargs):
            raise RuntimeError("hooks are not allowed here")


    def build(seed=0, scripted=False, boom=False):
        torch.manual_seed(seed)
        return Net(scripted, boom)


    def build_refusing(seed=0):
        torch.manual_seed(seed)
        return RefusesHooks()


    def build_broken(seed=0):
        return load_checkpoint()


    def load_checkpoint():
        raise RuntimeError("checkpoint shape mismatch")


    def inputs(step=0):
        torch.manual_seed(100 + step)
        return {"x": torch.randn(2, 8)}
    """
)


def _spec(tmp_path: Path, upstream: str, port: str = "models.py:build") -> Path:
    (tmp_path / "models.py").write_text(MODELS)
    spec = tmp_path / "parity.toml"
    spec.write_text(textwrap.dedent(f"""
        [upstream]
        {upstream}

        [port]
        factory = "{port}"

        [inputs]
        factory = "models.py:inputs"
        """))
    return spec


# -- (a) modules that cannot be hooked ------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.mlp = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.proj(x))


class _NoHooks(nn.Linear):
    def register_forward_hook(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        raise RuntimeError("this module refuses hooks")


def test_scripted_submodule_is_skipped_with_one_warning_and_recorded(tmp_path) -> None:
    model = nn.Sequential(_Block(), _NoHooks(4, 4))
    x = torch.randn(2, 4)
    expected = model(x)
    config = TraceConfig(stats=("abs_mean", "sum"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attach(model, side="port", config=config, output=tmp_path / "t.h5") as handle:
            out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the model's output is untouched
    ours = [w for w in caught if "cannot be hooked" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert "0.mlp (a torch.jit ScriptModule" in message and "1 (refused a forward hook" in message
    assert "torch.jit.script" in message
    assert set(handle.untraced) == {"0.mlp", "0.mlp.0", "0.mlp.1", "1"}
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.meta["untraced"]["0.mlp"].startswith("a torch.jit ScriptModule")
        assert trace.meta["untraced"]["0.mlp.1"] == "inside the torch.jit ScriptModule 0.mlp"
        assert "RuntimeError: this module refuses hooks" in trace.meta["untraced"]["1"]
        recorded = set(trace.record_modules())
        assert {"", "0", "0.proj"} <= recorded and not recorded & {"0.mlp", "0.mlp.0", "1"}


def test_a_scripted_root_is_refused_with_one_clear_error(tmp_path) -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TraceConfigError, match="ScriptModule, which runs no Python hooks; attach the eager"):
        attach(scripted, side="port", config=TraceConfig(), output=tmp_path / "t.h5")
    assert not (tmp_path / "t.h5").exists()


def test_run_with_a_scripted_submodule_completes_instead_of_crashing(tmp_path) -> None:
    spec = _spec(tmp_path, 'factory = "models.py:build"\nkwargs = { scripted = true }')
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "o"), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("cannot be hooked") == 1 and "b (a torch.jit ScriptModule" in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "cannot be hooked" in line]
    assert warning[0].startswith("tracediff: warning: "), proc.stderr  # one line, not Python's file:line + code
    assert "warnings.warn" not in proc.stderr and "RuntimeWarning" not in proc.stderr
    with open_trace(tmp_path / "o" / "upstream.h5") as trace:
        assert set(trace.meta["untraced"]) == {"b", "b.0", "b.1"}
    with open_trace(tmp_path / "o" / "port.h5") as trace:
        assert "untraced" not in trace.meta


def test_a_root_that_refuses_hooks_is_exit_2_not_1(tmp_path) -> None:
    spec = _spec(tmp_path, 'factory = "models.py:build_refusing"', port="models.py:build_refusing")
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "o"), "--no-progress")
    assert_one_line_error(proc, "RuntimeError: hooks are not allowed here", "models.py:", "--debug")


# -- (b) --out naming a file -------------------------------------------------------------------------
def test_out_naming_an_existing_file_is_one_line(tmp_path) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    proc = run_cli("run", "--demo", "clean", "--out", str(taken), "--no-progress")
    assert_one_line_error(proc, f"--out {str(taken)!r} is a file")
    assert taken.read_text() == "mine"


# -- (d, e) errors in the user's own code, --debug -----------------------------------------------------
def test_an_error_inside_the_model_names_the_users_frame(tmp_path) -> None:
    spec = _spec(tmp_path, 'factory = "models.py:build"\nkwargs = { boom = true }')
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "o"), "--no-progress")
    assert_one_line_error(proc, "calling the upstream model at step 0 failed: ValueError: rotary table too short",
                          "models.py:22 in explode", 'raise ValueError("rotary table too short")', "--debug")


def test_an_error_inside_a_factory_names_the_users_frame(tmp_path) -> None:
    spec = _spec(tmp_path, 'factory = "models.py:build_broken"')
    proc = run_cli("run", str(spec), "--out", str(tmp_path / "o"), "--no-progress")
    assert_one_line_error(proc, "[upstream] factory", "RuntimeError: checkpoint shape mismatch",
                          "models.py:52 in load_checkpoint")


@pytest.mark.parametrize("how", ["global", "subcommand", "env"])
def test_debug_shows_the_full_traceback(tmp_path, how) -> None:
    spec = _spec(tmp_path, 'factory = "models.py:build"\nkwargs = { boom = true }')
    args = ["run", str(spec), "--out", str(tmp_path / "o"), "--no-progress"]
    if how == "global":
        proc = run_cli("--debug", *args)
    elif how == "subcommand":
        proc = run_cli(*args, "--debug")
    else:
        proc = run_cli(*args, env={"TRACEDIFF_DEBUG": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert 'models.py", line 22, in explode' in proc.stderr  # the user's own frame, in full
    assert proc.stderr.strip().splitlines()[-1].startswith("tracediff run: error: calling the upstream model")


def test_debug_shows_the_side_processs_traceback_with_isolate_sides(tmp_path) -> None:
    spec = _spec(tmp_path, 'factory = "models.py:build"\nkwargs = { boom = true }')
    args = ["run", str(spec), "--no-progress", "--isolate-sides"]
    plain = run_cli(*args, "--out", str(tmp_path / "plain"))
    assert_one_line_error(plain, "calling the upstream model")
    proc = run_cli(*args, "--out", str(tmp_path / "debug"), "--debug")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert 'models.py", line 22, in explode' in proc.stderr  # raised in the side process, shown here
    assert proc.stderr.strip().splitlines()[-1].startswith("tracediff run: error: calling the upstream model")


def test_debug_shows_a_traced_scripts_traceback(tmp_path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("def load():\n    raise KeyError('missing')\n\nload()\n")
    proc = run_cli("run", "--side", "ref", "--out", str(tmp_path / "o"), "--debug", "--", "python", str(script))
    assert proc.returncode == 2
    assert 'broken.py", line 2, in load' in proc.stderr and "Traceback" in proc.stderr


# -- (f) default output folders -------------------------------------------------------------------------
def test_runs_started_together_never_share_a_default_folder(tmp_path) -> None:
    spec = _spec(tmp_path, 'factory = "models.py:build"')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FASTVIDEO_TRACE_")}, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "tracediff", "run", str(spec), "--no-progress"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, results
    folders = sorted((tmp_path / "tracediff-out").iterdir())
    assert len(folders) == 4, folders
    for folder in folders:
        assert {p.name for p in folder.iterdir()} == {"upstream.h5", "port.h5", "report.json", "report.html"}


def test_a_failed_run_leaves_no_empty_default_folder(tmp_path) -> None:
    spec = _spec(tmp_path, 'factory = "models.py:build_broken"')
    proc = run_cli("run", str(spec), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    assert list((tmp_path / "tracediff-out").iterdir()) == []
