"""transformers' UMT5 encoder (upstream) and FastVideo's (port): tiny, random, loaded as FastVideo loads it.

The upstream is ``transformers.UMT5EncoderModel`` (Wan's text encoder is a
UMT5 encoder); every parameter is re-drawn after construction (the library
starts norms at one, which would hide a norm mapped to the wrong place). The
port is ``fastvideo.models.encoders.t5.UMT5EncoderModel``, built the way
FastVideo's ``TextEncoderLoader`` builds it (``T5Config().update_model_arch(hf
config)``, then the class) and loaded through the port's own
``load_weights(...)``, which fuses ``q``/``k``/``v`` into ``qkv_proj`` by the
arch config's ``stacked_params_mapping``. As the loader does, every port
parameter must have been loaded (:class:`NotLoaded` otherwise).

FastVideo needs a one-process gloo "distributed" environment and an attention
backend on the CPU (its ``CpuPlatform`` answers none: SDPA is pointed at), set
up once by :func:`setup_fastvideo`; the port is called inside FastVideo's
forward context (:func:`port_call`), as its pipeline calls it. Both are
``tests/local_tests/fastvideo_cpu.py``'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from fastvideo_cpu import forward_context, setup_fastvideo
from torch import nn

#: The tiny configuration (transformers' ``UMT5Config`` names, which FastVideo's ``T5ArchConfig`` shares).
TINY: dict[str, Any] = dict(
    vocab_size=100,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",  # UMT5's: gelu_new(wi_0 x) * wi_1 x
)
#: Token ids: batch 2 of 10 tokens; the second sequence is padded after 7 tokens (attention mask 0).
BATCH, TOKENS, PADDED_FROM = 2, 10, 7


class NotLoaded(AssertionError):
    """The port's loader left parameters at their initial values, or loaded names the port does not have."""


def make_upstream(seed: int = 0) -> nn.Module:
    """transformers' UMT5 encoder (its default SDPA attention), every parameter re-drawn from ``seed``."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**TINY)).eval()
    randomise(model, seed=seed)
    return model


def randomise(model: nn.Module, *, seed: int) -> None:
    """Re-draw every parameter so that no two tensors are alike and activations stay O(1).

    Projection matrices get fan-in scaled normals; RMSNorm scales ``1 + 0.2 N(0, 1)``;
    the token table and the relative-position bias tables ``0.5 N(0, 1)``. The token
    table is tied (``shared`` and ``encoder.embed_tokens`` hold one tensor): it is drawn once.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied tensors are listed once
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif isinstance(_owner(model, name), nn.Embedding):
                param.copy_(0.5 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


def port_config() -> Any:
    """FastVideo's text-encoder config, updated from the upstream's config as its loader does."""
    from fastvideo.configs.models.encoders.t5 import T5Config

    config = T5Config()
    config.update_model_arch({**TINY, "architectures": ["UMT5EncoderModel"]})
    return config


def make_port(upstream_state: Mapping[str, torch.Tensor], *,
              edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> nn.Module:
    """FastVideo's UMT5 encoder, loaded from ``upstream_state`` through its own ``load_weights``.

    Args:
        edit: changes (a copy of) ``upstream_state`` before the loader sees it (a conversion bug).

    Raises:
        NotLoaded: a port parameter the loader did not write (FastVideo's loader raises too),
            or a name it reports loaded that the port does not have.
    """
    setup_fastvideo()
    from fastvideo.models.encoders.t5 import UMT5EncoderModel

    state = dict(upstream_state)
    if edit is not None:
        edit(state)
    model = UMT5EncoderModel(port_config())
    expected = {name for name, _ in model.named_parameters()}
    loaded = model.load_weights((name, tensor.detach().clone()) for name, tensor in state.items())
    if loaded != expected:
        raise NotLoaded(f"port parameters not loaded: {sorted(expected - loaded)}; "
                        f"loaded but not in the port: {sorted(loaded - expected)}")
    return model.to(torch.float32).eval()


def param_names_mapping(upstream_state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The port's loader, written as a FastVideo ``param_names_mapping`` (tracediff's ``param_map``).

    FastVideo's UMT5 has no ``param_names_mapping``: its name table is the arch
    config's ``stacked_params_mapping`` (``.q``/``.k``/``.v`` -> ``.qkv_proj`` shards
    ``q``/``k``/``v``) applied inside ``load_weights``, which keeps every other name
    and skips names the port lacks. Here each upstream name is fed alone to the
    real ``load_weights`` of a scratch port, and the parameter it reports loaded is
    the target; a stacked name becomes ``(target, shard index, shards)``.
    """
    setup_fastvideo()
    from fastvideo.models.encoders.t5 import UMT5EncoderModel

    config = port_config()
    stacked = config.arch_config.stacked_params_mapping
    scratch = UMT5EncoderModel(config)
    out: dict[str, Any] = {}
    for name, tensor in upstream_state.items():
        loaded = scratch.load_weights([(name, tensor)])
        if not loaded:
            continue  # skipped by the loader: the tied encoder.embed_tokens.weight
        (target,) = loaded
        rule = next(((param, weight) for param, weight, _ in stacked if weight in name and param in target), None)
        key = "^" + re.escape(name) + "$"
        if rule is None:
            out[key] = target
            continue
        shards = [weight for param, weight, _ in stacked if param == rule[0]]  # q, k, v: concatenated in this order
        out[key] = (target, shards.index(rule[1]), len(shards))
    return out


def make_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids (no id 0, the pad id) and an attention mask that pads the second sequence."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (BATCH, TOKENS), generator=generator)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, PADDED_FROM:] = 0
    ids[1, PADDED_FROM:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def upstream_call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """How a parity test calls the upstream: the ``last_hidden_state`` of its ``BaseModelOutput``."""
    return model(**inputs).last_hidden_state


def port_call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """How a parity test calls the port: the ``last_hidden_state`` of its ``BaseEncoderOutput``."""
    with forward_context():
        return model(**inputs).last_hidden_state


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]

