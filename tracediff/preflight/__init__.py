"""Pre-flight checks: rule out wrong weights and different inputs before blaming a layer.

Half of all red parity tests are not a layer bug: a parameter was converted
wrong (transposed, missed, scaled, a buffer such as rotary frequencies computed
differently) or the two sides did not receive the same inputs. This package
names those first.

Public API:
    check_models: weights of two live models, exactly (no forward pass).
    check_traces: weights (from the module tables' fingerprints, or from live models
        when given) and inputs (the root module's ``input.*`` records) of two traces.
    PreflightResult: truthy when clean; carries every verdict, the counts and the finding behind a drift.

Views (terminal and JSON) are in :mod:`tracediff.render.preflight`.

See ``docs/preflight.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracediff.align.aligner import align, align_sides
from tracediff.align.alignment import Alignment
from tracediff.align.parammap import load_param_map, validate_param_map
from tracediff.align.side import side_from_model
from tracediff.errors import AlignmentError
from tracediff.modtree import join_name
from tracediff.preflight.inputs import check_inputs
from tracediff.preflight.params import ParamSide, pair_params
from tracediff.preflight.result import PARAM_STATUSES, InputCheck, ParamCheck, PreflightResult
from tracediff.store.jsonl import FORMAT_NAME
from tracediff.store.trace import ModuleTable, Trace

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "PARAM_STATUSES",
    "InputCheck",
    "ParamCheck",
    "PreflightResult",
    "check_models",
    "check_traces",
    "has_module_table",
]

MappingArg = Any  # MappingSpec | Mapping[str, Any] | str | Path | None
ParamMapArg = Mapping[str, Any] | str | Path | None


def check_models(
    upstream: nn.Module,
    port: nn.Module,
    *,
    mapping: MappingArg = None,
    param_map: ParamMapArg = None,
    alignment: Alignment | None = None,
    rtol: float | None = None,
) -> PreflightResult:
    """Compare every parameter and buffer of two live models, element by element.

    A quick check before any forward pass: modules are aligned without running
    the models (:func:`tracediff.align.aligner.align_models`), parameters are paired
    through the parameter map when given, else by local name and value inside
    aligned modules, and each pair is compared exactly.

    Args:
        upstream: the reference model.
        port: the model under test.
        mapping: an explicit module mapping (file path, dict or ``MappingSpec``).
        param_map: the port's ``param_names_mapping`` (dict, file, or ``module:ATTR``).
        alignment: a ready alignment (skips aligning).
        rtol: tolerance of "equal within tolerance" (default: from the two dtypes).

    Returns:
        A :class:`PreflightResult` (``source="models"``, inputs not checked).

    Raises:
        AlignmentError: the mapping or parameter map is invalid.
    """
    table_map = _param_map(param_map)
    notes: list[str] = []
    # One fingerprint pass per model serves both the aligner and the pairing.
    up_view, port_view = side_from_model(upstream, "upstream"), side_from_model(port, "port")
    if alignment is None:
        alignment = _aligned(lambda pm: align_sides(up_view, port_view, mapping=mapping, param_map=pm),
                             param_map, notes)
    params, pairing_notes = pair_params(_live_side(upstream, "upstream", up_view.table),
                                        _live_side(port, "port", port_view.table), alignment, table_map, rtol=rtol)
    return PreflightResult(params=params, source="models", inputs_checked=False, notes=notes + pairing_notes,
                           unaligned_port=_unaligned(alignment, params))


def check_traces(
    upstream: Trace,
    port: Trace,
    *,
    mapping: MappingArg = None,
    param_map: ParamMapArg = None,
    alignment: Alignment | None = None,
    models: tuple[nn.Module, nn.Module] | None = None,
    rtol: float | None = None,
) -> PreflightResult:
    """Check the weights and the inputs of two traces.

    Weights come from the module tables' fingerprints (moments and 32 sampled
    values per tensor), or from ``models`` when the traced models are still in
    memory (exact). Inputs come from the root module's ``input.*`` records.

    Args:
        upstream, port: the two traces.
        mapping, param_map: as for :func:`check_models`.
        alignment: a ready alignment of the two traces (skips aligning).
        models: ``(upstream, port)`` live models the traces were recorded from.
        rtol: tolerance of "equal within tolerance" (default: from the dtypes).

    Raises:
        AlignmentError: the mapping or parameter map is invalid.
    """
    table_map = _param_map(param_map)
    notes: list[str] = []
    merged = [t.side or "a side" for t in (upstream, port) if getattr(t, "ranks", None) is not None]
    weights_checked = has_module_table(upstream) and has_module_table(port) and not (merged and models is None)
    params: list[ParamCheck] = []
    if merged and models is None:
        notes.append(f"weights not checked: {' and '.join(merged)} merged from per-rank traces, whose module "
                     "tables hold one rank's shards")
    elif weights_checked:
        if alignment is None:
            alignment = _aligned(lambda pm: align(upstream, port, mapping=mapping, param_map=pm), param_map, notes)
        if models is not None:
            up_side = _live_side(models[0], "upstream", upstream.modules)
            port_side = _live_side(models[1], "port", port.modules)
        else:
            up_side, port_side = ParamSide("upstream", upstream.modules), ParamSide("port", port.modules)
        params, pairing_notes = pair_params(up_side, port_side, alignment, table_map, rtol=rtol)
        notes += pairing_notes
    else:
        notes.append("weights not checked: a trace holds no module table (FastVideo JSONL imports have none)")
    inputs, inputs_checked, input_notes = check_inputs(upstream, port)
    return PreflightResult(params=params, inputs=inputs, source="models" if models is not None else "traces",
                           weights_checked=weights_checked, inputs_checked=inputs_checked,
                           notes=notes, input_notes=input_notes, unaligned_port=_unaligned(alignment, params))


def has_module_table(trace: Trace) -> bool:
    """Whether a trace carries the recorder's module table (a FastVideo JSONL import only names modules)."""
    return bool(trace.modules.names) and trace.meta.get("format") != FORMAT_NAME


