"""An upstream generation script as its authors wrote it: build diffusers' Wan DiT, run the denoising loop.

It knows nothing of tracediff: ``python -m tracediff run --side ref --out DIR -- python generate_upstream.py``
traces it unmodified. Two steps of a toy flow-matching loop on the family's tiny model and weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
import wan_models  # noqa: E402

TIMESTEPS = (900.0, 500.0)


def main() -> None:
    model = wan_models.make_upstream(seed=0)
    inputs = wan_models.make_inputs(seed=1)
    latents = inputs["hidden_states"]
    with torch.no_grad():
        for t in TIMESTEPS:
            velocity = model(hidden_states=latents, encoder_hidden_states=inputs["encoder_hidden_states"],
                             timestep=torch.tensor([t]), return_dict=False)[0]
            latents = latents - 0.1 * velocity
    print(f"done: {latents.abs().mean().item():.6f}")


if __name__ == "__main__":
    main()
