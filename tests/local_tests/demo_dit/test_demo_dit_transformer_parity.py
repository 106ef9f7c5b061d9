"""Parity of the demo DiT port against its upstream, with tracediff's diagnosis on failure."""

from __future__ import annotations

import pytest

from tracediff.demo.convert import PARAM_NAMES_MAPPING
from tracediff.demo.models import BUGS, make_inputs, make_port, make_upstream

PARITY_SCOPE = "full transformer, same kernels, float32"
PRESET = "single-block"  # docs/tolerance.md: same-kernel fp32 comparisons, atol = rtol = 1e-4


@pytest.fixture(scope="module")
def upstream():
    return make_upstream(seed=0)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_transformer_parity(parity, upstream, step) -> None:
    parity.compare(upstream, make_port(seed=0), make_inputs(seed=0, step=step), preset=PRESET,
                   param_map=PARAM_NAMES_MAPPING)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_planted_bug_is_diagnosed(parity, upstream, bug) -> None:
    """The fixture must fail a buggy port, and its report must point into the bug's module."""
    with pytest.raises(AssertionError) as failure:
        parity.compare(upstream, make_port(seed=0, bug=bug), make_inputs(seed=0), preset=PRESET,
                       param_map=PARAM_NAMES_MAPPING)
    message = str(failure.value)
    assert message.startswith("port output 'out' differs from upstream")
    first_drift = next(line for line in message.splitlines() if line.startswith("first drift: "))
    named = first_drift.removeprefix("first drift: ").split(" ", 1)[0]
    culprit = BUGS[bug].port_module
    # first-drift names the culprit itself, or (for a bug inside a module's own forward) its first child to run
    assert named == culprit or named.startswith(culprit + "."), first_drift
    assert (parity.out_dir / "report.html").is_file()
