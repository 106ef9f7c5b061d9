"""Merging per-rank traces (tracediff.merge): exact moments, shard inference, rank mismatches, files, CLI.

The ranks here are simulated in one process (``RANK``/``WORLD_SIZE`` set as
torchrun sets them, no process group), with modules whose outputs are exact
slices of the unsharded model's, so merged values must equal the unsharded
ones to the last bit of a float64 sum. tests/merge/test_distributed.py runs the real
thing with two gloo processes.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import tracediff
from tracediff import TraceConfig, attach, open_trace, trace_step
from tracediff.align.aligner import align
from tracediff.cli import main
from tracediff.config import ENV_RANKS, ENV_RANKS_FASTVIDEO
from tracediff.diff import diff_traces
from tracediff.errors import MergeError, TraceConfigError, TraceFormatError
from tracediff.merge import load_merged as load_trace
from tracediff.merge import merge_files, merge_traces, parse_shard_dims, write_trace

WORLD = 2
SEQ_SPLIT = (slice(0, 4), slice(4, 6))  # uneven: shapes differ across ranks


class Part(nn.Module):
    """This rank's slice of its input along ``dim``; the whole input on the unsharded side."""

    def __init__(self, dim: int, part: slice | None) -> None:
        super().__init__()
        self.dim, self.part = dim, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part is None:
            return x * 1.0
        return x[(slice(None),) * self.dim + (self.part,)] * 1.0


class Scale(nn.Module):
    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * self.factor


class Toy(nn.Module):
    """``col``: sharded along the last dim evenly (equal shapes); ``seq``: dim 1, unevenly; ``rep``: replicated."""

    def __init__(self, rank: int | None = None, *, bug_rank: int | None = None) -> None:
        super().__init__()
        self.col = Part(2, None if rank is None else slice(4 * rank, 4 * rank + 4))
        self.seq = Part(1, None if rank is None else SEQ_SPLIT[rank])
        self.rep = Scale(1.5 if rank is not None and rank == bug_rank else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.col(x)
        self.seq(x)
        return self.rep(x)


def _run(model: nn.Module, path, stats: str, *, side: str = "port") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with attach(model, side=side, config=TraceConfig(stats=stats, sample_size=20), output=path):
        with torch.no_grad():
            for step in range(2):
                with trace_step(step):
                    model(torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(step)))


def record_ranks(tmp_path, monkeypatch, *, stats="abs_mean,sum,min,max,sample,full", bug_rank=None, name="tp"):
    """Each simulated rank traces into ``tmp_path/name/tp.h5``, which the recorder names ``tp-rank<r>.h5``."""
    folder = tmp_path / name
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))
    for rank in range(WORLD):
        monkeypatch.setenv("RANK", str(rank))
        _run(Toy(rank, bug_rank=bug_rank), folder / "tp.h5", stats)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    return folder


def record_reference(tmp_path, stats="abs_mean,sum,min,max,sample,full"):
    path = tmp_path / "ref.h5"
    _run(Toy(), path, stats, side="ref")
    return path


def by_key(trace):
    cols = trace.records.columns
    names = trace.record_modules()
    return {
        (names[i], int(cols["step"][i]), int(cols["call"][i]), trace.records.label_of(i)): i
        for i in range(len(trace.records))
    }


def test_recorder_names_each_rank_file_and_records_the_layout(tmp_path, monkeypatch):
    folder = record_ranks(tmp_path, monkeypatch)
    assert sorted(p.name for p in folder.iterdir()) == ["tp-rank0.h5", "tp-rank1.h5"]
    with open_trace(folder / "tp-rank1.h5") as trace:
        assert (trace.meta["rank"], trace.meta["world_size"]) == (1, 2)
        assert trace.meta["process_groups"] == {"world": [0, 1]}
        assert trace.meta["hostname"]


