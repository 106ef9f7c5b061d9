"""The bundled demo pair: exact conversion, clean agreement, and well-localised planted bugs."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from tracediff.demo import (
    BUGS,
    DEFAULT_BUG,
    PARAM_NAMES_MAPPING,
    ConversionError,
    DemoConfig,
    convert_state_dict,
    make_inputs,
    make_port,
    make_upstream,
)
from tracediff.demo.convert import map_param_name
from tracediff.errors import AlignmentError


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_pair_agrees_in_float32(seed: int) -> None:
    upstream, port = make_upstream(seed), make_port(seed)
    for step in (0, 30):
        inputs = make_inputs(seed, step=step)
        expected = _run(upstream, inputs)
        actual = _run(port, inputs)
        assert actual.dtype == torch.float32
        assert actual.shape == inputs["x"].shape
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_clean_pair_agrees_for_a_non_default_shape() -> None:
    config = DemoConfig(batch_size=2, num_frames=3, height=6, width=10, dim=96, depth=5)
    inputs = make_inputs(4, config, step=7)
    expected = _run(make_upstream(4, config), inputs)
    torch.testing.assert_close(_run(make_port(4, config), inputs), expected, atol=1e-5, rtol=1e-5)


def test_mapping_consumes_every_upstream_param_and_fills_every_port_param() -> None:
    upstream_sd = make_upstream(0).state_dict()
    port_sd = make_port(0).state_dict()

    unmatched = [name for name in upstream_sd if map_param_name(name) is None]
    assert unmatched == []

    converted = convert_state_dict(upstream_sd)
    assert set(converted) == set(port_sd)
    for name, tensor in converted.items():
        assert tensor.shape == port_sd[name].shape, name
        torch.testing.assert_close(port_sd[name], tensor, atol=0, rtol=0)


def test_every_mapping_rule_is_used() -> None:
    names = list(make_upstream(0).state_dict())
    unused = [pattern for pattern in PARAM_NAMES_MAPPING if not any(re.match(pattern, n) for n in names)]
    assert unused == []


def test_fused_qkv_is_q_k_v_concatenated_in_order() -> None:
    upstream_sd = make_upstream(0).state_dict()
    port_sd = make_port(0).state_dict()
    for kind in ("weight", "bias"):
        parts = [upstream_sd[f"blocks.1.self_attn.{p}.{kind}"] for p in "qkv"]
        torch.testing.assert_close(
            port_sd[f"transformer_blocks.1.attn1.to_qkv.{kind}"], torch.cat(parts), atol=0, rtol=0
        )


def test_upstream_params_are_rerandomised_not_library_defaults() -> None:
    upstream = make_upstream(0)
    for name, param in upstream.named_parameters():
        assert param.unique().numel() > 0.9 * param.numel(), f"{name} is not per-element random"
        if param.ndim == 1:
            assert not torch.all(param == 0) and not torch.all(param == 1), name


def test_models_are_deterministic_per_seed() -> None:
    a, b, c = make_upstream(3).state_dict(), make_upstream(3).state_dict(), make_upstream(4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_building_models_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_port(0, bug=DEFAULT_BUG)
    assert torch.equal(torch.rand(4), expected)


def test_inputs_are_deterministic_and_follow_the_schedule() -> None:
    config = DemoConfig()
    first, again, later = make_inputs(0), make_inputs(0), make_inputs(0, step=40)
    assert set(first) == {"x", "t", "context"}
    assert first["x"].shape == config.latent_shape
    assert first["context"].shape == (config.batch_size, config.text_len, config.text_dim)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["t"].item() == pytest.approx(1000.0)
    assert later["t"].item() < first["t"].item()
    assert not torch.equal(first["x"], later["x"])
    assert torch.equal(first["context"], later["context"])
    assert not torch.equal(first["x"], make_inputs(1)["x"])
    with pytest.raises(ValueError, match="step"):
        make_inputs(0, step=config.num_steps)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_each_bug_changes_the_output_and_names_real_modules(bug: str) -> None:
    spec = BUGS[bug]
    upstream, port = make_upstream(0), make_port(0, bug=bug)
    assert spec.port_module in dict(port.named_modules())
    assert spec.upstream_module in dict(upstream.named_modules())
    for seed in (0, 1):
        inputs = make_inputs(seed)
        diff = (_run(make_port(seed, bug=bug), inputs) - _run(make_upstream(seed), inputs)).abs().max().item()
        assert diff > 1e-3, f"{bug}: max-abs difference {diff:.2e}"


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_bug_is_a_flag_not_a_weight_change(bug: str) -> None:
    clean, buggy = make_port(0).state_dict(), make_port(0, bug=bug).state_dict()
    assert clean.keys() == buggy.keys()
    assert all(torch.equal(clean[k], buggy[k]) for k in clean)


def _capture_calls(model: nn.Module, names: list[str]) -> dict[str, tuple[tuple, dict, object]]:
    """Record (args, kwargs, output) of each named module during one forward."""
    calls: dict[str, tuple[tuple, dict, object]] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object, name: str = name) -> None:
            calls[name] = (args, kwargs, output)

        handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
    try:
        _run(model, make_inputs(0))
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_named_culprit_is_the_innermost_module_that_computes_differently(bug: str) -> None:
    """Fed the buggy run's own inputs, the clean culprit disagrees but each clean descendant agrees."""
    culprit = BUGS[bug].port_module
    clean, buggy = make_port(0), make_port(0, bug=bug)
    scope = [n for n, _ in buggy.named_modules() if n == culprit or n.startswith(culprit + ".")]
    calls = _capture_calls(buggy, scope)
    clean_modules = dict(clean.named_modules())
    assert set(calls) == set(scope)
    for name in scope:
        args, kwargs, buggy_out = calls[name]
        with torch.no_grad():
            clean_out = clean_modules[name](*args, **kwargs)
        same = torch.equal(clean_out, buggy_out)
        assert same == (name != culprit), f"{bug}: {name} {'agrees' if same else 'differs'}"


def test_unknown_bug_is_refused() -> None:
    with pytest.raises(ValueError, match="gelu_tanh"):
        make_port(0, bug="no_such_bug")


def test_unmatched_upstream_param_is_named() -> None:
    upstream_sd = dict(make_upstream(0).state_dict())
    upstream_sd["blocks.0.self_attn.extra_gate.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=re.escape("blocks.0.self_attn.extra_gate.weight")) as info:
        convert_state_dict(upstream_sd)
    assert isinstance(info.value, KeyError) and isinstance(info.value, AlignmentError)
    assert info.value.unmatched == ["blocks.0.self_attn.extra_gate.weight"]


def test_incomplete_fused_param_is_named() -> None:
    upstream_sd = dict(make_upstream(0).state_dict())
    del upstream_sd["blocks.2.self_attn.k.weight"]
    with pytest.raises(KeyError, match=re.escape("transformer_blocks.2.attn1.to_qkv.weight")) as info:
        convert_state_dict(upstream_sd)
    assert info.value.unfilled == ["transformer_blocks.2.attn1.to_qkv.weight"]


def test_unfilled_port_param_is_named_when_port_keys_are_given() -> None:
    upstream_sd = dict(make_upstream(0).state_dict())
    del upstream_sd["head.modulation"]
    port_keys = make_port(0).state_dict().keys()
    convert_state_dict(upstream_sd)  # without the port's keys a missing rename is not detectable
    with pytest.raises(ConversionError, match="'scale_shift_table' is not filled") as info:
        convert_state_dict(upstream_sd, expected_keys=port_keys)
    assert info.value.unfilled == ["scale_shift_table"]
