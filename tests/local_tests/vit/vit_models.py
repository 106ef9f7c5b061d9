"""Three independently written ViTs at one tiny size, with the same random weights.

timm's ``VisionTransformer`` is the upstream (reference) side; transformers'
``ViTForImageClassification`` and torchvision's ``VisionTransformer`` are two
ports of it. Every parameter of the timm model is re-drawn after construction
(the libraries start biases at zero and norms at one, which would hide a bias
or a norm mapped to the wrong place), then converted into each port by
:mod:`convert`, the way a real port loads an upstream checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTSize:
    """One ViT shape, shared by the three implementations."""

    image: int = 32
    patch: int = 8
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp: int = 256
    classes: int = 10
    batch: int = 2
    #: timm's and torchvision's ViT LayerNorm eps; transformers' default (1e-12) must be overridden.
    eps: float = 1e-6

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1


TINY = ViTSize()


def make_timm(size: ViTSize = TINY, *, seed: int = 0) -> nn.Module:
    """The upstream: timm's ViT with a class-token head, every parameter re-drawn from ``seed``."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=size.image,
        patch_size=size.patch,
        num_classes=size.classes,
        global_pool="token",
        embed_dim=size.width,
        depth=size.depth,
        num_heads=size.heads,
        mlp_ratio=size.mlp / size.width,
        qkv_bias=True,
    )
    randomise(model, seed=seed)
    return model.eval()


def make_transformers(size: ViTSize = TINY) -> nn.Module:
    """The first port: transformers' ``ViTForImageClassification`` (weights still its own)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=size.image,
        patch_size=size.patch,
        hidden_size=size.width,
        num_hidden_layers=size.depth,
        num_attention_heads=size.heads,
        intermediate_size=size.mlp,
        hidden_act="gelu",
        layer_norm_eps=size.eps,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
        num_labels=size.classes,
    )
    return ViTForImageClassification(config).eval()


def make_torchvision(size: ViTSize = TINY) -> nn.Module:
    """The second port: torchvision's ``VisionTransformer`` (weights still its own)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=size.image,
        patch_size=size.patch,
        num_layers=size.depth,
        num_heads=size.heads,
        hidden_dim=size.width,
        mlp_dim=size.mlp,
        num_classes=size.classes,
    ).eval()


def make_inputs(size: ViTSize = TINY, *, seed: int = 1) -> torch.Tensor:
    """A batch of random images, ``(batch, 3, image, image)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size.batch, 3, size.image, size.image, generator=generator)


def randomise(model: nn.Module, *, seed: int) -> None:
    """Re-draw every parameter so that no two tensors are alike and activations stay O(1).

    Matrices get fan-in scaled normals; 1-d weights (norm scales) ``1 + 0.2 N(0, 1)``;
    biases ``0.1 N(0, 1)``; token and position tables ``0.5 N(0, 1)``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2 and name.endswith("weight"):
                fan_in = math.prod(param.shape[1:])
                param.copy_(noise / math.sqrt(fan_in))
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.5 * noise)


def timm_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """How a parity test calls the upstream: ``model(images)``."""
    return model(images)


def transformers_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """How a parity test calls the transformers port: the logits of its ``ImageClassifierOutput``."""
    return model(pixel_values=images).logits
