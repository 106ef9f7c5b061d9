"""Hooks never break the model: traced output is bit-identical, and a failing hook is one warning.

Failures here are real, not mocked: tensor subclasses that refuse every
operation, output containers that raise when walked, tensors without data.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import nn

from tracediff import TraceConfig, attach, open_trace, trace_step

ALL_STATS = "abs_mean,sum,min,max,mean,std,l2,nan_count,inf_count,shape,dtype,sample,full"
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPLEX = (torch.complex64, torch.complex128)
INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
DTYPES = (*FLOATS, *COMPLEX, *INTS, torch.bool)


def _bits(tensor: torch.Tensor) -> bytes:
    """The tensor's exact bytes (NaN payloads and -0.0 included), plus its metadata."""
    header = f"{tensor.dtype}|{tuple(tensor.shape)}|{tensor.stride()}|{tensor.requires_grad}|".encode()
    return header + tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tree_bits(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return _bits(out)
    if isinstance(out, dict):
        return {key: _tree_bits(value) for key, value in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_tree_bits(value) for value in out)
    if dataclasses.is_dataclass(out):
        return {f.name: _tree_bits(getattr(out, f.name)) for f in dataclasses.fields(out)}
    return out


@dataclasses.dataclass
class Output:
    sample: torch.Tensor
    extras: dict


class Op(nn.Module):
    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args)


class DtypeNet(nn.Module):
    """Computes in ``dtype`` end to end, with nested outputs, in-place ops and views."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        if dtype in FLOATS:
            self.proj = nn.Linear(6, 6, dtype=dtype)
            mix = lambda a, b: (a * 1.5 - b.flip(-1), torch.cumsum(a, -1))  # noqa: E731
        elif dtype in COMPLEX:
            self.proj = Op(lambda x: x * (0.5 - 2j) + x.conj())
            mix = lambda a, b: (a * b.flip(-1), a.real)  # noqa: E731
        elif dtype == torch.bool:
            self.proj = Op(lambda x: x ^ x.flip(-1))
            mix = lambda a, b: (a & ~b, a.sum(-1))  # noqa: E731
        else:
            self.proj = Op(lambda x: x * 3 - x.flip(-1))
            mix = lambda a, b: (a - b, torch.cumsum(a, -1))  # noqa: E731
        self.mix = Op(mix)
        self.view = Op(lambda x: x.t()[1:])  # a non-contiguous view of another module's output

    def forward(self, x: torch.Tensor) -> Output:
        y = self.proj(x)
        a, b = self.mix(y, x)
        if self.dtype in FLOATS:
            a.mul_(0.75)  # in place, after the hook has seen ``a``
        return Output(sample=self.view(a), extras={"pair": (a, b), "input": x})


def _inputs(dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype in FLOATS:
        x = torch.randn(4, 6, generator=g).to(dtype)
        x[0, 0], x[0, 1], x[0, 2], x[1, 0] = float("nan"), float("inf"), -0.0, float("-inf")
        return x
    if dtype in COMPLEX:
        return torch.randn(4, 6, generator=g, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(4, 6, generator=g) > 0.5
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -100), min(info.max, 100), (4, 6), generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
@pytest.mark.parametrize("stats", ["abs_mean,sum", ALL_STATS], ids=["default-stats", "all-stats"])
def test_traced_output_is_bit_identical_for_every_dtype(tmp_path, dtype, stats) -> None:
    torch.manual_seed(0)
    model = DtypeNet(dtype)
    xs = [_inputs(dtype, seed) for seed in range(3)]
    expected = [_tree_bits(model(x.clone())) for x in xs]
    inputs_before = [_bits(x) for x in xs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorder supports these dtypes: not even a warning
        with attach(model, config=TraceConfig(stats=stats), output=tmp_path / "t.h5") as handle:
            got = []
            for step, x in enumerate(xs):
                with trace_step(step):
                    got.append(_tree_bits(model(x)))
    assert handle.failures == {}
    assert got == expected
    assert [_bits(x) for x in xs] == inputs_before  # the hooks never wrote into the inputs
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0, 1, 2]
        assert set(trace.record_modules().tolist()) == {"", "proj", "mix", "view"}


class Unreadable(torch.Tensor):
    """A tensor subclass that refuses every torch operation once ``locked`` (a stand-in for exotic subclasses)."""

    locked = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        if cls.locked:
            raise RuntimeError(f"Unreadable refuses {getattr(func, '__name__', func)}")
        return super().__torch_function__(func, types, args, kwargs or {})


class _Raises(Mapping):
    """A mapping that lists keys but cannot produce its items."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(["a"])

    def __len__(self) -> int:
        return 1

    def items(self):  # noqa: ANN201
        raise RuntimeError("items() is not supported on this output")


