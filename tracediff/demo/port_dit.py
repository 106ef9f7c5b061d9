"""The demo's "port": the same video DiT re-implemented FastVideo/diffusers-style.

Written independently of :mod:`tracediff.demo.upstream_dit`, the way a serving
framework re-implements a research model: diffusers-like names, a fused QKV
projection, a real-valued cos/sin RoPE, a condition embedder that returns a tuple,
and sub-modules declared in a different order than they run (``attn2`` before
``attn1``). Weights come from the upstream through
:data:`tracediff.demo.convert.PARAM_NAMES_MAPPING`.

The forward keeps the upstream call signature ``(x, t, context)`` and returns a
plain tensor, so both sides can be driven with the same ``model(**inputs)``.

Planted bugs (see :mod:`tracediff.demo.models`) are switched on through
instance flags whose defaults leave the clean code path untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers-style sinusoidal embedding, ``flip_sin_to_cos`` order: ``[cos | sin]``.

    Evaluated in float64: the arguments reach ``1000 * freq`` and float32 would
    put the embedding ~1e-4 away from the reference.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64, device=timesteps.device) / half
    args = timesteps.to(torch.float64)[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_cos_sin(
    grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rotation angles for a (frames, height, width) grid.

    The head dimension is split into a temporal band and two equal spatial bands
    (``2 * (head_dim // 6)`` channels each). Returns ``cos`` and ``sin`` of shape
    ``(S, head_dim // 2)``, one angle per interleaved channel pair.
    """
    hw_dim = 2 * (head_dim // 6)
    axis_dims = (head_dim - 2 * hw_dim, hw_dim, hw_dim)
    angles = []
    for axis, (size, axis_dim) in enumerate(zip(grid, axis_dims, strict=True)):
        inv_freq = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        axis_angles = torch.arange(size, dtype=torch.float64, device=device)[:, None] * inv_freq
        view = [1, 1, 1, -1]
        view[axis] = size
        angles.append(axis_angles.view(view).expand(*grid, -1))
    angle = torch.cat(angles, dim=-1).flatten(0, 2)
    return angle.cos(), angle.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x`` (B, H, S, D) by the given angles."""
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H*D)."""
    return x.transpose(1, 2).flatten(2)


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, written out (the port's "portable" backend)."""
    scores = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
    return scores.softmax(dim=-1) @ v


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Low-precision activations are normalised in float32; float64 is left alone."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    """RMSNorm through ``F.rms_norm``, computed in float32 or wider."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _upcast(x)
        return F.rms_norm(h, self.weight.shape, self.weight.to(h.dtype), self.eps).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are taken in float32 or wider."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _upcast(x)
        weight = self.weight.to(h.dtype) if self.weight is not None else None
        bias = self.bias.to(h.dtype) if self.bias is not None else None
        return F.layer_norm(h, self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Self-attention with one fused QKV projection, QK-norm and 3-D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.to_out = nn.Linear(dim, dim)
        # Planted-bug switch ("rope_sign"): -1.0 rotates by the conjugate angle.
        self.rope_sin_sign = 1.0

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.to_qkv(hidden_states).chunk(3, dim=-1)
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
        cos, sin = rotary
        if self.rope_sin_sign != 1.0:
            sin = sin * self.rope_sin_sign
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.to_out(merge_heads(scaled_dot_product(q, k, v)))


class CrossAttention(nn.Module):
    """Attention from video tokens to text tokens, QK-normed, no RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.norm_q(self.to_q(hidden_states)), self.num_heads)
        k = split_heads(self.norm_k(self.to_k(encoder_hidden_states)), self.num_heads)
        v = split_heads(self.to_v(encoder_hidden_states), self.num_heads)
        return self.to_out(merge_heads(scaled_dot_product(q, k, v)))


class FeedForward(nn.Module):
    """Two-layer MLP with a tanh-approximated GELU module in between."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class TransformerBlock(nn.Module):
    """DiT block with adaLN-style shift/scale/gate from ``scale_shift_table``."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        # Declared cross-attention first on purpose: definition order != run order.
        self.norm_cross = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn2 = CrossAttention(dim, num_heads, eps)
        self.norm_attn = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = SelfAttention(dim, num_heads, eps)
        self.norm_ffn = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, ffn_dim)
        # Planted-bug switch ("residual_scale"): False adds the MLP output ungated.
        self.gate_mlp_residual = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_proj: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + timestep_proj
        ).chunk(6, dim=1)

        attn_in = self.norm_attn(hidden_states) * (1 + scale_msa) + shift_msa
        hidden_states = hidden_states + gate_msa * self.attn1(attn_in, rotary)

        hidden_states = hidden_states + self.attn2(self.norm_cross(hidden_states), encoder_hidden_states)

        ffn_out = self.ffn(self.norm_ffn(hidden_states) * (1 + c_scale_msa) + c_shift_msa)
        if self.gate_mlp_residual:
            ffn_out = c_gate_msa * ffn_out
        return hidden_states + ffn_out


class PatchEmbed(nn.Module):
    """Conv3d patchifier: (B, C, F, H, W) -> (B, S, dim) tokens, frame-major."""

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x.permute(0, 2, 3, 4, 1).flatten(1, 3)


class TimestepEmbedder(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(timestep, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(freqs)))


class TimeModulation(nn.Module):
    """SiLU -> Linear to the six per-block modulation vectors."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(temb))


class TextEmbedder(nn.Module):
    """Projects text-encoder states to the model width (GELU-tanh MLP)."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(text_dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class ConditionEmbedder(nn.Module):
    """Embeds timestep and text together; returns ``(temb, timestep_proj, text)``.

    The tuple output is deliberate: it is the one inner module of the demo whose
    output is not a single tensor, as in FastVideo's ``condition_embedder``.
    """

    def __init__(self, dim: int, freq_dim: int, text_dim: int) -> None:
        super().__init__()
        self.time_embedder = TimestepEmbedder(freq_dim, dim)
        self.time_modulation = TimeModulation(dim)
        self.text_embedder = TextEmbedder(text_dim, dim)

    def forward(
        self, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        temb = self.time_embedder(timestep)
        timestep_proj = self.time_modulation(temb).unflatten(1, (6, -1))
        return temb, timestep_proj, self.text_embedder(encoder_hidden_states)


class VideoDiTTransformer(nn.Module):
    """The ported transformer; ``forward(x, t, context)`` returns the predicted latent."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        num_attention_heads: int,
        attention_head_dim: int,
        num_layers: int,
        ffn_dim: int,
        freq_dim: int,
        text_dim: int,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        eps: float = 1e-6,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.patch_size: tuple[int, int, int] = (patch_size[0], patch_size[1], patch_size[2])
        self.out_channels = out_channels
        self.head_dim = attention_head_dim
        self.rope_theta = rope_theta

        self.patch_embed = PatchEmbed(in_channels, inner_dim, self.patch_size)
        self.condition_embedder = ConditionEmbedder(inner_dim, freq_dim, text_dim)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner_dim, ffn_dim, num_attention_heads, eps) for _ in range(num_layers)
        )
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)
        self.final_norm = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(self.patch_size))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, frames, height, width = x.shape
        p_t, p_h, p_w = self.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)

        hidden_states = self.patch_embed(x)
        rotary = rope_cos_sin(grid, self.head_dim, self.rope_theta, x.device)
        temb, timestep_proj, encoder_hidden_states = self.condition_embedder(t, context)

        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = self.proj_out(self.final_norm(hidden_states) * (1 + scale) + shift)

        # (B, S, pt*ph*pw*C) -> (B, C, F, H, W)
        hidden_states = hidden_states.reshape(batch, *grid, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
