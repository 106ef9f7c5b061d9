"""Where the recorder's hooks go: which modules cannot take one, and which module's return ends a call.

Decided once, when :class:`~tracediff.hooks.recorder.Recorder` attaches, from
the model's structure alone.
"""

from __future__ import annotations

import torch
from torch import nn

#: Index of the attached model itself in ``named_modules()`` order.
ROOT_INDEX = 0


def scripted_modules(model: nn.Module, names: list[str]) -> dict[int, str]:
    """Modules that run as TorchScript (``torch.jit.script``/``trace``), which never call Python hooks.

    Their submodules are TorchScript too; each is named with the outermost scripted module it sits in.
    """
    script_type = torch.jit.ScriptModule
    found: dict[int, str] = {}
    outer: list[str] = []
    for index, name in enumerate(names):
        if index == ROOT_INDEX or not isinstance(model.get_submodule(name), script_type):
            continue
        top = next((o for o in outer if name.startswith(o + ".")), None)
        if top is None:
            outer.append(name)
            found[index] = "a torch.jit ScriptModule: TorchScript runs no Python hooks"
        else:
            found[index] = f"inside the torch.jit ScriptModule {top}"
    return found


def refusal(exc: Exception) -> str:
    """Why registering a hook failed, in one short line."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"refused a forward hook ({type(exc).__name__}{': ' + text if text else ''})"


def call_owners(model: nn.Module, names: list[str], selected: list[int]) -> dict[int, int]:
    """For each traced module, the module whose return ends a call that the traced one opened.

    That is its outermost ancestor-or-self below the root that has a forward of its own (a
    ``ModuleList`` has none: ``blocks`` is never called, ``blocks.0`` is): for a wrapper
    attached whose code calls ``wrapper.model(x)``, ``model``.
    """
    index_of = {id(model.get_submodule(name)): i for i, name in enumerate(names)}
    owners: dict[int, int] = {}
    for index in selected:
        parts = names[index].split(".")
        owners[index] = index
        for end in range(1, len(parts) + 1):
            module = model.get_submodule(".".join(parts[:end]))
            if type(module).forward is not nn.Module.forward and id(module) in index_of:
                owners[index] = index_of[id(module)]
                break
    return owners
