"""The two ports of timm's ViT under test: how to build each, load timm's weights, call it, break it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import vit_convert
import vit_models
from torch import nn
from vit_bugs import TORCHVISION_BUGS, TRANSFORMERS_BUGS, Bug


@dataclass(frozen=True)
class Port:
    """One port of timm's ViT: how to build it, load timm's weights into it, and call it."""

    name: str
    make: Callable[[], nn.Module]
    mapping: dict[str, str]
    splits: dict[str, tuple[str, ...]]
    call: Callable[[nn.Module, Any], Any] | None
    bugs: tuple[Bug, ...]

    def build(self, upstream: nn.Module, *, transpose: tuple[str, ...] = ()) -> nn.Module:
        """A fresh port holding the upstream's weights, converted the port's way."""
        model = self.make()
        state = vit_convert.convert(upstream.state_dict(), self.mapping, self.splits, transpose=transpose)
        model.load_state_dict(state, strict=True)
        return model.eval()

    def bug(self, name: str) -> Bug:
        return next(bug for bug in self.bugs if bug.name == name)


PORTS = {
    "transformers": Port(
        "transformers",
        vit_models.make_transformers,
        vit_convert.TIMM_TO_TRANSFORMERS,
        vit_convert.TIMM_TO_TRANSFORMERS_SPLITS,
        vit_models.transformers_logits,
        TRANSFORMERS_BUGS,
    ),
    "torchvision": Port(
        "torchvision",
        vit_models.make_torchvision,
        vit_convert.TIMM_TO_TORCHVISION,
        vit_convert.TIMM_TO_TORCHVISION_SPLITS,
        None,
        TORCHVISION_BUGS,
    ),
}
