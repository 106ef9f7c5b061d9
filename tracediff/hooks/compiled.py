"""``torch.compile`` and tracing: what works, and refusing what would silently record wrong.

What TorchDynamo does with module hooks (PyTorch 2.x, ``inline_inbuilt_nn_modules``):

* hooks present when a module's code is compiled are compiled in: they run on
  every call, and the compiled code guards on them (removing them recompiles);
* hooks added *after* the code was compiled while the module had none are not
  seen: ``torch._dynamo.config.skip_nnmodule_hook_guards`` (on by default) skips
  the guard on empty hook dicts, so the compiled code runs without them — for
  every instance of that module class, as the compiled code is shared.

So tracediff:

* unwraps an ``OptimizedModule`` (``attach(torch.compile(model))``) and hooks the
  modules of its ``_orig_mod``, under the eager model's names (no ``_orig_mod.``);
* hands dynamo its hooks as opaque calls (:func:`make_opaque`): dynamo calls them
  between graphs instead of tracing the recorder's Python (locks, dicts, weak
  references), which broke graphs and hit the recompile limit;
* refuses (:class:`~tracediff.errors.TraceConfigError`) a model whose code was
  compiled and run before ``attach`` (its hooks would be skipped), and a model that
  holds compiled wrappers as submodules (its names would not match the eager model's).
"""

from __future__ import annotations

import sys
from typing import Any, cast

from torch import nn

from tracediff.errors import TraceConfigError

_FIX_ORDER = (
    "call tracediff.attach before the first compiled call (or torch.compiler.reset() first), "
    "or trace the eager model"
)


def _optimized_module_type() -> type | None:
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(dynamo, "OptimizedModule", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile(model)`` (``model`` itself when it is not a compiled wrapper)."""
    optimized = _optimized_module_type()
    while optimized is not None and isinstance(model, optimized):
        model = cast(nn.Module, model._orig_mod)
    return model


def check_compiled(model: nn.Module) -> None:
    """Refuse the compile setups whose traces would be wrong or silently incomplete.

    Raises:
        TraceConfigError: a submodule is a ``torch.compile`` wrapper, or code of the
            model's modules was already compiled (and run) by ``torch.compile``.
    """
    if "torch._dynamo" not in sys.modules:
        return  # nothing was ever compiled in this process
    optimized = _optimized_module_type()
    for name, module in model.named_modules():
        if optimized is not None and isinstance(module, optimized):
            raise TraceConfigError(
                f"submodule {name!r} is a torch.compile wrapper: its modules would be recorded as "
                f"'{name}._orig_mod.*', not as in the eager model; compile it in place "
                f"(model.get_submodule({name!r}).compile()) instead, or attach before wrapping it"
            )
    compiled = _compiled_code(model)
    if compiled is not None:
        raise TraceConfigError(
            f"{compiled} was already compiled by torch.compile and run, and compiled code skips hooks added "
            f"later, so the trace would miss records; {_FIX_ORDER}"
        )


def _compiled_code(model: nn.Module) -> str | None:
    """Which part of the model has compiled code that might have been compiled without hooks.

    Compiled code lives on code objects, which a class's instances share, so only
    what points at *this* model counts: the root's own ``forward`` (``torch.compile(model)``
    run, or another instance of its class), and modules compiled in place
    (``module.compile()`` marks the instance) once any in-place compiled code ran.
    A ``Linear`` inside some other compiled model says nothing about this one.
    """
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries
    except ImportError:  # pragma: no cover - a PyTorch without this introspection: nothing to check
        return None
    forward = getattr(type(model).forward, "__code__", None)
    if forward is not None and cache_entries(forward):
        return f"the model ({type(model).__name__})"
    call_impl = getattr(nn.Module._call_impl, "__code__", None)
    if call_impl is None or not cache_entries(call_impl):
        return None
    for name, module in model.named_modules():
        # ``module.compile()`` compiles ``Module._call_impl`` (shared by every module) for this module
        if getattr(module, "_compiled_call_impl", None) is not None:
            return f"module {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
    return None


def make_opaque(handles: list[Any]) -> None:
    """Make the hooks behind ``handles`` opaque to TorchDynamo (``torch.compiler.disable``).

    Dynamo then calls each hook as it stands, between graphs, instead of tracing
    into the recorder. In eager mode the wrapper only adds a Python call to each hook.
    """
    if "torch._dynamo" not in sys.modules:
        # Nothing can have been compiled yet, and importing TorchDynamo is slow: only a model
        # compiled after attach would trace into the hooks (graph breaks; records still those of eager mode).
        return
    import torch.compiler

    for handle in handles:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks:
            hooks[handle.id] = torch.compiler.disable(hooks[handle.id])

