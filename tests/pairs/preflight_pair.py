"""A second upstream/port pair for the pre-flight tests, with a buffer and renamed inputs.

Upstream (``RefModel``) and port (``PortModel``) compute the same function with
different module names, argument names (``x``/``context`` against
``hidden_states``/``encoder_hidden_states``) and one buffer each: rotary
inverse frequencies, computed in ``__init__`` and not part of the state dict,
as in most transformer ports. The port loads upstream's weights through
:data:`PARAM_MAP`; the buffer it computes itself, so a wrong ``rope_theta``
there is exactly the "buffer computed differently" bug. ``head_layout="in_out"``
keeps the output projection as ``(in, out)`` and multiplies from the right: the
same function, a weight stored transposed.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

DIM, IN_DIM, CONTEXT_DIM, OUT_DIM, ROPE_DIM, DEPTH = 16, 8, 12, 4, 8, 2
SEQ, CONTEXT_LEN = 6, 5
THETA = 10000.0

#: upstream parameter name (regex) -> port parameter name, FastVideo ``param_names_mapping`` style.
PARAM_MAP: dict[str, str] = {
    r"^proj_in\.(weight|bias)$": r"embed.\1",
    r"^context_proj\.(weight|bias)$": r"cond_embed.\1",
    r"^layers\.(\d+)\.norm\.(weight|bias)$": r"blocks.\1.ln.\2",
    r"^layers\.(\d+)\.mlp_in\.(weight|bias)$": r"blocks.\1.fc1.\2",
    r"^layers\.(\d+)\.mlp_out\.(weight|bias)$": r"blocks.\1.fc2.\2",
    r"^proj_out\.(weight|bias)$": r"head.\1",
}


def inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rotate(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs ``(0, 1), (2, 3), …`` of the first ``2 * len(inv_freq)`` features by position."""
    dim = 2 * inv_freq.numel()
    angles = torch.arange(x.shape[1], dtype=x.dtype)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0:dim:2], x[..., 1:dim:2]
    turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([turned, x[..., dim:]], dim=-1)


# -- upstream ---------------------------------------------------------------------------


class RefRotary(nn.Module):
    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(dim, theta), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.inv_freq)


class RefLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, 2 * dim)
        self.mlp_out = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_out(torch.nn.functional.gelu(self.mlp_in(self.norm(x))))


class RefModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(IN_DIM, DIM)
        self.context_proj = nn.Linear(CONTEXT_DIM, DIM)
        self.rotary = RefRotary(ROPE_DIM, THETA)
        self.layers = nn.ModuleList(RefLayer(DIM) for _ in range(DEPTH))
        self.proj_out = nn.Linear(DIM, OUT_DIM)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.rotary(self.proj_in(x))
        c = self.context_proj(context).mean(dim=1, keepdim=True)
        for layer in self.layers:
            h = h + layer(h + c)
        return self.proj_out(h)


# -- port -------------------------------------------------------------------------------


class PortRotary(nn.Module):
    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        self.register_buffer("freqs", inverse_frequencies(dim, theta), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.freqs)


class PortBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


class InOutLinear(nn.Module):
    """``x @ weight + bias`` with ``weight`` stored ``(in, out)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim_in, dim_out))
        self.bias = nn.Parameter(torch.zeros(dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class PortModel(nn.Module):
    def __init__(self, *, rope_theta: float = THETA, head_layout: str = "linear") -> None:
        super().__init__()
        self.embed = nn.Linear(IN_DIM, DIM)
        self.cond_embed = nn.Linear(CONTEXT_DIM, DIM)
        self.rope = PortRotary(ROPE_DIM, rope_theta)
        self.blocks = nn.ModuleList(PortBlock(DIM) for _ in range(DEPTH))
        self.head: nn.Module = InOutLinear(DIM, OUT_DIM) if head_layout == "in_out" else nn.Linear(DIM, OUT_DIM)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.rope(self.embed(hidden_states))
        c = self.cond_embed(encoder_hidden_states).mean(dim=1, keepdim=True)
        for block in self.blocks:
            h = h + block(h + c)
        return self.head(h)


# -- building -----------------------------------------------------------------------------


def make_upstream(seed: int = 0) -> RefModel:
    """The reference with every parameter drawn from ``seed`` (norm gains and biases included)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RefModel()
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn(param.shape) * (0.1 if param.ndim == 1 else param.shape[-1] ** -0.5))
    return model.eval()


def convert(upstream_sd: dict[str, torch.Tensor], *, head_layout: str = "linear") -> dict[str, torch.Tensor]:
    """Rename upstream's state dict through :data:`PARAM_MAP` (and transpose the head for ``in_out``)."""
    out = {}
    for name, tensor in upstream_sd.items():
        for pattern, template in PARAM_MAP.items():
            match = re.match(pattern, name)
            if match:
                target = match.expand(template)
                out[target] = tensor.t().contiguous() if head_layout == "in_out" and target == "head.weight" else tensor
                break
        else:
            raise KeyError(f"no rule for {name!r}")
    return out


def make_port(seed: int = 0, *, rope_theta: float = THETA, head_layout: str = "linear") -> PortModel:
    """The port, loaded from ``make_upstream(seed)``'s converted weights."""
    with torch.random.fork_rng(devices=[]):
        port = PortModel(rope_theta=rope_theta, head_layout=head_layout)
    port.load_state_dict(convert(make_upstream(seed).state_dict(), head_layout=head_layout), strict=True)
    return port.eval()


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Upstream's keyword arguments ``x`` and ``context``."""
    generator = torch.Generator().manual_seed(seed + 7)
    return {"x": torch.randn(1, SEQ, IN_DIM, generator=generator),
            "context": torch.randn(1, CONTEXT_LEN, CONTEXT_DIM, generator=generator)}


def port_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The same tensors under the port's argument names."""
    return {"hidden_states": inputs["x"], "encoder_hidden_states": inputs["context"]}
