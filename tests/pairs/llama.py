"""Bisection test pair: a tiny LLaMA written twice (``llama_ref`` HF-style, ``llama_port`` Meta/vLLM-style).

The port loads the reference's weights through :data:`PARAM_NAMES_MAPPING` (fused
``wqkv`` and ``w13``), the way a serving framework's loader would. Planted bugs
(:data:`BUGS`) are switched on through the port's instance flags; each names the
module a correct bisection must land on.

``gain`` scales every projection so that a small perturbation grows from layer
to layer, as accumulated drift does in deep trained models: used by the test
where the accumulated first drift lands layers after the culprit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from tests.pairs.llama_port import Transformer
from tests.pairs.llama_ref import LlamaForCausalLM
from tracediff.demo.convert import convert_state_dict

PARAM_NAMES_MAPPING: dict[str, Any] = {
    r"^model\.embed_tokens\.weight$": "tok_embeddings.weight",
    r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$": (r"layers.\1.attention.wqkv.weight", 0, 3),
    r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$": (r"layers.\1.attention.wqkv.weight", 1, 3),
    r"^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$": (r"layers.\1.attention.wqkv.weight", 2, 3),
    r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$": r"layers.\1.attention.wo.weight",
    r"^model\.layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)$": (r"layers.\1.feed_forward.w13.\2", 0, 2),
    r"^model\.layers\.(\d+)\.mlp\.up_proj\.(weight|bias)$": (r"layers.\1.feed_forward.w13.\2", 1, 2),
    r"^model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)$": r"layers.\1.feed_forward.w2.\2",
    r"^model\.layers\.(\d+)\.input_layernorm\.weight$": r"layers.\1.attention_norm.weight",
    r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$": r"layers.\1.ffn_norm.weight",
    r"^model\.norm\.weight$": "norm.weight",
    r"^lm_head\.weight$": "output.weight",
}


@dataclass(frozen=True)
class Config:
    vocab_size: int = 64
    dim: int = 32
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 64
    seq_len: int = 12
    gain: float = 1.0


class Bug(NamedTuple):
    description: str
    port_module: str
    upstream_module: str


BUGS: dict[str, Bug] = {
    "tp_bias": Bug("layer 2's row-parallel MLP output projection adds its bias on each of 2 ranks",
                   "layers.2.feed_forward.w2", "model.layers.2.mlp.down_proj"),
    "rope_conj": Bug("layer 1's attention rotates q/k by the conjugate angle inside apply_rotary_emb",
                     "layers.1.attention", "model.layers.1.self_attn"),
    "norm_eps": Bug("layer 1's attention RMSNorm uses eps=0.2 instead of 1e-6",
                    "layers.1.attention_norm", "model.layers.1.input_layernorm"),
}


def _plant(port: Transformer, bug: str) -> None:
    if bug == "tp_bias":
        w2 = port.layers[2].feed_forward.w2
        w2.tp_size, w2.bias_on_every_rank = 2, True
    elif bug == "rope_conj":
        port.layers[1].attention.rope_conjugate = True
    elif bug == "norm_eps":
        port.layers[1].attention_norm.eps = 0.2
    else:
        raise ValueError(f"unknown bug {bug!r}; choose one of {', '.join(BUGS)}")


def make_reference(seed: int = 0, config: Config | None = None, n_layers: int | None = None,
                   gain: float | None = None) -> nn.Module:
    """The upstream model with seeded weights (biases and norm gains included)."""
    cfg = _config(config, n_layers, gain)
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_layers=cfg.n_layers,
                                 num_heads=cfg.n_heads, intermediate_size=cfg.hidden_dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif param.ndim == 1:
                param.copy_(1.0 + 0.1 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(noise * cfg.gain * param.shape[1] ** -0.5)
    return model.eval()


def make_port(seed: int = 0, bug: str | None = None, config: Config | None = None, n_layers: int | None = None,
              gain: float | None = None) -> nn.Module:
    """The port, loaded from :func:`make_reference`'s weights through the conversion map."""
    cfg = _config(config, n_layers, gain)
    reference = make_reference(seed, cfg)
    port = Transformer(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       hidden_dim=cfg.hidden_dim)
    state = convert_state_dict(reference.state_dict(), PARAM_NAMES_MAPPING, expected_keys=port.state_dict().keys())
    port.load_state_dict(state, strict=True)
    if bug is not None:
        _plant(port, bug)
    return port.eval()


def make_inputs(seed: int = 0, step: int = 0, config: Config | None = None) -> dict[str, torch.Tensor]:
    cfg = config or Config()
    generator = torch.Generator().manual_seed(10_000 + seed + step)
    return {"tokens": torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), generator=generator)}


def call_reference(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The two sides name their argument differently: ``input_ids`` upstream, ``tokens`` in the port."""
    return model(input_ids=inputs["tokens"])


def _config(config: Config | None, n_layers: int | None, gain: float | None) -> Config:
    cfg = config or Config()
    changes = {k: v for k, v in (("n_layers", n_layers), ("gain", gain)) if v is not None}
    return Config(**{**cfg.__dict__, **changes}) if changes else cfg
