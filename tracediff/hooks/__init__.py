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
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tracediff.config import ENV_OUTPUT, TraceConfig, check_output_writable, resolve_output
from tracediff.errors import TraceConfigError
from tracediff.hooks import compiled, lifecycle
from tracediff.hooks.fingerprint import build_module_table
from tracediff.hooks.recorder import Recorder
from tracediff.hooks.steps import current_step, trace_step
from tracediff.store.lock import TraceLock
from tracediff.store.output import open_for_writing
from tracediff.store.writer import TraceWriter
from tracediff.version import __version__

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["TraceHandle", "attach", "current_step", "trace_step"]

_SIDE = re.compile(r"^[A-Za-z0-9_.-]+$")


class TraceHandle:
    """What :func:`attach` returns: close it (or leave the ``with`` block) to detach.

    Attributes:
        path: the trace file being written, or None when tracing is off.
        enabled: whether any hook was registered.
    """

    def __init__(
        self, recorder: Recorder | None, path: Path | None, side: str, *, lock: TraceLock | None = None
    ) -> None:
        self._recorder = recorder
        self._lock = lock
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
    def records_captured(self) -> int:
        """Records captured so far, including the running step's (not yet written); read-only, for progress."""
        return self._recorder.records_captured if self._recorder is not None else 0

    @property
    def untraced(self) -> dict[str, str]:
        """Selected modules that could not be hooked (TorchScript, a module refusing hooks): name -> why."""
        return dict(getattr(self._recorder, "untraced", {})) if self._recorder is not None else {}

    @property
    def failures(self) -> dict[str, str]:
        """Modules whose recording failed (name -> error), reported once each."""
        return dict(self._recorder.failures) if self._recorder is not None else {}

    def close(self) -> None:
        """Remove all hooks and close the trace file; calling it again does nothing."""
        try:
            if self._recorder is not None:
                self._recorder.close()
        finally:
            if self._lock is not None:
                self._lock.release()
            lifecycle.unregister(self)

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
    process_groups: Mapping[str, Any] | Any | None = None,
    overwrite: bool | None = None,
) -> TraceHandle:
    """Start recording ``model``'s module outputs into an HDF5 trace.

    Args:
        model: the model; its ``named_modules()`` names are what layer regexes match. A
            ``torch.compile(model)`` wrapper is traced as the model it wraps (same names);
            see docs/trace-format.md, "torch.compile".
        side: which side this is (``"port"``, ``"ref"``/``"upstream"`` or any short name).
        config: tracing settings; default :meth:`TraceConfig.from_env`.
        output: trace path (overrides the config's ``output`` template). Under
            ``torch.distributed`` with more than one rank, a template without
            ``<rank>`` gets ``-rank<rank>`` before its suffix, so ranks never share a file.
        process_groups: the parallel layout to record in the metadata, for
            ``tracediff merge``: ``{"tp": group, "sp": [0, 1]}`` (process groups or rank
            lists this rank belongs to), or a ``DeviceMesh``. See docs/distributed.md.
        overwrite: replace an existing non-empty file at the output path; default the
            config's ``overwrite`` (``TRACEDIFF_OVERWRITE``), off: attach refuses.

    Returns:
        A :class:`TraceHandle`; with tracing off, or on a rank that the config's
        ``ranks`` (``TRACEDIFF_TRACE_RANKS``) leaves out, it holds no hook and no file.

    Raises:
        TraceConfigError: a setting cannot be honoured (bad regex, stat, steps,
            unwritable output, a layer regex that matches no module), the output
            file exists and overwriting is off, another process is writing it, or
            it cannot be created (no space left); or the model's code was compiled by
            ``torch.compile`` and run before ``attach`` (its compiled code would skip the
            hooks), or it holds ``torch.compile`` wrappers as submodules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach(model=...) needs a torch.nn.Module, got {type(model).__name__}")
    model = compiled.unwrap(model)  # torch.compile(model): hook the eager modules, under their own names
    if not isinstance(side, str) or not _SIDE.match(side):
        raise TraceConfigError(f"side={side!r} is not a valid side name; use 'ref', 'port' or letters/digits/._-")
    config = TraceConfig.from_env() if config is None else config
    if not config.enabled:
        return TraceHandle(None, None, side)
    rank, world = _rank_and_world()
    if config.ranks is not None:
        outside = sorted(r for r in config.ranks if r >= world)
        if outside:
            raise TraceConfigError(
                f"{config.ranks_source}={','.join(map(str, sorted(config.ranks)))!r} names rank {outside[0]}, "
                f"but the world size is {world} (ranks 0-{world - 1})"
            )
        if rank not in config.ranks:
            return TraceHandle(None, None, side)
    layout = _process_groups(process_groups, rank, world)
    template = str(output) if output is not None else config.output
    path = resolve_output(with_rank_placeholder(template, world), side=side, rank=rank)
    source = "output" if output is not None else ENV_OUTPUT
    check_output_writable(path, source=source)
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceConfigError(
            f"attach(model=...): {type(model).__name__} is a torch.jit ScriptModule, which runs no Python hooks; "
            "attach the eager nn.Module (before torch.jit.script/trace)"
        )
    compiled.check_compiled(model)
    table = build_module_table(model)
    selected = [name for name in table.names[1:] if config.layer_predicate(name)]
    if not selected and config.layers not in (None, ""):
        examples = ", ".join(repr(n) for n in table.names[1:6]) or "(the model has no submodules)"
        raise TraceConfigError(
            f"{config.layers_source}={config.layers_description!r} matches none of the model's {len(table.names) - 1} "
            f"submodules; names look like {examples}"
        )
    attrs = _metadata(model, side, config, rank, world)
    attrs.update(layout)
    writer, lock = open_for_writing(
        path,
        lambda target: TraceWriter(target, attrs=attrs, module_table=table),
        overwrite=config.overwrite if overwrite is None else overwrite,
        header_bytes=1024 * (len(table.names) + len(table.params)),
        source=source,
    )
    try:
        recorder = Recorder(model, config=config, writer=writer, module_names=table.names)
        compiled.make_opaque(recorder.handles)
    except BaseException:
        writer.close()
        lock.release()
        raise
    if recorder.untraced:
        writer.set_attr("untraced", recorder.untraced)
        warnings.warn(_untraced_message(model, recorder.untraced), RuntimeWarning, stacklevel=2)
    handle = TraceHandle(recorder, path, side, lock=lock)
    lifecycle.register(handle)  # closed at interpreter exit or on SIGTERM if the program does not
    return handle


def _untraced_message(model: nn.Module, untraced: Mapping[str, str]) -> str:
    """One warning for every module that could not be hooked, naming the outermost ones and why."""
    outer = {name: why for name, why in untraced.items() if not why.startswith("inside ")}
    inner = len(untraced) - len(outer)
    shown = "; ".join(f"{name} ({why})" for name, why in list(outer.items())[:5])
    more = f"; and {len(outer) - 5} more" if len(outer) > 5 else ""
    within = f" (and the {inner} submodule(s) inside them)" if inner else ""
    scripted = any("torch.jit" in why for why in outer.values())
    hint = "; to trace them, build them without torch.jit.script" if scripted else ""
    return (
        f"tracediff: {len(outer)} module(s) of {type(model).__name__}{within} cannot be hooked and are not traced: "
        f"{shown}{more}. Their records are missing (the trace's 'untraced' attribute lists them){hint}"
    )


def with_rank_placeholder(template: str, world: int) -> str:
    """Give a template ``-rank<rank>`` (before its suffix) when several ranks would otherwise share it."""
    if world <= 1 or "<rank>" in template:
        return template
    path = Path(template)
    suffix = path.suffix if path.suffix in (".h5", ".hdf5", ".jsonl") else ""
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return str(path.with_name(f"{stem}-rank<rank>{suffix}"))


def _process_groups(groups: Mapping[str, Any] | Any | None, rank: int, world: int) -> dict[str, Any]:
    """Metadata of the parallel layout: backend, local rank, host, and the named groups' ranks."""
    out: dict[str, Any] = {"hostname": platform.node()}
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if initialised:
        out["backend"] = str(dist.get_backend())
    for key, env in (("local_rank", "LOCAL_RANK"), ("local_world_size", "LOCAL_WORLD_SIZE")):
        if os.environ.get(env, "").isdigit():
            out[key] = int(os.environ[env])
    named: dict[str, list[int]] = {"world": list(range(world))}
    if groups is not None:
        named.update(_named_groups(groups, initialised))
    for name, ranks in named.items():
        if rank not in ranks and world > 1:
            raise TraceConfigError(
                f"process_groups[{name!r}] = {ranks} does not contain this process's rank {rank}; "
                "give the groups this rank belongs to"
            )
    out["process_groups"] = named
    return out


