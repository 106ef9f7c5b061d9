"""Reusing a capture for the same tensor seen again, only where its values provably did not change.

With module inputs traced, most inputs are the previous module's output, and
reducing them again doubles the work. The same tensor object at the same version
counter is *not* proof of the same values: ``torch.distributed.all_reduce``
(tensor-parallel ports), writes through ``.data`` and through ``.numpy()`` change
values without bumping the version counter, and nothing short of reading the
whole tensor again (what a reduction costs) can tell. So a capture is reused only
within one hook event (a tensor passed twice) or from the hook event just before,
when only PyTorch's own code ran in between: ``nn.Sequential`` handing a child's
output to the next child (or its input to its first child, its last child's output
back), with no hook but ours on either side (:func:`sequential_pairs`,
:func:`_only_our_hooks`). Anywhere the model's own forward runs in between, the
tensor is reduced again: correct first, and cheap where reuse is provably safe.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

#: ``(kind, module, kind, module)`` of two hook events between which only PyTorch's own code runs, never
#: the model's (kinds ``pre``: inputs, ``post``: output).
EventPair = tuple[str, int, str, int]
#: What a hook computes of a tensor: moments, sample and full copy (None where not wanted).
Reductions = tuple[Any, Any, Any]


class ReuseCache:
    """The captures of the running step, by tensor, with the hook events that may reuse them.

    Args:
        safe_pairs: the model's hook events between which no model code runs (:func:`sequential_pairs`).
    """

    def __init__(self, safe_pairs: set[EventPair] | None = None) -> None:
        self.safe_pairs: set[EventPair] = set() if safe_pairs is None else safe_pairs
        #: id(tensor) -> (weak reference, version counter, reductions, hook event) of this step's captures
        self._reductions: dict[int, tuple[weakref.ref[torch.Tensor], int, Reductions, int]] = {}
        self._event_id = 0
        self._last_event: tuple[str, int, nn.Module | None, int] | None = None  # kind, module, object, thread
        self._reuse_from = 0  # captures made at or after this hook event may be reused

    @property
    def events(self) -> int:
        """How many hook events have fired so far."""
        return self._event_id

    def enter_event(self, kind: str, index: int, module: nn.Module | None) -> None:
        """A hook of ours fires: decide whether captures of the previous hook event may be reused.

        Reuse is safe only where no code but PyTorch's own can have run since that event.
        """
        self._event_id += 1
        previous, thread = self._last_event, threading.get_ident()
        safe = (
            previous is not None
            and previous[3] == thread
            and (previous[0], previous[1], kind, index) in self.safe_pairs
            and _only_our_hooks(previous[2], previous[0])
            and _only_our_hooks(module, kind)
        )
        self._reuse_from = self._event_id - 1 if safe else self._event_id
        self._last_event = (kind, index, module, thread)

    def reduced(self, tensor: torch.Tensor, reduce: Callable[[torch.Tensor], Reductions]) -> Reductions:
        """``reduce(tensor)``, or its earlier result when ``tensor`` was provably captured unchanged.

        The weak reference proves it is that object still (an id alone could be a new
        tensor at a freed address); inference-mode tensors have no version counter and
        are always reduced.
        """
        cached = self._reductions.get(id(tensor))
        version = _version_of(tensor)
        if (
            cached is not None
            and version is not None
            and cached[0]() is tensor
            and cached[1] == version
            and cached[3] >= self._reuse_from
        ):
            self._reductions[id(tensor)] = (cached[0], version, cached[2], self._event_id)
            return cached[2]
        reductions = reduce(tensor)
        if version is not None:
            self._reductions[id(tensor)] = (weakref.ref(tensor), version, reductions, self._event_id)
        return reductions

    def clear(self) -> None:
        """Forget the step's captures (its records went to the writer)."""
        self._reductions.clear()

    def detach(self) -> None:
        """Forget the last hook event: the hooks are gone, and with them the model it refers to."""
        self._last_event = None


def sequential_pairs(model: nn.Module, names: list[str], traced: set[int]) -> set[EventPair]:
    """Hook events of ``model`` between which only ``nn.Sequential.forward`` runs.

    ``(kind, module, kind, module)`` with kinds ``pre`` (inputs) and ``post`` (output):
    a plain ``nn.Sequential``'s inputs and its first child's, one child's output and the
    next child's inputs, its last child's output and its own. Only modules that occur
    once in the model: a shared module's events could come from another caller.
    """
    occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    index_of = {id(model.get_submodule(name)): i for i, name in enumerate(names) if i in traced}
    pairs: set[EventPair] = set()
    for index, name in enumerate(names):
        container = model.get_submodule(name)
        if index not in traced or type(container).forward is not nn.Sequential.forward:
            continue
        members = cast(nn.Sequential, container)  # it runs ``nn.Sequential.forward``: a Sequential
        children = [index_of.get(id(c)) if c is not None and occurrences[id(c)] == 1 else None for c in members]
        if occurrences[id(container)] != 1 or not children:
            continue
        if children[0] is not None:
            pairs.add(("pre", index, "pre", children[0]))
        if children[-1] is not None:
            pairs.add(("post", children[-1], "post", index))
        for first, second in zip(children, children[1:], strict=False):
            if first is not None and second is not None:
                pairs.add(("post", first, "pre", second))
    return pairs


def _only_our_hooks(module: nn.Module | None, kind: str) -> bool:
    """Whether no hook but tracediff's can run on ``module``'s side of a transition (so no foreign code)."""
    if module is None:
        return False
    hooks = module._forward_pre_hooks if kind == "pre" else module._forward_hooks
    if len(hooks) != 1:
        return False
    from torch.nn.modules import module as torch_module

    for registry in (torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks):
        if registry and any(not str(getattr(h, "__module__", "")).startswith("tracediff.") for h in registry.values()):
            return False
    return True


def _version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; ``None`` for inference tensors, which have none."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None