def test_merged_moments_samples_and_full_equal_the_unsharded_trace(tmp_path, monkeypatch):
    folder = record_ranks(tmp_path, monkeypatch)
    with open_trace(record_reference(tmp_path)) as ref:
        merged = load_trace(folder, like=ref)
        assert merged.meta["merge"]["sharded"] == 4  # col and seq, two steps
        assert merged.meta["merge"]["rank_mismatches"] == 0
        assert merged.meta["merge"]["assumed_replicated"] == 0
        ref_keys, merged_keys = by_key(ref), by_key(merged)
        assert ref_keys.keys() == merged_keys.keys()
        for key, i in ref_keys.items():
            j = merged_keys[key]
            assert merged.records.shape_of(j) == ref.records.shape_of(i), key
            for name in ("numel", "nan_count", "inf_count", "min", "max"):
                assert merged.records.columns[name][j] == ref.records.columns[name][i], (key, name)
            for name in ("sum", "abs_sum", "sumsq"):
                np.testing.assert_allclose(
                    merged.records.columns[name][j], ref.records.columns[name][i], rtol=1e-12, err_msg=str(key)
                )
            np.testing.assert_array_equal(merged.sample(j), ref.sample(i))  # recomputed from the full tensors
            np.testing.assert_array_equal(merged.full(j), ref.full(i))
        col = merged_keys[("col", 0, 0, "out")]
        seq = merged_keys[("seq", 0, 0, "out")]
        assert int(merged.ranks.shard_dim[col]) == 2 and merged.ranks.shard_sizes[col].tolist() == [4, 4]
        assert int(merged.ranks.shard_dim[seq]) == 1 and merged.ranks.shard_sizes[seq].tolist() == [4, 2]
        result = diff_traces(ref, merged, align(ref, merged))
        assert result, result.first_drift


def test_equal_shapes_without_reference_are_taken_as_replicated_unless_declared(tmp_path, monkeypatch):
    folder = record_ranks(tmp_path, monkeypatch)
    guessed = load_trace(folder)
    assert guessed.meta["merge"]["assumed_replicated"] >= 2
    # the even 'col' split looks replicated and its copies differ: a (false) mismatch, hence the declaration
    flagged = {guessed.record_modules()[r] for r in guessed.ranks.mismatch_record}
    assert flagged == {"col"}
    # the uneven split is found from the shapes alone
    seq = by_key(guessed)[("seq", 0, 0, "out")]
    assert guessed.records.shape_of(seq) == (2, 6, 8)
    declared = load_trace(folder, shard_dims={r"^col$": -1})
    assert len(declared.ranks.mismatch_record) == 0
    col = by_key(declared)[("col", 1, 0, "out")]
    assert declared.records.shape_of(col) == (2, 6, 8)
    assert declared.meta["merge"]["declared"] == [r"^col$=-1"]


def test_sharded_samples_are_dropped_without_full_tensors(tmp_path, monkeypatch):
    folder = record_ranks(tmp_path, monkeypatch, stats="abs_mean,sample")
    with open_trace(record_reference(tmp_path, stats="abs_mean,sample")) as ref:
        merged = load_trace(folder, like=ref)
        keys = by_key(merged)
        assert merged.sample(keys[("col", 0, 0, "out")]) is None
        assert merged.sample(keys[("seq", 1, 0, "out")]) is None
        rep = ref.sample(by_key(ref)[("rep", 0, 0, "out")])
        np.testing.assert_array_equal(merged.sample(keys[("rep", 0, 0, "out")]), rep)
        assert merged.meta["merge"]["samples_dropped"] == 4
        # abs_mean still merges exactly, so the stats-only diff passes
        assert diff_traces(ref, merged, align(ref, merged))


def test_a_replicated_tensor_that_differs_on_one_rank_is_a_finding_with_its_rank(tmp_path, monkeypatch):
    folder = record_ranks(tmp_path, monkeypatch, bug_rank=1)
    with open_trace(record_reference(tmp_path)) as ref:
        merged = load_trace(folder, like=ref)
        names = merged.record_modules()
        assert {names[r] for r in merged.ranks.mismatch_record} == {"rep", ""}  # rep, then the model's output
        assert set(merged.ranks.mismatch_rank.tolist()) == {1}
        result = diff_traces(ref, merged, align(ref, merged))
        first = result.first_drift
        assert first is not None and first.kind == "rank_mismatch"
        assert (first.port, first.step) == ("rep", 0)
        assert "rank 1 disagrees with rank 0" in first.message
        # the merged record holds rank 0's (correct) values: no drift at the same record
        assert result.counts["rank_mismatch"] == 4 and result.counts["drift"] == 0


