"""Operator level: inside a module that drifts while its aligned children do not.

The module is run alone on both sides, on the inputs it received during
isolation (the reference's, or the port's own when they were reference-fed) and
under the ``torch.autocast`` it was called under there, under a
:class:`torch.overrides.TorchFunctionMode` that records every torch call made by
the module's own Python code (``x * y``, ``torch.cat``, ``F.scaled_dot_product_attention``,
``Tensor.flatten``): its name, output values, the operators that produced its
inputs, and the first stack frame outside torch and tracediff (file, line,
function, source text). Calls of aligned child modules, and of torch.nn layers, are
recorded as one operator each (the aligned ones were already found clean); what
runs inside them is not. Children with no counterpart that are the user's own
code (``ViTEmbeddings``, torchvision's ``Encoder``) are looked through instead:
their operators count as the module's own, each tagged with the child it ran in,
so a bug in a module with no upstream counterpart is named by that module.

Two independently written forwards rarely run the same operators (fused
projections, complex-number RoPE against real cos/sin, different layouts), so
the two sequences are aligned by *value*, walking the port's operators in order:

* a port output **matches** when some upstream output has the same elements up to
  a permutation of dimensions (size-1 dimensions dropped, complex as real pairs),
  within the tolerance;
* it **differs** when it matches none, yet an upstream output of the same operator
  family (``flatten``/``view``/``reshape`` are one family, ``add``/``__radd__``
  another) and compatible shape comes after the last match and is not taken: that
  is its counterpart, and the first such operator is the finding;
* otherwise it has **no counterpart** (a port-specific intermediate).

The finding names both operators with their source lines, and lists the port
operators with no counterpart that feed it (found by following the recorded data
flow back to matched values): the bug is in one of those, or in the operator
itself.
"""

from __future__ import annotations

import contextlib
import itertools
import linecache
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from tracediff.bisect.isolate import Autocast, autocast_as, device_types
from tracediff.bisect.metrics import Metrics, compare
from tracediff.bisect.result import OpFinding, OpRef, Source
from tracediff.bisect.tree import is_container, tensor_leaves
from tracediff.hooks.flatten import iter_inputs
from tracediff.modtree import is_within
from tracediff.tolerance import Tolerance

#: Elements of operator outputs kept per side; outputs beyond it are recorded without values.
MAX_ELEMENTS = 50_000_000
#: Permutations of dimensions tried per comparison.
MAX_PERMUTATIONS = 24
#: Port operators listed as suspects.
MAX_SUSPECTS = 16

#: Frames in these folders are never "the user's line": torch itself and bisection's own hooks.
_SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)

_FAMILIES: dict[str, tuple[str, ...]] = {
    "add": ("add", "add_", "__add__", "__radd__", "__iadd__"),
    "sub": ("sub", "sub_", "subtract", "rsub", "__sub__", "__rsub__", "__isub__"),
    "mul": ("mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"),
    "div": ("div", "div_", "divide", "true_divide", "__truediv__", "__rtruediv__", "__itruediv__"),
    "matmul": ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "einsum"),
    "reshape": ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"),
    "permute": ("transpose", "permute", "swapaxes", "swapdims", "movedim", "t", "mT"),
    "cast": ("to", "type_as", "float", "double", "half", "bfloat16", "type", "contiguous", "clone"),
    "cat": ("cat", "concat", "concatenate"),
    "split": ("chunk", "split", "unbind", "tensor_split", "__getitem__", "narrow", "select"),
    "pow": ("pow", "pow_", "__pow__", "square"),
}
_FAMILY_OF = {name: family for family, names in _FAMILIES.items() for name in names}
_INPLACE_EXTRA = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"})


@dataclass
class _Node:
    """One tensor produced (or received) by the traced forward."""

    index: int
    name: str
    family: str
    kind: str  # "input", "op", "module"
    shape: tuple[int, ...]
    dtype: str
    value: torch.Tensor | None
    source: Source | None
    inputs: tuple[int, ...]
    owner: str = ""  # the looked-through child it ran in (relative name), "" for the module itself
    child: str = ""  # for a child module's output: that child (relative name)

    def ref(self) -> OpRef:
        return OpRef(self.index, self.name, self.shape, self.dtype, self.source, self.owner)


