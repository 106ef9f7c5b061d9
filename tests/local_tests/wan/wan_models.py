"""diffusers' Wan DiT (upstream) and FastVideo's Wan DiT (port): tiny, random, converted as FastVideo converts.

The upstream is ``diffusers.WanTransformer3DModel``; every parameter is re-drawn
after construction (libraries start biases at 0 and norms at 1, which would hide
a bias or a norm mapped to the wrong place). The port is
``fastvideo.models.dits.wanvideo.WanTransformer3DModel``, loaded strictly from
the upstream's state dict through FastVideo's own conversion:
``get_param_names_mapping(WanVideoArchConfig().param_names_mapping)`` and
``hf_to_custom_state_dict``.

FastVideo needs three things to run on a CPU (``tests/local_tests/fastvideo_cpu.py``):
a one-process gloo "distributed" environment, an attention backend (its
``CpuPlatform`` returns none: SDPA is pointed at), both set up once by
:func:`setup_fastvideo`, and a forward context around every call of the port
(:func:`port_call`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastvideo_cpu import forward_context, setup_fastvideo
from torch import nn

#: The tiny configuration (diffusers' argument names): 2 blocks, 4 heads x 16, ffn 128, text dim 64.
TINY: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=64,
    ffn_dim=128,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
#: Latent video: batch 1, 16 channels, 2 frames of 8 x 8 (32 tokens after 1x2x2 patches); 8 text tokens.
LATENT_SHAPE = (1, 16, 2, 8, 8)
TEXT_TOKENS = 8
TIMESTEP = 500.0
#: The statistics FastVideo's own tracer records (its full list).
FASTVIDEO_STATS = "abs_mean,sum,min,max,mean,std,shape,dtype"

def make_upstream(seed: int = 0) -> nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY).eval()
    randomise(model, seed)
    return model


def randomise(model: nn.Module, seed: int) -> None:
    """Re-draw every parameter: fan-in scaled matrices, norm scales near 1, biases and tables near 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "scale_shift_table" not in name:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def convert(upstream_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' state dict -> FastVideo's, with FastVideo's own table and converter."""
    from fastvideo.configs.models.dits.wanvideo import WanVideoArchConfig
    from fastvideo.models.loader.utils import get_param_names_mapping, hf_to_custom_state_dict

    mapping = get_param_names_mapping(WanVideoArchConfig().param_names_mapping)
    converted, _ = hf_to_custom_state_dict(dict(upstream_state), mapping)
    return converted


def param_names_mapping() -> dict[str, str]:
    """The port's conversion table, as tracediff's ``param_map`` takes it."""
    from fastvideo.configs.models.dits.wanvideo import WanVideoArchConfig

    return dict(WanVideoArchConfig().param_names_mapping)


def make_port(upstream: nn.Module, *, edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> nn.Module:
    """FastVideo's Wan DiT with the upstream's weights, loaded strictly.

    Args:
        edit: changes the converted state dict before loading (a conversion bug).
    """
    setup_fastvideo()
    from fastvideo.configs.models.dits.wanvideo import WanVideoArchConfig, WanVideoConfig
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    arch = {k: v for k, v in TINY.items() if k not in ("cross_attn_norm", "qk_norm", "eps")}
    config = WanVideoConfig(arch_config=WanVideoArchConfig(**arch))
    hf_config = {**TINY, "text_len": config.text_len}
    model = WanTransformer3DModel(config=config, hf_config=hf_config).to(torch.float32)
    converted = convert(upstream.state_dict())
    if edit is not None:
        edit(converted)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def trace_upstream(model: nn.Module, inputs: dict[str, torch.Tensor], output: Path) -> Path:
    """A tracediff trace of the upstream with the statistics ``tracediff run`` records by default."""
    from tracediff.config import TraceConfig
    from tracediff.pipeline.runner import trace_model
    from tracediff.pipeline.spec import DEFAULT_STATS

    trace_model(model, side="upstream", steps=[inputs], output=output, config=TraceConfig(stats=DEFAULT_STATS),
                call=upstream_call, overwrite=True)
    return output


def trace_port_with_fastvideo(model: nn.Module, inputs: dict[str, torch.Tensor], output: Path) -> Path:
    """Trace the port with FastVideo's own tracer (``fastvideo.hooks.activation_trace``), as its users do.

    Every module, FastVideo's full stat list; the tracer reads its ``FASTVIDEO_TRACE_*`` variables
    when it attaches, so they are set only around that call.
    """
    from fastvideo.hooks.activation_trace import attach_activation_trace, detach_activation_trace

    settings = {"FASTVIDEO_TRACE_ACTIVATIONS": "1", "FASTVIDEO_TRACE_LAYERS": "",
                "FASTVIDEO_TRACE_STATS": FASTVIDEO_STATS, "FASTVIDEO_TRACE_OUTPUT": str(output)}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        manager = attach_activation_trace(model)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert manager is not None, "FastVideo's tracer did not attach"
    try:
        with torch.no_grad():
            port_call(model, inputs)
    finally:
        detach_activation_trace(manager)
    return output


def make_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(LATENT_SHAPE, generator=generator),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, TINY["text_dim"], generator=generator),
        "timestep": torch.tensor([TIMESTEP]),
    }


def upstream_call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def port_context(inputs: dict[str, torch.Tensor]) -> Any:
    """The context FastVideo's modules must run in, for one step's inputs: tracediff's ``port_context=``."""
    return forward_context(inputs["timestep"])


def port_call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with forward_context(inputs["timestep"]):
        return model(**inputs)
