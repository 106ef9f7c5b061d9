"""The port's generation script, FastVideo style: its own tracer, switched on by ``FASTVIDEO_TRACE_*``.

As FastVideo's denoising stage does, the DiT runs inside ``set_forward_context`` and each step inside
``fastvideo.hooks.activation_trace.trace_step(i)``; ``attach_activation_trace`` registers nothing unless
``FASTVIDEO_TRACE_ACTIVATIONS=1``. ``WAN_PORT_BUG=<name>`` plants one of the family's bugs
(``wan_bugs.BUGS``), as a broken port would ship it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
import wan_bugs  # noqa: E402
import wan_models  # noqa: E402
from fastvideo_cpu import forward_context  # noqa: E402
from generate_upstream import TIMESTEPS  # noqa: E402


def main() -> None:
    from fastvideo.hooks.activation_trace import attach_activation_trace, detach_activation_trace, trace_step

    upstream = wan_models.make_upstream(seed=0)  # the checkpoint both sides load
    bug = wan_bugs.bug(os.environ["WAN_PORT_BUG"]) if os.environ.get("WAN_PORT_BUG") else None
    model = wan_models.make_port(upstream, edit=bug.convert if bug is not None else None)
    if bug is not None and bug.plant is not None:
        bug.plant(model, pytest.MonkeyPatch())
    inputs = wan_models.make_inputs(seed=1)
    latents = inputs["hidden_states"]
    manager = attach_activation_trace(model)
    try:
        with torch.no_grad():
            for i, t in enumerate(TIMESTEPS):
                with trace_step(i), forward_context(t):
                    velocity = model(hidden_states=latents, encoder_hidden_states=inputs["encoder_hidden_states"],
                                     timestep=torch.tensor([t]))
                latents = latents - 0.1 * velocity
    finally:
        detach_activation_trace(manager)
    print(f"done: {latents.abs().mean().item():.6f}")


if __name__ == "__main__":
    main()