class _Recorder(TorchFunctionMode):
    """Records torch calls made directly by one module's forward (children are one node each)."""

    def __init__(self, module_keys: Mapping[str, str], max_elements: int = MAX_ELEMENTS,
                 look_through: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.nodes: list[_Node] = []
        self.module_keys = dict(module_keys)
        self.look_through = look_through
        self._owners: list[str] = []
        self._opened: list[bool] = []  # per child call in progress: was it looked through?
        self.max_elements = max_elements
        self._elements = 0
        self._producer: dict[int, int] = {}
        self._keep: list[torch.Tensor] = []  # keeps recorded tensors alive so their ids stay unique
        self._depth = 0
        self._busy = False
        self._child_inputs: list[tuple[int, ...]] = []

    # -- recording -----------------------------------------------------------------------------

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._busy or self._depth > 0:
            return out
        name = _op_name(func)
        short = name.rsplit(".", 1)[-1]
        inputs = self._producers((args, kwargs))
        outputs = [t for t in tensor_leaves(out)]
        if not outputs and _is_inplace(short) and args and isinstance(args[0], torch.Tensor):
            outputs = [args[0]]  # in-place update: record the tensor's new value
        if outputs:
            source = _source()
            for tensor in outputs:
                self._add(name, _family(short), "op", tensor, source, inputs)
        return out

    def add_input(self, tensor: torch.Tensor, label: str) -> None:
        self._add(label, "input", "input", tensor, None, ())

    def _add(self, name: str, family: str, kind: str, tensor: torch.Tensor, source: Source | None,
             inputs: tuple[int, ...], child: str = "") -> None:
        self._busy = True
        try:
            value = None
            if self._elements + tensor.numel() <= self.max_elements:
                value = tensor.detach().clone()
                self._elements += tensor.numel()
            node = _Node(len(self.nodes), name, family, kind, tuple(tensor.shape), str(tensor.dtype).replace(
                "torch.", ""), value, source, inputs, self._owners[-1] if self._owners else "", child)
            self.nodes.append(node)
            self._producer[id(tensor)] = node.index
            self._keep.append(tensor)
        finally:
            self._busy = False

    def _producers(self, obj: Any) -> tuple[int, ...]:
        found = []
        for tensor in tensor_leaves(obj):
            index = self._producer.get(id(tensor))
            if index is not None:
                found.append(index)
        return tuple(dict.fromkeys(found))

    # -- child modules ----------------------------------------------------------------------------

    def hooks(self, module: nn.Module) -> list[Any]:
        handles = []
        for name, child in module.named_modules():
            if not name:
                continue
            handles.append(child.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            handles.append(child.register_forward_hook(self._post(name)))
        return handles

    def _pre(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            opened = self._depth == 0 and name in self.look_through
            self._opened.append(opened)
            if opened:
                self._owners.append(name)
                return
            if self._depth == 0:
                self._child_inputs.append(self._producers((args, kwargs)))
            self._depth += 1

        return hook

    def _post(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._opened and self._opened.pop():
                self._owners.pop()
                return
            self._depth -= 1
            if self._depth > 0:
                return
            inputs = self._child_inputs.pop() if self._child_inputs else ()
            key = self.module_keys.get(name) or f"{type(module).__name__}"
            source = _source()
            for tensor in tensor_leaves(output):
                self._add(f"{name} ({type(module).__name__})", f"module:{key}", "module", tensor, source, inputs,
                          child=name)

        return hook


def trace_ops(
    module: nn.Module,
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    *,
    module_keys: Mapping[str, str] | None = None,
    look_through: frozenset[str] = frozenset(),
    call: Any = None,
    autocast: Autocast | None = None,
) -> tuple[list[_Node], list[int]]:
    """Run ``module`` once on ``inputs`` recording its operators.

    Args:
        module: the module to run.
        inputs: ``(args, kwargs)`` for ``module(*args, **kwargs)``.
        module_keys: child module name (relative to ``module``) -> a key shared with its
            counterpart on the other side (aligned children compare as one operator).
        look_through: child names (relative) whose operators are recorded as the module's own.
        call: ``call(module, args, kwargs)`` instead of ``module(*args, **kwargs)``.
        autocast: the ``torch.autocast`` state to run under (the one the module was called
            under when its inputs were captured); ``None`` leaves the current one.

    Returns:
        The recorded nodes and the node indices of the module's output tensors.
    """
    recorder = _Recorder(module_keys or {}, look_through=look_through)
    args, kwargs = inputs
    for label, tensor in zip(_input_labels(inputs), tensor_leaves(inputs), strict=False):
        recorder.add_input(tensor, label)
    handles = recorder.hooks(module)
    amp = autocast_as(autocast, device_types(module, inputs)) if autocast is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), amp, recorder:
            out = call(module, args, kwargs) if call is not None else module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    outputs = [recorder._producer.get(id(t), -1) for t in tensor_leaves(out)]
    return recorder.nodes, outputs


def _input_labels(inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Iterator[str]:
    for label, _ in iter_inputs(*inputs):
        yield label


# -- alignment by value ---------------------------------------------------------------------------


def find_first_difference(
    port_nodes: list[_Node],
    upstream_nodes: list[_Node],
    tolerance: Tolerance,
    *,
    port_outputs: Sequence[int] = (),
    upstream_outputs: Sequence[int] = (),
    module: str = "",
    upstream_module: str = "",
) -> OpFinding:
    """Walk the port's operators in order and find the first whose output differs from upstream's.

    Each port output is tried against the upstream outputs of compatible shape.
    Preferred partners are computed *from* the upstream partners of the port
    output's nearest matched ancestors in the data flow: the upstream analogue of
    "computed from the same values". A port output that matches nothing while such
    a partner of the same operator family exists is the finding.
    """
    finding = OpFinding(module=module, upstream_module=upstream_module, port_ops=_count(port_nodes),
                        upstream_ops=_count(upstream_nodes))
    index: dict[tuple[int, ...], list[_Node]] = {}
    for node in upstream_nodes:
        if node.value is not None and _usable(node):
            index.setdefault(_key(node.value), []).append(node)
    ancestors = _ancestor_masks(upstream_nodes)
    sorted_values: dict[int, torch.Tensor] = {}
    matched: dict[int, int] = {}  # port node -> upstream node
    frontier: dict[int, frozenset[int]] = {}  # port node -> its nearest matched ancestors (port indices)
    taken: set[int] = set()
    bad: tuple[_Node, _Node] | None = None
    for node in port_nodes:
        frontier[node.index] = frozenset().union(
            *({i} if i in matched else frontier.get(i, frozenset()) for i in node.inputs)
        )
        if node.kind == "input" or node.value is None or not _usable(node):
            continue
        candidates = index.get(_key(node.value), [])
        if not candidates:
            continue
        sources = [matched[i] for i in frontier[node.index]]
        related = [u for u in candidates if all(ancestors[u.index] >> s & 1 for s in sources)]
        others = [u for u in candidates if u not in related]
        hit = None
        for cand in sorted(related, key=lambda u: u.index in taken) + others:
            if _quick_reject(node, cand, tolerance, sorted_values):
                continue
            if cand.value is not None and best_match(node.value, cand.value, tolerance).ratio <= 1.0:
                hit = cand
                break
        if hit is not None:
            matched[node.index] = hit.index
            taken.add(hit.index)
            continue
        same_family = [u for u in related if u.family == node.family and u.kind != "input" and u.index not in taken]
        if same_family:
            bad = (node, same_family[0])
            break
    if bad is None:
        bad = _output_difference(port_nodes, upstream_nodes, port_outputs, upstream_outputs, tolerance)
        if bad is None:
            finding.matched = len(matched)
            finding.note = ("no operator differs: run alone on the captured inputs, the module's operators all "
                            "have matching upstream values")
            return finding
    port_node, up_node = bad
    finding.port_op, finding.upstream_op = port_node.ref(), up_node.ref()
    if port_node.value is not None and up_node.value is not None:
        finding.metrics = best_match(port_node.value, up_node.value, tolerance)
    finding.matched = len(matched)
    earlier = [i for i in matched if i < port_node.index]
    if earlier:
        last = max(earlier)
        finding.last_match = (port_nodes[last].ref(), upstream_nodes[matched[last]].ref())
    finding.suspects = [port_nodes[i].ref() for i in _cone(port_nodes, port_node.index, matched)][:MAX_SUSPECTS]
    return finding


def _output_difference(
    port_nodes: list[_Node], upstream_nodes: list[_Node], port_outputs: Sequence[int], upstream_outputs: Sequence[int],
    tolerance: Tolerance,
) -> tuple[_Node, _Node] | None:
    """Fallback: the module's own outputs, when they differ and nothing earlier was found."""
    for p, u in zip(port_outputs, upstream_outputs, strict=False):
        if p < 0 or u < 0:
            continue
        pn, un = port_nodes[p], upstream_nodes[u]
        if pn.value is None or un.value is None or _key(pn.value) != _key(un.value):
            continue
        if best_match(pn.value, un.value, tolerance).ratio > 1.0:
            return pn, un
    return None


def _ancestor_masks(nodes: list[_Node]) -> list[int]:
    """Per node, a bit mask of every node it was computed from (directly or not)."""
    masks: list[int] = []
    for node in nodes:
        mask = 0
        for i in node.inputs:
            mask |= masks[i] | (1 << i)
        masks.append(mask)
    return masks


def _cone(nodes: list[_Node], start: int, matched: Mapping[int, int]) -> list[int]:
    """Port operators upstream of ``start`` in the data flow that match nothing, earliest first."""
    seen: set[int] = set()
    stack = list(nodes[start].inputs)
    while stack:
        index = stack.pop()
        if index in seen or index in matched:
            continue
        node = nodes[index]
        if node.kind == "input":
            continue
        seen.add(index)
        stack.extend(node.inputs)
    return sorted(seen)


def best_match(port: torch.Tensor, upstream: torch.Tensor, tolerance: Tolerance) -> Metrics:
    """Compare two tensors up to a permutation of their (non-unit) dimensions; the best permutation wins."""
    a, b = _squeezed(port), _squeezed(upstream)
    best: Metrics | None = None
    for perm in _permutations(tuple(a.shape), tuple(b.shape)):
        metrics = compare(a.permute(perm) if perm else a, b, tolerance)
        if best is None or metrics.ratio < best.ratio:
            best = metrics
        if best.ratio <= 1.0:
            break
    if best is None:
        raise ValueError(f"shapes {tuple(port.shape)} and {tuple(upstream.shape)} are not permutations")
    return best


def _quick_reject(node: _Node, cand: _Node, tolerance: Tolerance, cache: dict[int, torch.Tensor]) -> bool:
    """Cheap necessary condition for a match: the sorted elements must already be close."""
    a = _sorted(node, cache, offset=0)
    b = _sorted(cand, cache, offset=1 << 40)
    worst = float((a - b).abs().max()) if a.numel() else 0.0
    return worst > 2.0 * (tolerance.atol + tolerance.rtol * float(b.abs().max() if b.numel() else 0.0))


def _sorted(node: _Node, cache: dict[int, torch.Tensor], offset: int) -> torch.Tensor:
    key = node.index + offset
    if key not in cache:
        value = node.value
        assert value is not None
        flat = _squeezed(value).reshape(-1).to(torch.float64)
        cache[key] = torch.nan_to_num(flat).sort().values
    return cache[key]


def _squeezed(t: torch.Tensor) -> torch.Tensor:
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.reshape([d for d in t.shape if d != 1])


def _key(t: torch.Tensor) -> tuple[int, ...]:
    dims = list(t.shape) + ([2] if t.is_complex() else [])
    return tuple(sorted(d for d in dims if d != 1))


def _usable(node: _Node) -> bool:
    value = node.value
    return value is not None and value.numel() >= 2 and (value.is_floating_point() or value.is_complex())


def _permutations(src: tuple[int, ...], dst: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Dimension orders of ``src`` that give ``dst``'s shape, identity first, at most ``MAX_PERMUTATIONS``."""
    if len(src) != len(dst):
        return
    if src == dst:
        yield tuple(range(len(src)))
    options = [[i for i, size in enumerate(src) if size == want] for want in dst]
    count = 0
    for perm in itertools.product(*options):
        if len(set(perm)) != len(perm) or perm == tuple(range(len(src))):
            continue
        yield perm
        count += 1
        if count >= MAX_PERMUTATIONS:
            return


def _count(nodes: list[_Node]) -> int:
    return sum(1 for n in nodes if n.kind != "input")


def _op_name(func: Any) -> str:
    try:
        name = resolve_name(func) or ""
    except Exception:  # resolve_name looks things up by name; never let it break a forward
        name = ""
    if not name:
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return name[len("torch."):] if name.startswith("torch.") else name


def _is_inplace(short: str) -> bool:
    """``mul_``, ``copy_``, ``x[i] = y``: calls that change their first argument."""
    return (short.endswith("_") and not short.startswith("_")) or short in _INPLACE_EXTRA


def _family(short: str) -> str:
    return _FAMILY_OF.get(short, short.strip("_").removesuffix("_"))


def _source() -> Source | None:
    """The innermost stack frame outside torch and tracediff.bisect: the user's line."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_SKIP_DIRS) and not filename.startswith("<"):
            code = linecache.getline(filename, frame.f_lineno).strip()
            return Source(filename, frame.f_lineno, frame.f_code.co_name, code)
        frame = frame.f_back
    return None


def module_settings(port: nn.Module, upstream: nn.Module) -> tuple[str, str] | None:
    """Both modules' ``extra_repr()`` when they differ (``eps=0.01`` vs ``eps=1e-06``), else ``None``."""
    try:
        mine, theirs = port.extra_repr(), upstream.extra_repr()
    except Exception:  # a user's extra_repr may fail on a half-configured module; it is only a hint
        return None
    if mine == theirs or not (mine or theirs):
        return None
    return mine, theirs


def is_builtin(module: nn.Module) -> bool:
    """A torch.nn layer used as is: its forward is torch's, not the user's."""
    return type(module).__module__.startswith("torch.")


def look_through(module: nn.Module, keys: Mapping[str, str]) -> frozenset[str]:
    """Descendants (relative names) with no counterpart whose forward is the user's code, not torch's."""
    return frozenset(
        name for name, child in module.named_modules()
        if name and name not in keys and not is_builtin(child) and not is_container(child)
    )


def operator_level(
    port_module: nn.Module,
    upstream_module: nn.Module,
    port_inputs: tuple[tuple[Any, ...], dict[str, Any]],
    upstream_inputs: tuple[tuple[Any, ...], dict[str, Any]],
    tolerance: Tolerance,
    *,
    port_name: str,
    upstream_name: str,
    port_keys: Mapping[str, str] | None = None,
    upstream_keys: Mapping[str, str] | None = None,
    port_call: Any = None,
    upstream_call: Any = None,
    port_autocast: Autocast | None = None,
    upstream_autocast: Autocast | None = None,
) -> OpFinding:
    """Trace both modules alone on their captured inputs and find the first differing operator.

    Children are first compared as whole operators. When the difference leads back to
    a child with no counterpart whose forward is the user's code, both modules are
    traced again looking through such children, so the answer names the operator
    inside it (and the child it ran in) rather than "somewhere in that child".

    ``port_autocast``/``upstream_autocast``: the ``torch.autocast`` state each module was
    called under in the model (``None``: the current one); each is re-run under it.
    Errors of the re-run propagate.
    """

    def compare(port_open: frozenset[str], up_open: frozenset[str]) -> tuple[OpFinding, list[_Node]]:
        port_nodes, port_out = trace_ops(port_module, port_inputs, module_keys=port_keys, call=port_call,
                                         look_through=port_open, autocast=port_autocast)
        up_nodes, up_out = trace_ops(upstream_module, upstream_inputs, module_keys=upstream_keys,
                                     call=upstream_call, look_through=up_open, autocast=upstream_autocast)
        found = find_first_difference(port_nodes, up_nodes, tolerance, port_outputs=port_out,
                                      upstream_outputs=up_out, module=port_name, upstream_module=upstream_name)
        return found, port_nodes

    finding, nodes = compare(frozenset(), frozenset())
    port_open = look_through(port_module, port_keys or {})
    blamed = [ref for ref in (finding.port_op, *finding.suspects) if ref is not None]
    suspected = {nodes[ref.index].child for ref in blamed} & port_open
    if suspected:
        inside = frozenset(name for name in port_open if any(is_within(name, s, strict=False) for s in suspected))
        deeper, _ = compare(inside, look_through(upstream_module, upstream_keys or {}))
        if deeper.port_op is not None:
            finding = deeper
    finding.settings = module_settings(port_module, upstream_module)
    return finding
