"""Keyword arguments the user wrote are never dropped: an unknown key is one line naming the valid ones.

Before, ``call_with_supported`` silently dropped every key a factory did not take, so
``--port-kwarg bugg=gelu_tanh`` ran the clean port and exited 0.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.cli_helpers import assert_one_line_error, run_cli
from tracediff.errors import SpecError
from tracediff.pipeline.factory import call_with_supported, check_kwargs


def make_model(seed: int = 0, depth: int = 2, *, bug: str | None = None) -> dict:
    return {"seed": seed, "depth": depth, "bug": bug}


def open_ended(seed: int = 0, **options: object) -> dict:
    return {"seed": seed, **options}


def positional_only(size: int, /, scale: float = 1.0) -> tuple:
    return size, scale


def test_unknown_user_key_names_field_key_suggestion_and_signature() -> None:
    with pytest.raises(SpecError) as info:
        call_with_supported(make_model, {"seed": 3, "device": "cpu"}, field="[port] factory",
                            user={"bugg": "gelu_tanh"}, user_field="[port] kwargs")
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("[port] kwargs", "'bugg'", "did you mean 'bug'?", "valid keys: seed, depth, bug",
                     "make_model(seed=0, depth=2, *, bug=None)"):
        assert fragment in message, message


def test_several_unknown_keys_are_all_named() -> None:
    with pytest.raises(SpecError, match=r"no parameters 'bugg', 'zzz' \(did you mean 'bug' for 'bugg'\?\)"):
        check_kwargs(make_model, {"bugg": 1, "zzz": 2, "depth": 3}, field="[upstream] kwargs")


def test_framework_offers_are_still_dropped_when_not_taken() -> None:
    """seed/step/device/dtype are offered by tracediff, not written by the user: only those taken are passed."""
    built = call_with_supported(make_model, {"seed": 5, "step": 1, "device": "cpu", "dtype": None},
                                field="[upstream] factory", user={"depth": 7})
    assert built == {"seed": 5, "depth": 7, "bug": None}


def test_user_value_wins_over_offered_one() -> None:
    built = call_with_supported(make_model, {"seed": 5}, field="f", user={"seed": 1})
    assert built["seed"] == 1


def test_var_keyword_function_takes_anything() -> None:
    built = call_with_supported(open_ended, {"seed": 2, "device": "cpu"}, field="f", user={"frames": 5})
    assert built == {"seed": 2, "device": "cpu", "frames": 5}


def test_positional_only_parameter_is_not_a_valid_key() -> None:
    with pytest.raises(SpecError, match=r"no parameter 'size'; valid keys: scale"):
        check_kwargs(positional_only, {"size": 3}, field="[inputs] kwargs")


def test_misspelt_port_kwarg_flag_is_refused_instead_of_a_clean_run(tmp_path) -> None:
    """The reproduction: before, this ran the *clean* port and exited 0 ("no drift")."""
    out = tmp_path / "out"
    proc = run_cli("run", "--demo", "clean", "--port-kwarg", "bugg=gelu_tanh", "--out", str(out), "--no-progress")
    assert_one_line_error(proc, "[port] kwargs (--port-kwarg)", "'bugg'", "did you mean 'bug'?",
                          "valid keys: seed, config, bug")
    assert not (out / "upstream.h5").exists() and not (out / "report.json").exists()


def test_misspelt_inputs_kwarg_flag_is_refused(tmp_path) -> None:
    proc = run_cli("run", "--demo", "clean", "--inputs-kwarg", "batch=4", "--out", str(tmp_path / "o"),
                   "--no-progress")
    assert_one_line_error(proc, "[inputs] kwargs (--inputs-kwarg)", "make_inputs() has no parameter 'batch'",
                          "valid keys: seed, config, step")


def test_misspelt_spec_kwargs_fail_before_the_upstream_is_traced(tmp_path) -> None:
    (tmp_path / "models.py").write_text(textwrap.dedent(
        """
        from tracediff.demo.models import DemoConfig, make_inputs, make_port, make_upstream

        SMALL = DemoConfig(depth=3)

        def build_upstream(seed):
            return make_upstream(seed, SMALL)

        def build_port(seed, bug=None):
            return make_port(seed, SMALL, bug=bug)

        def inputs(seed, step):
            return make_inputs(seed, SMALL, step)
        """))
    spec = tmp_path / "parity.toml"
    spec.write_text(textwrap.dedent(
        """
        [upstream]
        factory = "models.py:build_upstream"

        [port]
        factory = "models.py:build_port"
        kwargs = { bugg = "ln_eps" }

        [inputs]
        factory = "models.py:inputs"
        """))
    out = tmp_path / "out"
    proc = run_cli("run", str(spec), "--out", str(out), "--no-progress")
    assert_one_line_error(proc, "[port] kwargs", "build_port() has no parameter 'bugg'", "did you mean 'bug'?",
                          "valid keys: seed, bug", "signature build_port(seed, bug=None)")
    assert not (out / "upstream.h5").exists()
    # the same key, spelt right, is passed and plants the bug: exit 1, a drift found
    spec.write_text(spec.read_text().replace("bugg", "bug"))
    assert run_cli("run", str(spec), "--out", str(out), "--no-progress").returncode == 1


def test_demo_still_runs_with_its_own_kwargs(tmp_path) -> None:
    """demo.toml's ``[port] kwargs = { bug = "gelu_tanh" }`` is a real parameter: the planted bug is found."""
    proc = run_cli("run", "--out", str(tmp_path / "demo"), "--no-progress", "--steps", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
