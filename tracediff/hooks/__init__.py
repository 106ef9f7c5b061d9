"""Attach the recorder to a model: ``with attach(model, side="port") as trace: ...``.

With tracing switched off (``FASTVIDEO_TRACE_ACTIVATIONS`` unset or ``0``, or
``TraceConfig(enabled=False)``), :func:`attach` registers no hook at all and
returns an inert handle, so production code can call it unconditionally.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tracediff.config import ENV_OUTPUT, TraceConfig, check_output_writable, resolve_output
from tracediff.errors import TraceConfigError
from tracediff.hooks.fingerprint import build_module_table
from tracediff.hooks.recorder import Recorder
from tracediff.hooks.steps import current_step, trace_step
from tracediff.store.writer import TraceWriter

__all__ = ["TraceHandle", "attach", "current_step", "trace_step"]

_SIDE = re.compile(r"^[A-Za-z0-9_.-]+$")


class TraceHandle:
    """What :func:`attach` returns: close it (or leave the ``with`` block) to detach.

    Attributes:
        path: the trace file being written, or None when tracing is off.
        enabled: whether any hook was registered.
    """

    def __init__(self, recorder: Recorder | None, path: Path | None, side: str) -> None:
        self._recorder = recorder
        self.path = path
        self.side = side

    @property
    def recorder(self) -> Recorder | None:
        """The recorder behind the handle (None when tracing is off)."""
        return self._recorder

    @property
    def enabled(self) -> bool:
        return self._recorder is not None

    @property
    def hook_count(self) -> int:
        return self._recorder.hook_count if self._recorder is not None else 0

    @property
    def records_written(self) -> int:
        return self._recorder.records_written if self._recorder is not None else 0

    @property
    def failures(self) -> dict[str, str]:
        """Modules whose recording failed (name -> error), reported once each."""
        return dict(self._recorder.failures) if self._recorder is not None else {}

    def close(self) -> None:
        """Remove all hooks and close the trace file; calling it again does nothing."""
        if self._recorder is not None:
            self._recorder.close()

    remove = close

    def __enter__(self) -> TraceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"path={str(self.path)!r}, hooks={self.hook_count}" if self.enabled else "disabled"
        return f"TraceHandle(side={self.side!r}, {state})"


def attach(
    model: nn.Module,
    *,
    side: str = "port",
    config: TraceConfig | None = None,
    output: str | Path | None = None,
) -> TraceHandle:
    """Start recording ``model``'s module outputs into an HDF5 trace.

    Args:
        model: the model; its ``named_modules()`` names are what layer regexes match.
        side: which side this is (``"port"``, ``"ref"``/``"upstream"`` or any short name).
        config: tracing settings; default :meth:`TraceConfig.from_env`.
        output: trace path (overrides the config's ``output`` template).

    Returns:
        A :class:`TraceHandle`; with tracing off it holds no hook and no file.

    Raises:
        TraceConfigError: a setting cannot be honoured (bad regex, stat, steps,
            unwritable output, a layer regex that matches no module).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach(model=...) needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(side, str) or not _SIDE.match(side):
        raise TraceConfigError(f"side={side!r} is not a valid side name; use 'ref', 'port' or letters/digits/._-")
    config = TraceConfig.from_env() if config is None else config
    if not config.enabled:
        return TraceHandle(None, None, side)
    rank, world = _rank_and_world()
    path = resolve_output(str(output) if output is not None else config.output, side=side, rank=rank)
    check_output_writable(path, source="output" if output is not None else ENV_OUTPUT)
    table = build_module_table(model)
    selected = [name for name in table.names[1:] if config.layer_predicate(name)]
    if not selected and config.layers not in (None, ""):
        examples = ", ".join(repr(n) for n in table.names[1:6]) or "(the model has no submodules)"
        raise TraceConfigError(
            f"{config.layers_source}={config.layers_description!r} matches none of the model's {len(table.names) - 1} "
            f"submodules; names look like {examples}"
        )
    writer = TraceWriter(path, attrs=_metadata(model, side, config, rank, world), module_table=table)
    recorder = Recorder(model, config=config, writer=writer, module_names=table.names)
    return TraceHandle(recorder, path, side)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _metadata(model: nn.Module, side: str, config: TraceConfig, rank: int, world: int) -> dict[str, Any]:
    from tracediff import __version__

    params = list(model.parameters())
    devices = sorted({str(p.device) for p in params}) or ["cpu"]
    dtypes = Counter(str(p.dtype).replace("torch.", "") for p in params)
    return {
        "side": side,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tracediff_version": __version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "device": ",".join(devices),
        "param_dtypes": dict(dtypes),
        "rank": rank,
        "world_size": world,
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "has_moments": config.needs_moments,
        "config": {
            "layers": config.layers_description,
            "stats": list(config.stats),
            "steps": sorted(config.steps) if config.steps is not None else None,
            "sample_size": config.sample_size,
            "output": config.output,
        },
    }
