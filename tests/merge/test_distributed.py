"""Two real gloo ranks: per-rank traces of a tensor-/sequence-parallel model, merged against the unsharded model.

The ranks run ``tests/pairs/tp_mlp.py`` as ``torchrun --nproc-per-node 2``
would (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), once for
all three variants: clean, a bug in a replicated tensor on rank 1 only, and a
bug in rank 1's shard of a column-parallel weight. The unsharded model is
traced in this process.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tracediff import TraceConfig, attach, open_trace
from tracediff.cli import main
from tracediff.merge import load_merged as load_trace

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "pairs" / "tp_mlp.py"
VARIANTS = ("clean", "bug_replicated", "bug_shard")
#: merged moments against the unsharded model's: float32 matmuls of a split weight may round differently
RTOL = 1e-6

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def _tp_mlp():
    spec = importlib.util.spec_from_file_location("tp_mlp", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``{variant: folder of per-rank traces}`` plus ``"ref"``: the unsharded model's trace."""
    root = tmp_path_factory.mktemp("tp")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FASTVIDEO_TRACE_", "TRACEDIFF_"))},
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONPATH": str(REPO),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), "--out", str(root), *VARIANTS],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    tp = _tp_mlp()
    net = tp.reference_net()
    ref = root / "ref.h5"
    with attach(net, side="ref", config=TraceConfig(stats=tp.STATS, sample_size=tp.SAMPLE_SIZE), output=ref):
        tp.run_steps(net)
    return {"ref": ref, **{variant: root / variant for variant in VARIANTS}}


def _by_key(trace):
    cols = trace.records.columns
    names = trace.record_modules()
    return {
        (names[i], int(cols["step"][i]), int(cols["call"][i]), trace.records.label_of(i)): i
        for i in range(len(trace.records))
    }


def test_each_rank_writes_its_own_trace_with_the_layout(run):
    assert sorted(p.name for p in run["clean"].iterdir()) == ["tp-rank0.h5", "tp-rank1.h5"]
    for rank in range(2):
        with open_trace(run["clean"] / f"tp-rank{rank}.h5") as trace:
            meta = trace.meta
            assert (meta["rank"], meta["world_size"], meta["backend"], meta["local_rank"]) == (rank, 2, "gloo", rank)
            assert meta["process_groups"] == {"world": [0, 1], "tp": [0, 1]}


def test_merged_stats_equal_the_unsharded_model(run, capsys):
    with open_trace(run["ref"]) as ref:
        merged = load_trace(run["clean"], like=ref)
        info = merged.meta["merge"]
        # up and act of both blocks, and the sequence-parallel tokens, in both steps
        assert (info["sharded"], info["rank_mismatches"], info["samples_dropped"]) == (10, 0, 0)
        ref_keys, merged_keys = _by_key(ref), _by_key(merged)
        assert ref_keys.keys() == merged_keys.keys()
        for key, i in ref_keys.items():
            j = merged_keys[key]
            assert merged.records.shape_of(j) == ref.records.shape_of(i), key
            for name in ("numel", "nan_count", "inf_count"):
                assert merged.records.columns[name][j] == ref.records.columns[name][i], (key, name)
            for name in ("sum", "abs_sum", "sumsq", "min", "max"):
                got, want = merged.records.columns[name][j], ref.records.columns[name][i]
                scale = ref.records.columns["abs_sum"][i] if name == "sum" else abs(want)
                assert abs(got - want) <= RTOL * scale, (key, name, got, want)
            for got, want in ((merged.sample(j), ref.sample(i)), (merged.full(j), ref.full(i))):
                np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max(), err_msg=str(key))
        layout = merged.ranks
        up0 = merged_keys[("blocks.0.up", 0, 0, "out")]  # 16 features, 8/8: found against the unsharded trace
        up1 = merged_keys[("blocks.1.up", 0, 0, "out")]  # 10 features, 6/4: found from the shapes
        tokens = merged_keys[("tokens", 1, 0, "out")]  # sequence parallel
        assert (int(layout.shard_dim[up0]), layout.shard_sizes[up0].tolist()) == (2, [8, 8])
        assert (int(layout.shard_dim[up1]), layout.shard_sizes[up1].tolist()) == (2, [6, 4])
        assert (int(layout.shard_dim[tokens]), layout.shard_sizes[tokens].tolist()) == (1, [3, 3])
    assert main(["first-drift", str(run["ref"]), str(run["clean"])]) == 0
    assert "no drift: 30 records of 14 aligned modules" in capsys.readouterr().out


def test_a_replicated_bug_on_rank_1_is_reported_with_its_rank(run, capsys):
    assert main(["first-drift", str(run["ref"]), str(run["bug_replicated"])]) == 1
    out = capsys.readouterr().out
    headline = next(line for line in out.splitlines() if line.startswith("first drift:"))
    assert headline.startswith(
        "first drift: blocks.0.down (upstream blocks.0.down), step 0, call 0, tensor out: rank mismatch: "
        "replicated tensor differs across ranks: rank 1 disagrees with rank 0"
    )


def test_a_bug_in_rank_1s_shard_is_reported_with_its_rank(run, capsys):
    assert main(["first-drift", str(run["ref"]), str(run["bug_shard"] / "tp-rank*.h5")]) == 1
    out = capsys.readouterr().out
    headline = next(line for line in out.splitlines() if line.startswith("first drift:"))
    assert headline.startswith("first drift: blocks.0.up (upstream blocks.0.up), step 0, call 0, tensor out: ")
    assert "sharded over ranks 0, 1 along dim 2; rel L2 err by shard: rank 0 " in headline
    assert headline.endswith("(worst: rank 1)")
    # The numbers, not their text: rank 0's shard is only float32 rounding of a split matmul (0 on one CPU,
    # 6.14e-08 on an AVX-512 one), rank 1's carries the bug.
    by_shard = headline.split("rel L2 err by shard: ", 1)[1].rsplit(" (worst:", 1)[0]
    errors = {int(rank): float(err) for rank, err in re.findall(r"rank (\d+) (\S+?)(?:,|$)", by_shard)}
    assert errors.keys() == {0, 1}, headline
    assert errors[0] <= RTOL, headline
    assert errors[1] > 1e3 * RTOL, headline


def test_merge_command_writes_a_trace_first_drift_reads(run, tmp_path, capsys):
    merged = tmp_path / "merged.h5"
    assert main(["merge", str(run["clean"]), "-o", str(merged), "--like", str(run["ref"])]) == 0
    assert "merged ranks 0, 1 of 2" in capsys.readouterr().out
    assert main(["first-drift", str(run["ref"]), str(merged)]) == 0
    capsys.readouterr()