def test_merge_file_round_trip_and_show(tmp_path, monkeypatch, capsys):
    folder = record_ranks(tmp_path, monkeypatch, bug_rank=1)
    ref_path = record_reference(tmp_path)
    out = tmp_path / "merged.h5"
    merged = merge_files(sorted(folder.iterdir()), out, reference=ref_path)
    with open_trace(out) as back:
        assert back.ranks is not None and back.ranks.ranks == [0, 1]
        for name in ("shard_dim", "shard_sizes", "base_rank", "mismatch_record", "mismatch_rank", "mismatch_check"):
            np.testing.assert_array_equal(getattr(back.ranks, name), getattr(merged.ranks, name))
        for name, column in merged.records.columns.items():
            np.testing.assert_array_equal(back.records.columns[name], column, err_msg=name)
        for i in range(len(back.records)):
            for got, want in ((back.sample(i), merged.sample(i)), (back.full(i), merged.full(i))):
                assert (got is None) == (want is None)
                if got is not None:
                    np.testing.assert_array_equal(got, want)
        assert back.meta["merged_ranks"] == [0, 1] and "rank" not in back.meta
        assert back.complete
        with pytest.raises(MergeError, match="already a merged trace"):
            merge_traces([back])
    assert main(["show", str(out)]) == 0
    # merging writes through a temporary file: nothing else is left next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.h5", "ref.h5", "tp"]
    capsys.readouterr()


