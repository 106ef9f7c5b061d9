"""Public entry points of the bundled demo: a seeded upstream/port pair and inputs.

The port is always built from the upstream's weights through the real conversion
map, so a clean pair agrees to float32 round-off and every planted bug is the
only difference between the two sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from tracediff.demo.convert import convert_state_dict
from tracediff.demo.port_dit import TransformerBlock, VideoDiTTransformer
from tracediff.demo.upstream_dit import WanLikeModel

#: Seeds of model weights and of inputs are kept apart so they never share a stream.
_INPUT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class DemoConfig:
    """Size of the demo model and of its inputs; the defaults run in milliseconds on a CPU."""

    in_channels: int = 4
    out_channels: int = 4
    dim: int = 64
    num_heads: int = 4
    depth: int = 4
    ffn_dim: int = 128
    freq_dim: int = 32
    text_dim: int = 32
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    batch_size: int = 1
    num_frames: int = 2
    height: int = 8
    width: int = 8
    text_len: int = 8
    num_steps: int = 50
    sample_shift: float = 5.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads or self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"dim={self.dim} / num_heads={self.num_heads} must give an even head_dim >= 6")
        for size, patch, what in zip((self.num_frames, self.height, self.width), self.patch_size, "FHW", strict=True):
            if size % patch:
                raise ValueError(f"latent {what}={size} is not divisible by patch size {patch}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """``(B, C, F, H, W)`` of the model input and output."""
        return (self.batch_size, self.in_channels, self.num_frames, self.height, self.width)


class BugSpec(NamedTuple):
    """A planted bug and where a correct bisection must land."""

    description: str
    port_module: str
    upstream_module: str


BUGS: dict[str, BugSpec] = {
    "gelu_tanh": BugSpec(
        "block 2's FFN uses exact GELU where upstream uses the tanh approximation",
        "transformer_blocks.2.ffn.act",
        "blocks.2.ffn.1",
    ),
    "ln_eps": BugSpec(
        "block 1's pre-FFN LayerNorm uses eps=1e-2 instead of 1e-6",
        "transformer_blocks.1.norm_ffn",
        "blocks.1.norm2",
    ),
    "rope_sign": BugSpec(
        "block 2's self-attention rotates q/k by the conjugate angle (sine sign flipped in RoPE)",
        "transformer_blocks.2.attn1",
        "blocks.2.self_attn",
    ),
    "residual_scale": BugSpec(
        "block 3 adds the FFN output to the residual without its gate",
        "transformer_blocks.3",
        "blocks.3",
    ),
}
DEFAULT_BUG = "gelu_tanh"


def _block(port: VideoDiTTransformer, index: int) -> TransformerBlock:
    return cast(TransformerBlock, port.transformer_blocks[index])


def _gelu_exact(port: VideoDiTTransformer) -> None:
    _block(port, 2).ffn.act.approximate = "none"


def _ln_eps(port: VideoDiTTransformer) -> None:
    _block(port, 1).norm_ffn.eps = 1e-2


def _rope_sign(port: VideoDiTTransformer) -> None:
    _block(port, 2).attn1.rope_sin_sign = -1.0


def _ungated_mlp(port: VideoDiTTransformer) -> None:
    _block(port, 3).gate_mlp_residual = False


_PLANTERS: dict[str, Callable[[VideoDiTTransformer], None]] = {
    "gelu_tanh": _gelu_exact,
    "ln_eps": _ln_eps,
    "rope_sign": _rope_sign,
    "residual_scale": _ungated_mlp,
}


def plant_bug(port: nn.Module, bug: str) -> None:
    """Switch one planted bug on, in place, through the port's instance flags.

    Raises:
        ValueError: ``bug`` is not a key of :data:`BUGS`, or ``port`` is too shallow for it.
    """
    if bug not in _PLANTERS:
        raise ValueError(f"unknown demo bug {bug!r}; choose one of {', '.join(BUGS)}")
    if not isinstance(port, VideoDiTTransformer):
        raise ValueError(f"bugs can only be planted in the demo port, not {type(port).__name__}")
    culprit = BUGS[bug].port_module
    if culprit not in dict(port.named_modules()):
        raise ValueError(f"bug {bug!r} needs module {culprit!r}; this port is too shallow (use depth >= 4)")
    _PLANTERS[bug](port)


def _upstream_kwargs(cfg: DemoConfig) -> dict[str, Any]:
    return dict(
        in_dim=cfg.in_channels,
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        out_dim=cfg.out_channels,
        num_heads=cfg.num_heads,
        num_layers=cfg.depth,
        patch_size=cfg.patch_size,
        eps=cfg.eps,
        rope_theta=cfg.rope_theta,
    )


def _port_kwargs(cfg: DemoConfig) -> dict[str, Any]:
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        num_layers=cfg.depth,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        patch_size=cfg.patch_size,
        eps=cfg.eps,
        rope_theta=cfg.rope_theta,
    )


#: FFN hidden units are sparse, as in trained transformers: pre-activations ~ N(-2.5, 1.1),
#: GELU's negative tail, which is also where its erf and tanh forms disagree the most
#: relative to the output (~4e-3 instead of ~2e-4 for a dense N(0, 1) layer). That keeps the
#: "gelu_tanh" bug well above float32 noise at the model output.
_FFN_IN_BIAS_MEAN = -2.5
#: Sparse units output ~10x less; scaling ``ffn.2`` back keeps the FFN branch at O(1).
_FFN_OUT_GAIN = 10.0


def _randomise_(model: nn.Module, seed: int) -> None:
    """Overwrite every upstream parameter with seeded noise, biases and norm gains included.

    Default inits set biases to 0 and norm gains to 1, which makes a swapped or
    missing mapping of those parameters invisible; distinct per-element values
    expose it. Weights are scaled by fan-in so activations stay O(1) through the
    depth, which keeps the planted bugs far above float32 round-off.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("ffn.0.bias"):
                value = _FFN_IN_BIAS_MEAN + 0.5 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif param.ndim == 1:  # RMSNorm / LayerNorm gains
                value = 1.0 + 0.1 * noise
            elif name.endswith("modulation"):  # (1, k, dim) adaLN tables, as Wan inits them
                value = noise * param.shape[-1] ** -0.5
            else:  # Linear / Conv3d weights: fan-in is everything but dim 0
                value = noise * param[0].numel() ** -0.5
                if name.endswith("ffn.2.weight"):
                    value = value * _FFN_OUT_GAIN
            param.copy_(value)