class _BadList(list):
    def __iter__(self):  # noqa: ANN204
        raise RuntimeError("this list cannot be iterated")


def _cycle() -> list:
    loop: list = [torch.ones(2)]
    loop.append(loop)
    loop.append(loop)
    return loop


class Emits(nn.Module):
    """``exotic`` returns a strange object; the model returns it untouched next to a normal tensor."""

    def __init__(self, make) -> None:  # noqa: ANN001
        super().__init__()
        self.before = nn.Linear(2, 2)
        self.exotic = Op(lambda: make())
        self.after = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
        strange = self.exotic()
        return strange, self.after(self.before(x))


def _unreadable() -> torch.Tensor:
    Unreadable.locked = False
    tensor = torch.arange(4.0).as_subclass(Unreadable)
    Unreadable.locked = True
    return tensor


EXOTIC = {
    "tensor-subclass-refusing-everything": (_unreadable, "Unreadable refuses"),
    "meta-tensor-without-data": (lambda: torch.ones(3, device="meta"), "meta"),
    "mapping-whose-items-raise": (_Raises, "items() is not supported"),
    "list-that-cannot-be-iterated": (lambda: _BadList([torch.ones(1)]), "cannot be iterated"),
    "float8-tensor": (lambda: torch.ones(3).to(torch.float8_e4m3fn), "Float8"),
    "sparse-tensor": (lambda: torch.eye(3).to_sparse(), ""),
}


@pytest.mark.parametrize("kind", list(EXOTIC))
@pytest.mark.parametrize("stats", ["abs_mean,sum", "shape,sample", ALL_STATS], ids=["moments", "sample", "all"])
def test_a_failing_hook_warns_once_and_leaves_the_output_alone(tmp_path, kind, stats) -> None:
    make, message = EXOTIC[kind]
    torch.manual_seed(0)
    model = Emits(make)
    xs = [torch.randn(3, 2) for _ in range(3)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with attach(model, config=TraceConfig(stats=stats), output=tmp_path / "t.h5") as handle:
                outputs = []
                for step, x in enumerate(xs):
                    with trace_step(step):
                        outputs.append(model(x))
    finally:
        Unreadable.locked = False
    ours = [str(w.message) for w in caught if str(w.message).startswith("tracediff:")]
    assert all("writing" not in text for text in ours), ours  # one strange output never stops the whole trace
    assert len(ours) == len(set(ours)) == len(handle.failures), ours  # once per module, not once per call
    for text in ours:
        assert message in text and "the model runs on unchanged" in text, text
    assert set(handle.failures) <= {"exotic", "<model>"}
    # The strange object comes back as the very object the module returned; the rest computes as untraced.
    for x, (strange, y) in zip(xs, outputs, strict=True):
        assert type(strange) is type(make())
        assert torch.equal(y, model.after(model.before(x)))
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.steps == [0, 1, 2]
        modules = trace.record_modules().tolist()
        assert modules.count("before") == 3 and modules.count("after") == 3


def test_cyclic_output_terminates_and_records_its_tensors(tmp_path) -> None:
    model = Emits(_cycle)
    with attach(model, config=TraceConfig(stats="abs_mean"), output=tmp_path / "t.h5") as handle:
        strange, _ = model(torch.randn(3, 2))
    assert strange[1] is strange and handle.failures == {}
    with open_trace(tmp_path / "t.h5") as trace:
        assert "exotic" in trace.record_modules().tolist()