def test_cli_merge_exit_codes_and_summary(tmp_path, monkeypatch, capsys):
    clean = record_ranks(tmp_path, monkeypatch, name="clean")
    buggy = record_ranks(tmp_path, monkeypatch, name="buggy", bug_rank=1)
    ref = record_reference(tmp_path)
    assert main(["merge", str(clean / "tp-rank0.h5"), str(clean / "tp-rank1.h5"), "-o", str(tmp_path / "c.h5"),
                 "--like", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "merged ranks 0, 1 of 2" in out and "4 sharded" in out
    assert main(["merge", str(clean), "-o", str(tmp_path / "guess.h5")]) == 1
    out = capsys.readouterr().out
    assert "taken as replicated; give --like" in out and "col step 0" in out
    assert main(["merge", str(buggy / "*.h5"), "-o", str(tmp_path / "b.h5"), "--like", str(ref)]) == 1
    out = capsys.readouterr().out
    assert "rank mismatch: 4 replicated records" in out
    assert "rep step 0 call 0 tensor out: replicated tensor differs across ranks: rank 1" in out


def test_first_drift_on_a_folder_names_the_rank(tmp_path, monkeypatch, capsys):
    buggy = record_ranks(tmp_path, monkeypatch, name="buggy", bug_rank=1)
    ref = record_reference(tmp_path)
    assert main(["first-drift", str(ref), str(buggy)]) == 1
    out = capsys.readouterr().out
    assert "\nfirst drift: rep (upstream rep), step 0, call 0, tensor out: rank mismatch: " in "\n" + out
    assert "rank 1 disagrees with rank 0" in out
    assert "port: merged ranks 0, 1 of 2" in out
    # the merged side can be the reference too, and a declaration works from the command line
    clean = record_ranks(tmp_path, monkeypatch, name="clean")
    assert main(["first-drift", str(clean), str(ref), "--shard-dim", "col=2"]) == 0
    assert "upstream: merged ranks 0, 1 of 2" in capsys.readouterr().out


def test_merge_refuses_what_is_not_one_runs_ranks(tmp_path, monkeypatch):
    folder = record_ranks(tmp_path, monkeypatch)
    again = record_ranks(tmp_path, monkeypatch, name="again")
    ref = record_reference(tmp_path)
    with pytest.raises(MergeError, match="two traces of rank 0"):
        merge_files([folder / "tp-rank0.h5", again / "tp-rank0.h5"], tmp_path / "x.h5")
    with pytest.raises(MergeError, match="different world sizes"):
        merge_files([folder / "tp-rank0.h5", ref], tmp_path / "x.h5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    _run(Toy(1), tmp_path / "other" / "ref.h5", "abs_mean", side="ref")
    with pytest.raises(MergeError, match=r"different sides \(port, ref\)"):
        merge_files([folder / "tp-rank0.h5", tmp_path / "other" / "ref-rank1.h5"], tmp_path / "x.h5")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    _run(Toy(1), tmp_path / "w4" / "tp.h5", "abs_mean")
    with pytest.raises(MergeError, match="different world sizes"):
        merge_files([folder / "tp-rank0.h5", tmp_path / "w4" / "tp-rank3.h5"], tmp_path / "x.h5")
    with pytest.raises(MergeError, match="dimension 3 does not exist in 'col' out of shape"):
        load_trace(folder, shard_dims=["col=3"])
    with pytest.raises(MergeError, match="not a valid Python regex"):
        parse_shard_dims(["(=1"])
    with pytest.raises(MergeError, match="is not a dimension"):
        parse_shard_dims({"col": "two"})
    with pytest.raises(MergeError, match="is not REGEX=DIM"):
        parse_shard_dims(["col"])
    assert [r.dim for r in parse_shard_dims(["a=b=1", "norm=replicated"])] == [1, None]
    with pytest.raises(MergeError, match="replica_rtol=-1.0 must be a number >= 0"):
        merge_traces([], replica_rtol=-1.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a trace\n")
    with pytest.raises(TraceFormatError, match="a folder without trace files"):
        load_trace(empty)
    with pytest.raises(TraceFormatError, match="no file matches this pattern"):
        load_trace(tmp_path / "nothing-*.h5")


def test_cli_merge_errors_are_one_line(tmp_path, monkeypatch, capsys):
    folder = record_ranks(tmp_path, monkeypatch)
    assert main(["merge", str(folder), "-o", str(tmp_path / "m.h5"), "--shard-dim", "col"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shard-dim='col' is not REGEX=DIM" in err[0]
    assert main(["first-drift", str(tmp_path / "none-*.h5"), str(folder)]) == 2
    assert "no file matches this pattern" in capsys.readouterr().err


def test_write_trace_refuses_an_unwritable_path(tmp_path, monkeypatch):
    folder = record_ranks(tmp_path, monkeypatch)
    merged = load_trace(folder, shard_dims={"col": 2})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(MergeError, match="cannot write the merged trace"):
        write_trace(merged, blocker / "m.h5")


def test_a_damaged_ranks_group_is_refused(tmp_path, monkeypatch):
    folder = record_ranks(tmp_path, monkeypatch)
    out = tmp_path / "m.h5"
    merge_files(sorted(folder.iterdir()), out, shard_dims={"col": 2})
    with h5py.File(out, "a") as handle:
        del handle["ranks/shard_dim"]
    with pytest.raises(TraceFormatError, match="damaged /ranks group"):
        open_trace(out)


# -- recorder side: which ranks trace, where, with what metadata ----------------------------


def test_ranks_variable_limits_which_ranks_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(ENV_RANKS, "1")
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        config = TraceConfig.from_env(enabled=True, stats="abs_mean")
        handle = attach(Toy(rank), config=config, output=tmp_path / "t.h5")
        assert handle.enabled == (rank == 1)
        handle.close()
    assert [p.name for p in tmp_path.iterdir()] == ["t-rank1.h5"]
    with open_trace(tmp_path / "t-rank1.h5") as trace:
        assert trace.config["ranks"] == [1]


def test_ranks_variable_errors(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_RANKS_FASTVIDEO, "0-1")
    assert TraceConfig.from_env().ranks == frozenset({0, 1})
    monkeypatch.setenv(ENV_RANKS, "0")
    with pytest.raises(TraceConfigError, match=f"{ENV_RANKS}='0' and {ENV_RANKS_FASTVIDEO}='0-1' disagree"):
        TraceConfig.from_env()
    monkeypatch.setenv(ENV_RANKS, "0,1")
    assert TraceConfig.from_env().ranks == frozenset({0, 1})
    monkeypatch.delenv(ENV_RANKS_FASTVIDEO)
    monkeypatch.setenv(ENV_RANKS, "0,x")
    with pytest.raises(TraceConfigError, match=f"{ENV_RANKS}='0,x' has invalid item 'x'; use rank indices"):
        TraceConfig.from_env()
    monkeypatch.setenv(ENV_RANKS, "0,3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TraceConfigError, match=f"{ENV_RANKS}='0,3' names rank 3, but the world size is 2"):
        attach(Toy(0), config=TraceConfig.from_env(enabled=True), output=tmp_path / "t.h5")


def test_rank_placeholder_and_process_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with attach(Toy(1), config=TraceConfig(stats="abs_mean"), output=tmp_path / "r<rank>.h5",
                process_groups={"tp": [0, 1], "dp": [1]}) as handle:
        assert handle.path == tmp_path / "r1.h5"
    with open_trace(tmp_path / "r1.h5") as trace:
        assert trace.meta["process_groups"] == {"world": [0, 1], "tp": [0, 1], "dp": [1]}
    with pytest.raises(TraceConfigError, match=r"process_groups\['tp'\] = \[0\] does not contain this process's rank"):
        attach(Toy(1), config=TraceConfig(), output=tmp_path / "x.h5", process_groups={"tp": [0]})
    with pytest.raises(TraceConfigError, match="neither a list of ranks nor a process group"):
        attach(Toy(1), config=TraceConfig(), output=tmp_path / "x.h5", process_groups={"tp": "0,1"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with attach(Toy(), config=TraceConfig(), output=tmp_path / "single.h5") as handle:
        assert handle.path == tmp_path / "single.h5"  # one rank: the name stays as given


def test_public_names():
    assert tracediff.MergeError is MergeError