def _named_groups(groups: Mapping[str, Any] | Any, initialised: bool) -> dict[str, list[int]]:
    mesh_type = _device_mesh_type()
    if mesh_type is not None and isinstance(groups, mesh_type):
        names = groups.mesh_dim_names or tuple(f"dim{i}" for i in range(groups.ndim))
        return {name: _group_ranks(groups.get_group(i), initialised, name) for i, name in enumerate(names)}
    if not isinstance(groups, Mapping):
        raise TraceConfigError(
            f"process_groups={groups!r} is neither a mapping of names to process groups or rank lists "
            "nor a DeviceMesh; use e.g. {'tp': tp_group}"
        )
    return {str(name): _group_ranks(group, initialised, str(name)) for name, group in groups.items()}


def _group_ranks(group: Any, initialised: bool, name: str) -> list[int]:
    if isinstance(group, Sequence) and not isinstance(group, str):
        if all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in group):
            return sorted(int(r) for r in group)
    elif initialised and isinstance(group, torch.distributed.ProcessGroup):
        return sorted(torch.distributed.get_process_group_ranks(group))
    raise TraceConfigError(
        f"process_groups[{name!r}]={group!r} is neither a list of ranks nor a process group of an "
        "initialised torch.distributed"
    )


def _device_mesh_type() -> type[DeviceMesh] | None:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:
        return None
    return DeviceMesh


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _metadata(model: nn.Module, side: str, config: TraceConfig, rank: int, world: int) -> dict[str, Any]:
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
            "ranks": sorted(config.ranks) if config.ranks is not None else None,
            "inputs": config.inputs,
        },
    }
