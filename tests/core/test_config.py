"""TraceConfig: FastVideo's variables, and one clear error per bad value."""

from __future__ import annotations

import pytest

from tracediff import TraceConfig, TraceConfigError, attach
from tracediff.config import parse_bool, parse_stats, parse_steps


@pytest.mark.parametrize("value", [None, "", "0", "false", "off", "no"])
def test_master_switch_off_values(value: str | None) -> None:
    assert parse_bool(value) is False


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "yes"])
def test_master_switch_on_values(value: str) -> None:
    assert parse_bool(value) is True


def test_master_switch_garbage_names_variable() -> None:
    with pytest.raises(TraceConfigError, match=r"FASTVIDEO_TRACE_ACTIVATIONS='maybe'.*1/true/on"):
        parse_bool("maybe")


def test_from_env_reads_every_variable() -> None:
    env = {
        "FASTVIDEO_TRACE_ACTIVATIONS": "1",
        "FASTVIDEO_TRACE_LAYERS": r"^blocks\.\d+$",
        "FASTVIDEO_TRACE_STATS": "abs_mean, max ,shape,abs_mean",
        "FASTVIDEO_TRACE_STEPS": "0-2,5",
        "FASTVIDEO_TRACE_OUTPUT": "/tmp/x_<pid>.h5",
        "TRACEDIFF_SAMPLE_SIZE": "16",
    }
    config = TraceConfig.from_env(env)
    assert config.enabled
    assert config.stats == ("abs_mean", "max", "shape")
    assert config.steps == frozenset({0, 1, 2, 5})
    assert config.output == "/tmp/x_<pid>.h5"
    assert config.sample_size == 16
    assert config.layer_predicate("blocks.3")
    assert not config.layer_predicate("blocks.3.fc")


def test_defaults_match_fastvideo() -> None:
    config = TraceConfig.from_env({})
    assert not config.enabled
    assert config.stats == ("abs_mean", "sum")
    assert config.steps is None
    assert config.layer_predicate("anything.at.all")
    assert config.output.endswith(".h5")


def test_unknown_stat_names_variable_value_and_choices() -> None:
    with pytest.raises(TraceConfigError) as err:
        TraceConfig.from_env({"FASTVIDEO_TRACE_STATS": "abs_mean,median"})
    message = str(err.value)
    assert "FASTVIDEO_TRACE_STATS='abs_mean,median'" in message
    assert "'median'" in message
    assert "abs_mean, sum, min, max, mean, std, shape, dtype, l2, nan_count, inf_count, sample, full" in message


@pytest.mark.parametrize("value", ["1,x", "3-1", "-1", "1.5", "0,,a"])
def test_bad_steps_are_refused(value: str) -> None:
    with pytest.raises(TraceConfigError, match=r"FASTVIDEO_TRACE_STEPS=.*e\.g\. '0,2,10-12'"):
        parse_steps(value)


def test_steps_ranges_and_blanks() -> None:
    assert parse_steps("") is None
    assert parse_steps(" 0 , 2-4 ,10") == frozenset({0, 2, 3, 4, 10})
    assert parse_steps([1, 2]) == frozenset({1, 2})


def test_bad_regex_names_variable() -> None:
    with pytest.raises(TraceConfigError, match=r"FASTVIDEO_TRACE_LAYERS='blocks\.\(' is not a valid Python regex"):
        TraceConfig.from_env({"FASTVIDEO_TRACE_ACTIVATIONS": "1", "FASTVIDEO_TRACE_LAYERS": "blocks.("})


def test_layers_accepts_list_and_predicate() -> None:
    assert TraceConfig(layers=["a", "b.c"]).layer_predicate("b.c")
    assert not TraceConfig(layers=["a", "b.c"]).layer_predicate("b")
    assert TraceConfig(layers=lambda name: name.endswith("fc")).layer_predicate("blocks.0.fc")


def test_stats_argument_validated_too() -> None:
    with pytest.raises(TraceConfigError, match="stats='bogus'"):
        parse_stats("bogus", source="stats")


def test_unwritable_output_refused_at_attach(tiny_net, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        config = TraceConfig(output=str(locked / "sub" / "t.h5"))
        import os

        if os.access(locked, os.W_OK):  # root ignores permission bits: use a file as "directory"
            blocker = tmp_path / "file"
            blocker.write_text("x")
            config = TraceConfig(output=str(blocker / "t.h5"))
        with pytest.raises(TraceConfigError, match=r"FASTVIDEO_TRACE_OUTPUT=.*is not writable"):
            attach(tiny_net, config=config)
    finally:
        locked.chmod(0o700)


def test_output_that_is_a_directory_refused(tiny_net, tmp_path) -> None:
    with pytest.raises(TraceConfigError, match="is a directory"):
        attach(tiny_net, config=TraceConfig(), output=tmp_path)


def test_layer_regex_matching_nothing_is_an_error(tiny_net, tmp_path) -> None:
    config = TraceConfig.from_env({"FASTVIDEO_TRACE_ACTIVATIONS": "1", "FASTVIDEO_TRACE_LAYERS": "^transformer"})
    with pytest.raises(TraceConfigError, match=r"FASTVIDEO_TRACE_LAYERS='\^transformer' matches none .* 'embed'"):
        attach(tiny_net, config=config, output=tmp_path / "t.h5")
    with pytest.raises(TraceConfigError, match=r"^layers='\^transformer' matches none"):
        attach(tiny_net, config=TraceConfig(layers="^transformer"), output=tmp_path / "t.h5")
    assert not (tmp_path / "t.h5").exists()


def test_placeholders_are_filled(tiny_net, tmp_path) -> None:
    config = TraceConfig(output=str(tmp_path / "trace_<side>_<rank>_<pid>.h5"))
    with attach(tiny_net, side="ref", config=config) as handle:
        pass
    import os

    assert handle.path == tmp_path / f"trace_ref_0_{os.getpid()}.h5"
    assert handle.path.exists()
