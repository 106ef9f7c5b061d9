"""Pre-flight on tied and padded tables: layout is not a finding, a wrong value still is.

Upstream ties its language-model head to its token embedding (``head.weight`` *is*
``embed.weight``: one tensor, two modules). The port has one embedding
(``tokens``) and multiplies by its transpose; its table may be padded from 50 to
64 rows with zero rows, as FastVideo's and vLLM's ``VocabParallelEmbedding`` pad a
vocabulary. The port's modules are named differently from upstream's, so the
``inferred`` runs pair them through the aligner and by value, the ``param_map``
runs through :data:`PARAM_MAP` (which, like a real loader, has no rule for the
tied ``head.weight``). Every case is checked on the live models (exact) and on
real HDF5 traces (fingerprints).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import tracediff.render.preflight as words
from tracediff import TraceConfig
from tracediff.pipeline.analyse import analyse
from tracediff.pipeline.runner import trace_model
from tracediff.preflight import PreflightResult, check_models, check_traces
from tracediff.store.load import load_trace

VOCAB, PADDED, DIM, SEQ = 50, 64, 32, 7
STATS = "abs_mean,sum,min,max,std,l2,nan_count,inf_count,sample"
#: upstream parameter name (regex) -> port parameter name; ``head.weight`` has no rule (it is ``embed.weight``).
PARAM_MAP: dict[str, str] = {
    r"^embed\.weight$": "tokens.weight",
    r"^norm\.(weight|bias)$": r"ln.\1",
    r"^proj\.(weight|bias)$": r"fc.\1",
}
MODES = pytest.mark.parametrize("param_map", [None, PARAM_MAP], ids=["inferred", "param_map"])


class TiedRef(nn.Module):
    """Embedding, norm, projection, and a head whose weight is the embedding's (``tied=False``: its own)."""

    def __init__(self, *, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.norm(self.embed(ids))))


class OneTablePort(nn.Module):
    """One embedding of ``rows >= VOCAB`` rows; its first ``VOCAB`` rows, transposed, are the head."""

    def __init__(self, rows: int = VOCAB, *, bias: bool = True) -> None:
        super().__init__()
        self.tokens = nn.Embedding(rows, DIM)
        self.ln = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, DIM, bias=bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.fc(self.ln(self.tokens(ids))), self.tokens.weight[:VOCAB])


def make_upstream(*, tied: bool = True, zero_biases: bool = False) -> TiedRef:
    """Every parameter drawn at random (norm gains included); ``zero_biases``: norm and projection biases 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TiedRef(tied=tied)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(torch.randn(param.shape) * (0.5 if param.ndim == 1 else param.shape[-1] ** -0.5))
                if zero_biases and name.endswith("bias"):
                    param.zero_()
    return model.eval()


def make_port(upstream: TiedRef, rows: int = VOCAB, *, padding: str = "zeros", bias: bool = True) -> OneTablePort:
    """The port loaded from ``upstream``: ``padding`` is ``zeros`` (what the loaders do) or ``random``."""
    port = OneTablePort(rows, bias=bias)
    with torch.no_grad():
        port.tokens.weight.zero_()
        if padding == "random":
            port.tokens.weight.copy_(torch.randn(rows, DIM, generator=torch.Generator().manual_seed(3)))
        port.tokens.weight[:VOCAB] = upstream.embed.weight
        for up_name, tensor in upstream.state_dict().items():
            for pattern, target in PARAM_MAP.items():
                match = re.match(pattern, up_name)
                if match and not pattern.startswith(r"^embed") and match.expand(target) in port.state_dict():
                    port.state_dict()[match.expand(target)].copy_(tensor)
    return port.eval()


def shifted(port: OneTablePort) -> OneTablePort:
    """Real rows 0 and 1 trade places: each holds its neighbour's values (same values, wrong place)."""
    with torch.no_grad():
        table = port.tokens.weight
        table[[0, 1]] = table[[1, 0]].clone()
    return port


def off_by_one(port: OneTablePort) -> OneTablePort:
    """The real rows start one row late (a padding row inserted in front)."""
    with torch.no_grad():
        table = port.tokens.weight
        table[1:VOCAB + 1] = table[:VOCAB].clone()
        table[0] = 0.0
    return port


def inputs() -> dict[str, torch.Tensor]:
    return {"ids": torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))}


CASES = {
    "tied": lambda: (make_upstream(), make_port(make_upstream())),
    "padded": lambda: (make_upstream(), make_port(make_upstream(), PADDED)),
    "shifted": lambda: (make_upstream(), shifted(make_port(make_upstream(), PADDED))),
    "off_by_one": lambda: (make_upstream(), off_by_one(make_port(make_upstream(), PADDED))),
    "nonzero_padding": lambda: (make_upstream(), make_port(make_upstream(), PADDED, padding="random")),
    "untied": lambda: (make_upstream(tied=False), make_port(make_upstream(tied=False))),
    "missing": lambda: (make_upstream(), make_port(make_upstream(), PADDED, bias=False)),
    "missing_zero": lambda: (make_upstream(zero_biases=True), make_port(make_upstream(zero_biases=True), bias=False)),
}


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """``case -> (upstream trace, port trace)``, real HDF5 files recorded from one forward pass each."""
    root = tmp_path_factory.mktemp("tied_padded")
    out = {}
    for case, build in CASES.items():
        upstream, port = build()
        paths = []
        for model, side in ((upstream, "upstream"), (port, "port")):
            path = root / f"{case}-{side}.h5"
            trace_model(model, side=side, steps=[inputs()], output=path, config=TraceConfig(stats=STATS))
            paths.append(path)
        out[case] = (paths[0], paths[1])
    return out