def make_upstream(seed: int = 0, config: DemoConfig | None = None) -> nn.Module:
    """Build the upstream reference with every parameter drawn from ``seed``.

    The global torch RNG is left untouched.
    """
    cfg = config or DemoConfig()
    with torch.random.fork_rng(devices=[]):
        model = WanLikeModel(**_upstream_kwargs(cfg))
    _randomise_(model, seed)
    return model.eval()


def make_port(seed: int = 0, config: DemoConfig | None = None, bug: str | None = None) -> nn.Module:
    """Build the port from ``make_upstream(seed, config)``'s weights, optionally with a planted bug.

    The weights go through :func:`~tracediff.demo.convert.convert_state_dict` and a
    strict ``load_state_dict``, so a mapping mistake fails here rather than showing
    up later as a numerical difference.

    Raises:
        ValueError: ``bug`` is not a key of :data:`BUGS`.
    """
    cfg = config or DemoConfig()
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown demo bug {bug!r}; choose one of {', '.join(BUGS)}")
    upstream = make_upstream(seed, cfg)
    with torch.random.fork_rng(devices=[]):
        port = VideoDiTTransformer(**_port_kwargs(cfg))
    port_sd = convert_state_dict(upstream.state_dict(), expected_keys=port.state_dict().keys())
    port.load_state_dict(port_sd, strict=True)
    if bug is not None:
        plant_bug(port, bug)
    return port.eval()


def timestep_for_step(step: int, config: DemoConfig | None = None) -> float:
    """Timestep of denoising ``step`` under a shifted flow-matching schedule (Wan's sampler)."""
    cfg = config or DemoConfig()
    if not 0 <= step < cfg.num_steps:
        raise ValueError(f"step {step} is outside the demo schedule [0, {cfg.num_steps})")
    sigma = 1.0 - step / cfg.num_steps
    sigma = cfg.sample_shift * sigma / (1.0 + (cfg.sample_shift - 1.0) * sigma)
    return 1000.0 * sigma


def make_inputs(seed: int = 0, config: DemoConfig | None = None, step: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic ``{"x", "t", "context"}`` for one denoising step.

    ``x`` is the flow-matching interpolation between a seeded noise and a seeded
    "clean" latent at the step's noise level, so both ``x`` and ``t`` move with
    ``step`` while the prompt embedding ``context`` stays fixed, as in a sampler.
    """
    cfg = config or DemoConfig()
    t = timestep_for_step(step, cfg)
    generator = torch.Generator().manual_seed(seed + _INPUT_SEED_OFFSET)
    noise = torch.randn(cfg.latent_shape, generator=generator)
    clean = torch.randn(cfg.latent_shape, generator=generator)
    context = torch.randn((cfg.batch_size, cfg.text_len, cfg.text_dim), generator=generator)
    sigma = t / 1000.0
    return {
        "x": sigma * noise + (1.0 - sigma) * clean,
        "t": torch.full((cfg.batch_size,), t),
        "context": context,
    }
