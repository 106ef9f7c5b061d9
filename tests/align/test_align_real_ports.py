"""Alignment and record matching on the shapes real ports take (plain torch, no third-party models).

Three things the ViT parity family (tests/local_tests/vit) runs into with timm,
transformers and torchvision, reproduced here in miniature so the main suite
covers them:

* ``nn.MultiheadAttention`` owns the fused in-projection that the upstream keeps
  in ``attn.qkv``, but computes what the upstream's ``attn`` computes: the pair is
  ``attn`` <-> the MHA, and ``qkv`` has no counterpart;
* an activation followed by pass-through layers (dropout in eval, ``Identity``)
  upstream, against a bare activation in the port;
* a module returning ``(tensor, None)`` and a model returning a dict, against plain tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tracediff.parity import Settings, diagnose, make_pair

D, HEADS = 16, 2


class UpAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.norm = nn.Identity()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D)
        return self.proj(self.norm(out))


class UpMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.drop1(self.act(self.fc1(x)))))


class Upstream(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.norm1 = nn.LayerNorm(D)
        self.attn = UpAttention()
        self.norm2 = nn.LayerNorm(D)
        self.mlp = UpMlp()
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


class PortAttention(nn.Module):
    """Returns ``(output, None)``, like transformers' attention modules."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        out, _ = self.mha(x, x, x, need_weights=False)
        return out, None


class Port(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, D)
        self.ln_1 = nn.LayerNorm(D)
        self.attention = PortAttention()
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.classifier = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.proj_in(x)
        x = x + self.attention(self.ln_1(x))[0]
        x = x + self.mlp(self.ln_2(x))
        return {"logits": self.classifier(x)}


def _models() -> tuple[Upstream, Port]:
    torch.manual_seed(0)
    up = Upstream().eval()
    with torch.no_grad():
        for param in up.parameters():
            param.normal_(0.0, 0.3)
    port = Port().eval()
    renames = {"embed.": "proj_in.", "norm1.": "ln_1.", "attn.qkv.weight": "attention.mha.in_proj_weight",
               "attn.qkv.bias": "attention.mha.in_proj_bias", "attn.proj.": "attention.mha.out_proj.",
               "norm2.": "ln_2.", "mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.2.", "head.": "classifier."}
    converted = {}
    for name, tensor in up.state_dict().items():
        prefix = next(p for p in renames if name.startswith(p))
        converted[renames[prefix] + name[len(prefix):]] = tensor
    port.load_state_dict(converted)
    return up, port


def _analysis(tmp_path, port_call=None):
    up, port = _models()
    pair = make_pair(up, port, torch.randn(2, 5, 4), preset="single-block", port_call=port_call)
    diagnosis = diagnose(pair, tmp_path, Settings())
    assert diagnosis.analysis is not None, diagnosis.error
    return diagnosis.analysis


def test_multihead_attention_pairs_with_the_parent_of_the_fused_projection(tmp_path) -> None:
    analysis = _analysis(tmp_path)
    pairs = {p.upstream: p for p in analysis.alignment.pairs}
    assert pairs["attn"].port == "attention.mha"
    assert "attn.qkv" in pairs["attn"].note
    assert "attn.qkv" in analysis.alignment.unmatched_upstream
    assert pairs["attn.proj"].port == "attention.mha.out_proj"  # same weights; it never runs as a module


def test_activation_pairs_through_pass_through_layers(tmp_path) -> None:
    pairs = {p.upstream: p.port for p in _analysis(tmp_path).alignment.pairs}
    assert pairs["mlp.act"] == "mlp.1"
    assert "mlp.drop1" not in pairs and "mlp.norm" not in pairs


def test_tuple_and_dict_outputs_are_compared_against_tensors(tmp_path) -> None:
    analysis = _analysis(tmp_path)
    compared = {(row.port, row.label) for row in analysis.result.rows}
    assert ("attention.mha", "out[0]") in compared  # (output, None) against a tensor
    assert ("", "out.logits") in compared
    assert analysis, analysis.text()


def test_a_bug_inside_the_multihead_attention_is_named(tmp_path) -> None:
    """With the weights no longer equal, the port's conversion table still says which module holds them."""
    up, port = _models()
    with torch.no_grad():
        port.attention.mha.in_proj_bias[:D] += 0.5  # the query bias, converted wrong
    param_map = {r"^attn\.qkv\.(weight|bias)$": r"attention.mha.in_proj_\1"}
    pair = make_pair(up, port, torch.randn(2, 5, 4), preset="single-block", param_map=param_map)
    diagnosis = diagnose(pair, tmp_path, Settings())
    assert diagnosis.analysis is not None, diagnosis.error
    assert diagnosis.analysis.result.first_drift.port == "attention.mha"
