"""Per-parameter fingerprints for the module table.

They let two trace files be aligned and checked without the models: equal
fingerprints mean "same values after conversion", a fingerprint that matches
the other side's transpose means "converted transposed". Everything is computed
on the parameter's device and copied to the host once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tracediff.hooks.stats import moments, sample_positions, value_view
from tracediff.moments import MOMENT_COUNT
from tracediff.store.trace import FINGERPRINT_SAMPLE, ModuleTable, ParamEntry


def build_module_table(model: nn.Module) -> ModuleTable:
    """Walk ``model`` once and fingerprint the tensors each module owns itself."""
    names: list[str] = []
    classes: list[str] = []
    params: list[ParamEntry] = []
    device_rows: list[torch.Tensor] = []
    for index, (name, module) in enumerate(model.named_modules(remove_duplicate=True)):
        names.append(name)
        classes.append(f"{type(module).__module__}.{type(module).__qualname__}")
        owned = [("parameter", n, t) for n, t in module.named_parameters(recurse=False)]
        owned += [("buffer", n, t) for n, t in module.named_buffers(recurse=False) if t is not None]
        for kind, local_name, tensor in owned:
            dtype = str(tensor.dtype).replace("torch.", "")
            params.append(ParamEntry(index, local_name, kind, tuple(tensor.shape), dtype))
            device_rows.append(_fingerprint_row(tensor.detach()))
    width = MOMENT_COUNT + 2 * FINGERPRINT_SAMPLE
    if device_rows:
        host = torch.cat([row.to("cpu") for row in device_rows]).reshape(-1, width).numpy()
    else:
        host = np.zeros((0, width))
    return ModuleTable(
        names=names,
        classes=classes,
        params=params,
        param_moments=host[:, :MOMENT_COUNT].copy(),
        param_samples=host[:, MOMENT_COUNT : MOMENT_COUNT + FINGERPRINT_SAMPLE].copy(),
        param_samples_t=host[:, MOMENT_COUNT + FINGERPRINT_SAMPLE :].copy(),
    )


def _fingerprint_row(tensor: torch.Tensor) -> torch.Tensor:
    values, _ = value_view(tensor)
    with torch.no_grad():
        stats = moments(values)
        plain = _padded_sample(values.reshape(-1) if values.is_contiguous() else values.flatten())
        if values.dim() == 2:
            transposed = _padded_sample(values.t().contiguous().reshape(-1))
        else:
            transposed = torch.full((FINGERPRINT_SAMPLE,), float("nan"), dtype=torch.float64, device=values.device)
    return torch.cat([stats, plain, transposed])


def _padded_sample(flat: torch.Tensor) -> torch.Tensor:
    positions = sample_positions(flat.numel(), FINGERPRINT_SAMPLE).to(flat.device)
    out = torch.full((FINGERPRINT_SAMPLE,), float("nan"), dtype=torch.float64, device=flat.device)
    out[: positions.numel()] = flat[positions].to(torch.float64)
    return out
