"""Bisection test pair, port side: the same tiny LLaMA written serving-framework style.

Meta/vLLM naming (``tok_embeddings``, ``layers.N.attention.wqkv`` fused,
``attention.wo``, ``feed_forward.w13`` fused gate+up, ``feed_forward.w2``,
``attention_norm``, ``ffn_norm``, ``output``), RMSNorm through ``F.rms_norm``,
RoPE with complex numbers on the half-split layout (so the upstream's weights need
no permutation), ``F.scaled_dot_product_attention(is_causal=True)``, and a
vLLM-style ``RowLinear`` that returns ``(output, bias)``. Called as ``model(tokens)``.

Planted bugs are instance flags whose defaults keep the clean path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end, dtype=torch.float32)
    return torch.polar(torch.ones(end, head_dim // 2), torch.outer(t, freqs))


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor, *, conjugate: bool = False) -> torch.Tensor:
    """Rotate (B, S, H, D) by position; channel ``i`` pairs with ``i + D/2`` (the half-split layout)."""
    half = x.shape[-1] // 2
    x_c = torch.complex(x[..., :half].float(), x[..., half:].float())
    freqs = freqs_cis[None, :, None, :]
    if conjugate:  # planted bug "rope_conj": rotate by the opposite angle
        freqs = freqs.conj()
    rotated = x_c * freqs
    return torch.cat([rotated.real, rotated.imag], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.rope_conjugate = False

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wqkv(x).split(x.shape[-1], dim=-1)
        xq = xq.view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_heads, self.head_dim)
        xq = apply_rotary_emb(xq, freqs_cis, conjugate=self.rope_conjugate)
        xk = apply_rotary_emb(xk, freqs_cis, conjugate=self.rope_conjugate)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class RowLinear(nn.Linear):
    """A vLLM-style row-parallel linear layer (one rank here): returns ``(output, output_bias)``.

    Its partial products would be all-reduced over ``tp_size`` ranks; the bias must
    then be added once, not once per rank.
    """

    tp_size = 1
    bias_on_every_rank = False  # planted bug "tp_bias": each rank adds the bias before the reduction

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        if self.bias_on_every_rank:
            partial = F.linear(x, self.weight) + self.bias
            return partial + (self.tp_size - 1) * self.bias, None  # what the all-reduce would sum up
        return F.linear(x, self.weight, self.bias), None


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=True)
        self.w2 = RowLinear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        out, _ = self.w2(F.silu(gate) * up)
        return out


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden_dim: int, eps: float) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = Attention(dim, n_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = FeedForward(dim, hidden_dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, *, vocab_size: int, dim: int, n_layers: int, n_heads: int, hidden_dim: int,
                 eps: float = 1e-6, rope_theta: float = 10000.0, max_seq_len: int = 64) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_heads, hidden_dim, eps) for _ in range(n_layers))
        self.norm = RMSNorm(dim, eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.freqs_cis = precompute_freqs_cis(dim // n_heads, max_seq_len, rope_theta)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[: tokens.shape[1]].to(h.device)
        for layer in self.layers:
            h = layer(h, freqs_cis)
        return self.output(self.norm(h))
