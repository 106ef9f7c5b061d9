"""scripts/parallel_wan.py for real: torchrun, two ranks, a tensor-/sequence-parallel Wan-shaped DiT.

Each run launches ``python -m torch.distributed.run --nproc-per-node 2`` (what ``torchrun`` is) on the script at
its tiny shape: both ranks trace their shards, rank 0 traces the unsharded model in a child process, merges the
rank traces with ``python -m tracediff merge`` and diffs them with ``python -m tracediff first-drift``. On the
CPU the ranks talk over gloo; the NCCL test needs two GPUs and skips without them.

torchrun exits 1 for any failed rank, so the script's own exit code (0 no drift, 1 drift found, 2 error) is
also checked in the ``result.json`` it writes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import run_cli
from tracediff import open_trace

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "parallel_wan.py"

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FASTVIDEO_TRACE_", "TRACEDIFF_"))},
        "PYTHONPATH": str(REPO),
        "COLUMNS": "200",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(SCRIPT), "--out", str(out), *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def result(out: Path, proc: subprocess.CompletedProcess[str]) -> dict:
    """The script's own summary (rank 0 writes it last); a crash leaves none, and its output says why."""
    path = out / "result.json"
    assert path.is_file(), proc.stdout + proc.stderr
    return json.loads(path.read_text())


