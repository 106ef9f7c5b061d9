"""The fused moments kernel and the GPU capture path (skipped where there is no CUDA device).

The kernel's logic also runs without a GPU under Triton's interpreter
(``TRITON_INTERPRET=1``) wherever Triton is installed: CI installs it beside
its CPU-only PyTorch (.ci/run), so the kernel's indexing, masks and combine
run there too, held to the precision docs/trace-format.md promises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tracediff import TraceConfig, attach, open_trace, trace_step
from tracediff.hooks import fused
from tracediff.hooks.stats import moments

REPO = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(x: torch.Tensor) -> np.ndarray:
    """The moments in float64 on the CPU, the definition the kernel must meet."""
    v = x.detach().cpu().to(torch.float64)
    low, high = torch.aminmax(v)
    return np.array([
        v.sum().item(), v.abs().sum().item(), (v * v).sum().item(), low.item(), high.item(),
        torch.isnan(v).sum().item(), torch.isinf(v).sum().item(),
    ])


def tensors(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for n in (1, 7, 4096, 4097, 1_000_003, 3 * 1024 * 4096 + 5):
            out.append((torch.randn(n, generator=g) * 3 + 0.5).to(dtype))
    special = torch.randn(10_000, generator=g)
    special[17], special[5000], special[9999] = float("nan"), float("inf"), -float("inf")
    out.append(special.to(torch.bfloat16))
    infs = torch.randn(4096 * 5, generator=g)
    infs[123] = -float("inf")
    out.append(infs)
    out.append(torch.full((3, 5), -2.5))
    return [t.to(device) for t in out]


#: docs/trace-format.md: float32 running sums carry "a relative error of about 1e-6 of abs_sum (resp. sumsq)".
SUM_RTOL = 1e-6


def check(got: np.ndarray, want: np.ndarray, n: int, dtype: torch.dtype, rtol: float | None = None) -> None:
    rtol = rtol if rtol is not None else 1e-12 if dtype == torch.float64 else SUM_RTOL
    # sum and abs_sum relative to abs_sum, sumsq to sumsq: what float32 partial sums are accurate to
    atol = np.array([want[1], want[1], want[2]]) * rtol + 1e-12
    err = np.abs(got[:3] - want[:3])
    assert (err <= atol).all(), f"sums {got[:3]} vs {want[:3]}: error {err} over {atol} (n={n}, {dtype})"
    np.testing.assert_array_equal(got[3:], want[3:])  # extremes and counts are exact


def test_dense_layouts_are_found_and_samples_follow_logical_order() -> None:
    from tracediff.hooks.stats import dense_flat, dense_layout, sample_positions, take_sample

    x = torch.randn(1, 32, 3, 4, 5).flatten(2).transpose(1, 2)  # a DiT's token layout
    assert not x.is_contiguous() and dense_layout(x) == (0, 2, 1)
    assert sorted(dense_flat(x).tolist()) == sorted(x.reshape(-1).tolist())
    assert dense_layout(torch.randn(4, 6)[:, :3]) is None and dense_layout(torch.randn(4, 1).expand(4, 5)) is None
    positions = sample_positions(x.numel(), 64)
    assert torch.equal(take_sample(x, 64), x.reshape(-1)[positions])
    np.testing.assert_allclose(moments(x).numpy(), moments(x.contiguous()).numpy(), rtol=1e-12)


@cuda
def test_fused_kernel_matches_float64_reference() -> None:
    assert fused.available(), fused._state["reason"]
    for x in tensors("cuda"):
        assert fused.supports(x)
        got = moments(x).cpu().numpy()
        want = reference(x)
        if np.isnan(want[:5]).any() or np.isinf(want[:5]).any():
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_array_equal(got[3:], want[3:])
        else:
            check(got, want, x.numel(), x.dtype)


def chunked_reference(x: torch.Tensor, chunk: int = 1 << 28) -> np.ndarray:
    """:func:`reference` for tensors too large to widen at once: float64 on the device, chunk by chunk."""
    sums = [0.0, 0.0, 0.0]
    low, high, nans, infs = float("inf"), float("-inf"), 0, 0
    for part in x.reshape(-1).split(chunk):
        v = part.to(torch.float64)
        sums[0] += v.sum().item()
        sums[1] += v.abs().sum().item()
        sums[2] += (v * v).sum().item()
        lo, hi = torch.aminmax(v)
        low, high = min(low, lo.item()), max(high, hi.item())
        nans += int(torch.isnan(v).sum().item())
        infs += int(torch.isinf(v).sum().item())
        del v
    return np.array([*sums, low, high, nans, infs], dtype=np.float64)


@cuda
@pytest.mark.parametrize(
    "n",
    [
        2**31 - 3 * fused.BLOCK - 5,  # int32 arguments, but masked-off lanes and the tail wrap past 2**31
        2**31 + 5 * fused.BLOCK + 3,  # just above 2**31 elements
    ],
    ids=["just-below-2**31", "just-above-2**31"],
)
def test_fused_kernel_indexes_tensors_near_2_31_elements(n: int) -> None:
    """int32 indices wrapped negative here: reads before the tensor (wrong sums or an illegal-address fault)."""
    assert fused.available(), fused._state["reason"]
    if torch.cuda.mem_get_info()[0] < 12 << 30:
        pytest.skip("needs 12 GiB of free GPU memory (a 4.3 GB bf16 tensor and float64 chunks of it)")
    assert fused.wide_indices(n, fused.PROGRAMS * fused.BLOCK, fused.BLOCK)
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_(0.5, 2.0, generator=g)
    x[n // 3] = -4096.0  # extremes at known places: one in the main loop, one in the tail
    x[n - 1] = 8192.0
    got = moments(x).cpu().numpy()
    torch.cuda.synchronize()  # an asynchronous fault surfaces here at the latest
    want = chunked_reference(x)
    assert want[3] == -4096.0 and want[4] == 8192.0
    # Each float32 lane sums ~1024 squares here (same sign, so rounding does not cancel): sumsq was
    # measured 1.5e-6 off on an H200, above the "about 1e-6" of smaller tensors; 3e-6 still catches any
    # misread element block (the wrapped reads were off by far more, or faulted).
    check(got, want, n, x.dtype, rtol=3 * SUM_RTOL)


@cuda
def test_fused_kernel_is_deterministic() -> None:
    x = torch.randn(5_000_000, device="cuda", dtype=torch.bfloat16)
    first = moments(x).cpu()
    for _ in range(3):
        assert torch.equal(moments(x).cpu(), first)


@cuda
def test_permuted_layouts_use_the_kernel_and_gapped_views_fall_back() -> None:
    from tracediff.hooks.stats import dense_flat

    dense = torch.randn(1, 64, 6, 10, 14, device="cuda", dtype=torch.bfloat16).flatten(2).transpose(1, 2)
    assert not dense.is_contiguous() and fused.supports(dense_flat(dense))  # DiT token layout: read in place
    gapped = torch.randn(300, 400, device="cuda", dtype=torch.bfloat16)[:, :250]
    assert dense_flat(gapped) is None  # PyTorch reductions instead
    for x in (dense, gapped):
        check(moments(x).cpu().numpy(), reference(x), x.numel(), x.dtype)


@cuda
def test_full_and_sample_of_a_transposed_output_are_in_logical_order(tmp_path) -> None:
    class Transposer(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).transpose(1, 2) * 2  # the result keeps the transposed layout

    model = torch.nn.Sequential(Transposer()).cuda()
    x = torch.randn(1, 16, 4, 6, 10, device="cuda", dtype=torch.bfloat16)
    with attach(model, config=TraceConfig(stats="sum,sample,full"), output=tmp_path / "t.h5"), torch.no_grad():
        y = model(x)
    assert not y.is_contiguous()
    with open_trace(tmp_path / "t.h5") as trace:
        (row,) = np.flatnonzero(trace.record_modules() == "0")
        want = y.float().cpu().numpy()
        np.testing.assert_array_equal(trace.full(row), want)
        flat = want.reshape(-1)
        np.testing.assert_array_equal(trace.sample(row), flat[np.arange(256) * flat.size // 256])


@cuda
def test_gpu_trace_round_trip_stats_sample_full(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()
    model = model.to(torch.bfloat16)
    inputs = [torch.randn(8, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    expected = []
    config = TraceConfig(stats="abs_mean,sum,min,max,std,sample,full,nan_count")
    with attach(model, config=config, output=tmp_path / "t.h5") as handle, torch.no_grad():
        for step, x in enumerate(inputs):
            outs: list[torch.Tensor] = []
            hooks = [m.register_forward_hook(lambda m, a, o, outs=outs: outs.append(o.detach().clone())) for m in model]
            with trace_step(step):
                model(x)
            for h in hooks:
                h.remove()
            expected.append(outs)
        assert handle.recorder._background is not None  # the GPU path writes on the background thread
    with open_trace(tmp_path / "t.h5") as trace:
        assert trace.complete and trace.steps == [0, 1, 2, 3]
        modules = trace.record_modules()
        for step in range(4):
            for i, name in enumerate(("0", "1", "2")):
                (row,) = np.flatnonzero((modules == name) & (trace.records.columns["step"] == step))
                want = expected[step][i].float().cpu()
                np.testing.assert_array_equal(trace.full(row), want.numpy())
                ref = reference(want)
                cols = trace.records.columns
                assert cols["min"][row] == ref[3] and cols["max"][row] == ref[4]
                np.testing.assert_allclose(cols["sum"][row], ref[0], rtol=0, atol=ref[1] * SUM_RTOL)
                np.testing.assert_allclose(cols["abs_sum"][row], ref[1], rtol=SUM_RTOL)
                flat = want.reshape(-1).numpy()
                positions = np.arange(256) * flat.size // 256
                np.testing.assert_array_equal(trace.sample(row), flat[positions])


@cuda
def test_no_device_sync_in_stats_hooks(tmp_path) -> None:
    """Stats and sample hooks queue work only: CUDA reports no synchronisation while the model runs."""
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)]).cuda()
    x = torch.randn(64, 256, device="cuda")
    config = TraceConfig(stats="abs_mean,sum,min,max,mean,std,sample")
    with attach(model, config=config, output=tmp_path / "t.h5"), torch.no_grad():
        with trace_step(0):
            model(x)  # warm-up: kernels compile
        torch.cuda.synchronize()
        with trace_step(1):  # the step's end (the flush) is outside the checked region
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(
    fused.triton is None,
    reason="Triton is not installed (CI installs it: .ci/run); the kernel's logic runs under its interpreter",
)
@pytest.mark.skipif(
    tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 5),
    reason="Triton's interpreter fails under NumPy 2.5 (seen with Triton 3.6: 'only 0-dimensional arrays can be "
    "converted to Python scalars'); CI runs it with Triton 3.9.0 and NumPy 2.4.6 (.ci/run)",
)
def test_kernel_logic_under_triton_interpreter() -> None:
    """The kernel on the CPU (TRITON_INTERPRET=1): every test tensor, int32 and int64 indexing, same bits."""
    script = textwrap.dedent(
        """
        import os, sys
        sys.path.insert(0, {repo!r})
        import numpy as np, torch
        from tracediff.hooks import fused
        from tests.record.test_fused import check, reference, tensors
        checked = 0
        for x in tensors("cpu"):
            if x.numel() > 100_000:  # the interpreter runs each program in Python: keep it quick
                continue
            got = fused.launch(x).numpy()
            wide = fused.launch(x, wide=True).numpy()
            np.testing.assert_array_equal(wide, got)  # int64 indexing: same elements, same order
            want = reference(x)
            if np.isnan(want[:5]).any() or np.isinf(want[:5]).any():
                np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
                np.testing.assert_array_equal(got[3:], want[3:])
            else:
                check(got, want, x.numel(), x.dtype)
            checked += 1
        # two programs looping over 5 blocks (the second masked off in the last round) and a tail
        x = torch.randn(5 * fused.BLOCK + 77, generator=torch.Generator().manual_seed(1))
        check(fused.launch(x, programs=2).numpy(), reference(x), x.numel(), x.dtype)
        print("ok", checked)
        """
    ).format(repo=str(REPO))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