def results(case: str, traces: dict[str, tuple[Path, Path]], param_map: dict | None) -> list[PreflightResult]:
    """The live check and the check from the two trace files."""
    upstream, port = CASES[case]()
    live = check_models(upstream, port, param_map=param_map)
    with load_trace(traces[case][0]) as up, load_trace(traces[case][1]) as tr:
        traced = check_traces(up, tr, param_map=param_map)
    return [live, traced]


def by_upstream(result: PreflightResult, name: str):
    (check,) = [p for p in result.params if p.upstream == name]
    return check


# -- layout, not a finding ---------------------------------------------------------------


@MODES
def test_a_tied_head_is_not_missing_in_the_port(traces, param_map) -> None:
    for result, how in zip(results("tied", traces, param_map), ("one tensor", "identical values"), strict=True):
        assert result, words.summary(result) + "\n" + "\n".join(words.line(p) for p in result.weight_findings)
        assert words.counts_line(result) == "6 parameters compared: 5 identical, 1 tied"
        head = by_upstream(result, "head.weight")
        assert (head.status, head.finding, head.failing, head.port) == ("tied", False, False, None)
        # Live models show one tensor under two names; a trace only that the values are identical.
        assert words.line(head) == (f"upstream head.weight tied to embed.weight ({how}), which is compared with "
                               "port tokens.weight")
        assert words.line(head) in words.notes(result)
        assert by_upstream(result, "embed.weight").port == "tokens.weight"


@MODES
def test_a_table_padded_with_zero_rows_is_a_note(traces, param_map) -> None:
    for result in results("padded", traces, param_map):
        assert result, words.summary(result) + "\n" + "\n".join(words.line(p) for p in result.weight_findings)
        assert words.counts_line(result) == "6 parameters compared: 4 identical, 1 padded with zero rows, 1 tied"
        table = by_upstream(result, "embed.weight")
        assert (table.status, table.finding, table.port, table.port_shape) == ("padded", False, "tokens.weight",
                                                                               (PADDED, DIM))
        line = ("tokens.weight padded from 50 to 64 rows with zeros: holds upstream embed.weight's values "
                "(50×32 -> 64×32)")
        assert words.line(table) == line
        assert line in words.notes(result)
        assert by_upstream(result, "head.weight").status == "tied"


def test_the_analysis_shows_a_clean_preflight_with_the_notes(traces) -> None:
    text = analyse(*traces["padded"]).text()
    assert "pre-flight: clean; 6 parameters compared: 4 identical, 1 padded with zero rows, 1 tied" in text
    assert "note: tokens.weight padded from 50 to 64 rows with zeros" in text


# -- real errors stay findings -----------------------------------------------------------


@MODES
def test_a_shifted_row_in_a_padded_table_is_a_finding(traces, param_map) -> None:
    for result in results("shifted", traces, param_map):
        assert not result
        (finding,) = result.weight_findings
        assert (finding.upstream, finding.port_label, finding.status) == ("embed.weight", "tokens.weight[0:50]",
                                                                          "permuted")
        assert words.line(finding).startswith("tokens.weight[0:50] same values as upstream embed.weight, different "
                                         "order (permutation?)")
        assert "port padded from 50 to 64 rows, padding rows zero" in finding.detail


@MODES
def test_real_rows_one_row_late_are_a_finding(traces, param_map) -> None:
    for result in results("off_by_one", traces, param_map):
        assert not result
        (finding,) = result.weight_findings
        assert (finding.upstream, finding.port_label, finding.status) == ("embed.weight", "tokens.weight[0:50]",
                                                                          "different")
        assert "padding rows not zero either" in finding.detail


@MODES
def test_padding_rows_that_are_not_zero_are_a_finding(traces, param_map) -> None:
    for result in results("nonzero_padding", traces, param_map):
        assert not result
        (finding,) = result.weight_findings
        assert (finding.upstream, finding.port, finding.status) == ("embed.weight", "tokens.weight",
                                                                    "shape_mismatch")
        assert "port padded from 50 to 64 rows: the first 50 rows agree, but the 14 padding rows are not zero" \
            in words.line(finding)


@MODES
def test_an_untied_head_the_port_lacks_is_missing(traces, param_map) -> None:
    """Upstream's head has its own values: a port that reuses the embedding lacks it."""
    for result in results("untied", traces, param_map):
        assert not result
        (finding,) = result.weight_findings
        assert (finding.upstream, finding.port, finding.status) == ("head.weight", None, "missing_in_port")


@MODES
@pytest.mark.parametrize("case", ["missing", "missing_zero"])
def test_a_parameter_really_missing_is_still_missing(traces, param_map, case) -> None:
    """``missing_zero``: the missing bias is all zeros, like a matched norm bias; constant values never tie."""
    for result in results(case, traces, param_map):
        assert not result
        (finding,) = result.weight_findings
        assert (finding.upstream, finding.port, finding.status) == ("proj.bias", None, "missing_in_port")
        assert by_upstream(result, "head.weight").status == "tied"