def shard_errors(headline: str) -> dict[int, float]:
    """``{rank: rel. L2 error of its shard}`` from a first-drift headline about a sharded record."""
    by_shard = re.search(r"by shard: (.*?) \(worst:", headline)
    assert by_shard, headline
    return {int(rank): float(err) for rank, err in re.findall(r"rank (\d+) ([^,\s]+)", by_shard.group(1))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return out, torchrun(out, "--shape", "tiny", "--backend", "gloo")


def test_clean_run_exits_0_and_the_merged_ranks_match_the_single_device_model(clean):
    out, proc = clean
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parallel_wan: no drift between the merged ranks and the single-device model" in proc.stdout
    assert result(out, proc) == {"exit": 0, "finding": None, "planted": None}
    assert sorted(p.name for p in (out / "ranks").iterdir()) == ["port-rank0.h5", "port-rank1.h5"]
    assert not (out / "weights.pt").exists()  # the full weights, saved for the reference run, are removed after it
    for rank in range(2):
        with open_trace(out / "ranks" / f"port-rank{rank}.h5") as trace:
            meta = trace.meta
            assert (meta["rank"], meta["world_size"], meta["backend"]) == (rank, 2, "gloo")
            assert meta["process_groups"] == {"world": [0, 1], "tp": [0, 1], "sp": [0, 1]}
    # the reference ran outside the torch.distributed job: a single-device trace, not rank 0's
    with open_trace(out / "ref.h5") as ref:
        assert (ref.meta["rank"], ref.meta["world_size"]) == (0, 1)
        assert "backend" not in ref.meta
    with open_trace(out / "merged.h5") as merged:
        info = merged.meta["merge"]
        assert merged.meta["merged_ranks"] == [0, 1]
        assert info["rank_mismatches"] == 0 and info["assumed_replicated"] == 0 and info["samples_dropped"] == 0
        assert info["sharded"] > 0 and info["replicated"] > 0
        layout, names = merged.ranks, merged.record_modules()
        dims = {}
        for i in range(len(merged.records)):
            if merged.records.label_of(i) == "out" and int(merged.records.columns["step"][i]) == 0:
                dims[names[i]] = int(layout.shard_dim[i])
    # sequence parallel (tokens, dim 1), tensor parallel (features, dim 2), replicated after an all-reduce (-1)
    assert dims["patch_embedding"] == 1 and dims["blocks.0"] == 1 and dims["blocks.1.attn"] == 1
    assert dims["blocks.0.attn.to_q"] == 2 and dims["blocks.0.attn.core"] == 2 and dims["blocks.0.ffn.up"] == 2
    assert dims["blocks.1.attn.to_k"] == 1 and dims["blocks.1.attn.core"] == 1  # all-gathered K/V attention
    assert dims["blocks.0.attn.to_out"] == -1 and dims["blocks.1.ffn.down"] == -1 and dims["time_embedding"] == -1
    # the real CLI reads the folder of rank traces as it is, merging on the fly
    proc = run_cli("first-drift", str(out / "ref.h5"), str(out / "ranks"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no drift" in proc.stdout


def test_a_bug_in_rank_1s_weight_shard_is_named_with_module_and_rank(tmp_path):
    proc = torchrun(tmp_path, "--shape", "tiny", "--backend", "gloo", "--plant-bug", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "rank 1: planted bug: this rank's shard of blocks.0.ffn.up.weight scaled by 1.5" in proc.stdout
    assert "parallel_wan: found drift in a sharded tensor at module blocks.0.ffn.up, rank 1" in proc.stdout
    got = result(tmp_path, proc)
    assert got["exit"] == 1 and got["planted"] == {"rank": 1, "bug": "ffn-shard", "block": 0}
    assert (got["finding"]["module"], got["finding"]["rank"]) == ("blocks.0.ffn.up", 1)
    headline = got["finding"]["headline"]
    assert headline.startswith("first drift: blocks.0.ffn.up (upstream blocks.0.ffn.up), step 0, call 0, tensor out:")
    assert "sharded over ranks 0, 1 along dim 2" in headline
    errors = shard_errors(headline)
    # rank 0's shard differs by float32 rounding of the split matmuls only; rank 1's carries the 1.5x weight
    assert errors.keys() == {0, 1} and errors[0] < 1e-6 and errors[1] > 0.1, headline


def test_a_wrong_bias_after_the_all_reduce_on_rank_1_is_a_rank_mismatch(tmp_path):
    proc = torchrun(tmp_path, "--shape", "tiny", "--backend", "gloo", "--plant-bug", "1", "--bug", "out-bias")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "parallel_wan: found rank mismatch (replicated tensor) at module blocks.0.ffn.down, rank 1" in proc.stdout
    got = result(tmp_path, proc)
    assert got["exit"] == 1 and (got["finding"]["module"], got["finding"]["rank"]) == ("blocks.0.ffn.down", 1)
    assert "rank 1 disagrees with rank 0" in got["finding"]["headline"]


def test_bench_writes_per_rank_figures(tmp_path):
    report = tmp_path / "bench.json"
    proc = torchrun(tmp_path, "--shape", "tiny", "--backend", "gloo", "--bench", "--repeats", "3", "--warmup", "1",
                    "--json", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tracing overhead per rank" in proc.stdout
    figures = json.loads(report.read_text())
    assert (figures["backend"], figures["world_size"], figures["repeats"]) == ("gloo", 2, 3)
    assert [row["rank"] for row in figures["per_rank"]] == [0, 1]
    for row in figures["per_rank"]:
        assert row["untraced_ms"] > 0 and row["traced_ms"] > 0
        assert row["overhead_pct"] == pytest.approx(100 * (row["traced_ms"] / row["untraced_ms"] - 1))
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == ["port-rank0.h5", "port-rank1.h5"]


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"needs 2 CUDA GPUs for NCCL; this machine has {torch.cuda.device_count()}",
)
def test_nccl_on_two_gpus(tmp_path):
    clean = torchrun(tmp_path / "clean", "--shape", "tiny", "--backend", "nccl")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert result(tmp_path / "clean", clean)["exit"] == 0
    with open_trace(tmp_path / "clean" / "ranks" / "port-rank1.h5") as trace:
        assert (trace.meta["backend"], trace.meta["device"]) == ("nccl", "cuda:1")
    buggy = torchrun(tmp_path / "bug", "--shape", "tiny", "--backend", "nccl", "--plant-bug", "1")
    assert buggy.returncode == 1, buggy.stdout + buggy.stderr
    got = result(tmp_path / "bug", buggy)
    assert (got["finding"]["module"], got["finding"]["rank"]) == ("blocks.0.ffn.up", 1)
    errors = shard_errors(got["finding"]["headline"])
    assert errors[0] < 1e-5 and errors[1] > 0.1


def test_without_full_tensors_a_sharded_drift_is_found_but_its_rank_is_not_named(tmp_path):
    # Merged moments hold the whole tensor only: which rank's shard is off needs each shard's values on both sides.
    proc = torchrun(tmp_path, "--shape", "tiny", "--backend", "gloo", "--plant-bug", "1",
                    "--stats", "abs_mean,sum,min,max,std,sample")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    got = result(tmp_path, proc)
    assert (got["finding"]["module"], got["finding"]["rank"]) == ("blocks.0.ffn.up", None)
    assert "trace the full stat on both sides to see which rank's shard differs" in got["finding"]["headline"]
    assert "parallel_wan: found drift in a sharded tensor at module blocks.0.ffn.up, rank not determined" in proc.stdout