def _unaligned(alignment: Alignment | None, params: list[ParamCheck]) -> frozenset[str]:
    """Port modules holding checked parameters that the alignment did not pair."""
    if alignment is None:
        return frozenset()
    paired = {pair.port for pair in alignment.pairs}
    return frozenset(p.port_module for p in params if p.port_module is not None and p.port_module not in paired)


def _param_map(param_map: ParamMapArg) -> dict[str, Any] | None:
    if param_map is None:
        return None
    if isinstance(param_map, Mapping):
        return validate_param_map(param_map, origin="param map")
    return load_param_map(param_map)


def _aligned(run: Any, param_map: ParamMapArg, notes: list[str]) -> Alignment:
    """Align; if the aligner refuses the parameter map, align without it and say why.

    The aligner rejects a map that names a port parameter the port lacks, which is
    exactly the converted-wrong case the pre-flight exists to name.
    """
    try:
        return run(param_map)
    except AlignmentError as exc:
        if param_map is None:
            raise
        notes.append(f"modules aligned without the parameter map, which the aligner refused: {exc}")
        return run(None)


def _live_side(model: nn.Module, label: str, table: ModuleTable | None = None) -> ParamSide:
    """A side with its module table and, row for row, the tensors themselves and their persistence.

    A tensor is persistent when its full name is a key of ``model.state_dict()``
    (a buffer registered with ``persistent=False`` is not).

    Args:
        table: the model's module table if already built (by the aligner or the
            recorder); rebuilt when its parameters do not line up with the model's.
    """
    from tracediff.hooks.fingerprint import build_module_table  # keeps torch off the trace-only path

    saved = set(model.state_dict(keep_vars=True))
    tensors, owned, persistent = [], [], []
    for index, (prefix, module) in enumerate(model.named_modules(remove_duplicate=True)):
        for kind, items in (("parameter", module.named_parameters(recurse=False)),
                            ("buffer", module.named_buffers(recurse=False))):
            for name, tensor in items:
                if tensor is not None:
                    tensors.append(tensor.detach())
                    owned.append((index, name, kind, tuple(tensor.shape)))
                    persistent.append(join_name(prefix, name) in saved)
    known = [(p.module_index, p.name, p.kind, tuple(p.shape)) for p in table.params] if table is not None else None
    if table is None or known != owned:
        table = build_module_table(model)
    return ParamSide(label, table, tensors=tensors, persistent=persistent)
