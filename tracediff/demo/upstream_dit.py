"""The demo's "upstream reference": a tiny Wan2.1-style video DiT.

Written the way the upstream research code is written (Wan names, ``nn.Sequential``
sub-layers addressed by index, complex-number RoPE in float64 applied by a free
function), so that the port in :mod:`tracediff.demo.port_dit` has to be matched to
it through a real weight-conversion map rather than by identical names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Timestep embedding ``[cos | sin]``, computed in float64.

    Timesteps reach 1000, so float32 arguments would already be off by ~1e-4.
    """
    half = dim // 2
    position = position.to(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_params(max_seq_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Unit complex rotations ``exp(i * pos * freq)`` of shape ``(max_seq_len, dim // 2)``."""
    freqs = torch.outer(
        torch.arange(max_seq_len, dtype=torch.float64),
        1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim)),
    )
    return torch.polar(torch.ones_like(freqs), freqs)


def rope_apply(x: torch.Tensor, grid_size: tuple[int, int, int], freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` (B, S, N, D) by 3-D positions.

    The head dimension is split into frame / height / width bands; each band is
    rotated by the token's coordinate along its axis.
    """
    n, c = x.size(2), x.size(3) // 2
    f, h, w = grid_size
    seq_len = f * h * w
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    freqs_i = torch.cat(
        [
            freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(seq_len, 1, -1)
    x_i = torch.view_as_complex(x[:, :seq_len].to(torch.float64).reshape(x.size(0), seq_len, n, -1, 2))
    x_i = torch.view_as_real(x_i * freqs_i).flatten(3)
    return torch.cat([x_i, x[:, seq_len:].to(torch.float64)], dim=1).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention on ``(B, S, N, D)`` tensors (the flash-attention layout)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    """Norm statistics never run below float32 (but float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


class WanRMSNorm(nn.Module):
    """RMSNorm over the full model width, with a learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.to(_norm_dtype(x))).type_as(x) * self.weight

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in (at least) float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _norm_dtype(x)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).type_as(x)


class WanSelfAttention(nn.Module):
    """Self-attention with QK RMSNorm and 3-D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps)
        self.norm_k = WanRMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int, int], freqs: torch.Tensor) -> torch.Tensor:
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        x = attention(rope_apply(q, grid_size, freqs), rope_apply(k, grid_size, freqs), v)
        return self.o(x.flatten(2))


class WanT2VCrossAttention(WanSelfAttention):
    """Cross-attention from video tokens to text tokens (no RoPE)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, n, d = x.size(0), self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        return self.o(attention(q, k, v).flatten(2))


class WanLikeBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = WanT2VCrossAttention(dim, num_heads, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: Any,  # a tensor, then its six chunks: Wan's own code reuses the name, and reports quote these lines
        grid_size: tuple[int, int, int],
        freqs: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        e = (self.modulation + e).chunk(6, dim=1)
        y = self.self_attn(self.norm1(x) * (1 + e[1]) + e[0], grid_size, freqs)
        x = x + y * e[2]
        x = x + self.cross_attn(self.norm3(x), context)
        y = self.ffn(self.norm2(x) * (1 + e[4]) + e[3])
        return x + y * e[5]


class Head(nn.Module):
    """Final modulated norm and projection back to patch pixels."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: Any) -> torch.Tensor:  # e: a tensor, then its two chunks (as in Wan)
        e = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + e[1]) + e[0])


class WanLikeModel(nn.Module):
    """Text-to-video DiT: ``forward(x, t, context)`` predicts a latent of ``x``'s shape."""

    def __init__(
        self,
        in_dim: int = 16,
        dim: int = 2048,
        ffn_dim: int = 8192,
        freq_dim: int = 256,
        text_dim: int = 4096,
        out_dim: int = 16,
        num_heads: int = 16,
        num_layers: int = 32,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        eps: float = 1e-6,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0 and (dim // num_heads) % 2 == 0
        self.dim = dim
        self.freq_dim = freq_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.patch_size: tuple[int, int, int] = (patch_size[0], patch_size[1], patch_size[2])

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanLikeBlock(dim, ffn_dim, num_heads, eps) for _ in range(num_layers))
        self.head = Head(dim, out_dim, self.patch_size, eps)

        # Like Wan: a plain attribute, not a buffer, so it is absent from the state dict.
        d = dim // num_heads
        self.freqs = torch.cat(
            [
                rope_params(1024, d - 4 * (d // 6), rope_theta),
                rope_params(1024, 2 * (d // 6), rope_theta),
                rope_params(1024, 2 * (d // 6), rope_theta),
            ],
            dim=1,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.freqs.device != x.device:
            self.freqs = self.freqs.to(x.device)

        x = self.patch_embedding(x)
        grid_size = (x.size(2), x.size(3), x.size(4))
        x = x.flatten(2).transpose(1, 2)

        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t).to(x.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))
        context = self.text_embedding(context)

        for block in self.blocks:
            x = block(x, e0, grid_size, self.freqs, context)

        x = self.head(x, e)
        return self.unpatchify(x, grid_size)

    def unpatchify(self, x: torch.Tensor, grid_size: tuple[int, int, int]) -> torch.Tensor:
        """Fold ``(B, S, prod(patch) * C)`` tokens back into a ``(B, C, F, H, W)`` latent."""
        c = self.out_dim
        out = []
        for u in x:
            u = u[: math.prod(grid_size)].view(*grid_size, *self.patch_size, c)
            u = torch.einsum("fhwpqrc->cfphqwr", u)
            out.append(u.reshape(c, *[i * j for i, j in zip(grid_size, self.patch_size, strict=True)]))
        return torch.stack(out)
