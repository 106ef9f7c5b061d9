"""Merge the per-rank traces of a tensor-/sequence-parallel run into one trace of the whole model.

Under ``torch.distributed`` every rank writes its own trace. A record of one
``(module, step, call, tensor)`` then exists once per rank, and is either

* **sharded**: each rank holds a slice of the tensor along one dimension (the
  output of a column-parallel linear, a sequence-parallel activation). The
  merged record is the concatenation, in rank order. Its moments combine
  exactly from the mergeable ones: sums, absolute sums, sums of squares and
  counts add, min and max combine. ``full`` tensors are concatenated and the
  ``sample`` is recomputed from them; without full tensors a sharded record's
  sample is dropped (the positions of the unsharded sample are not in any
  shard's sample) and the merged trace says how many were.
* **replicated**: every rank holds the same tensor (after an all-reduce, a
  replicated norm). The merged record carries the lowest rank's values, and
  every other rank's copy is checked against it; a copy that differs is a
  *rank mismatch*, itself a finding (``first-drift`` reports it with the rank).

Which one a record is comes from, strongest first: a declaration per module
regex (``--shard-dim REGEX=DIM``, or ``REGEX=replicated``); shapes that differ
across ranks (the one dimension that differs); the shape of the same record on
the unsharded side (``reference``): equal means replicated, one dimension
``world_size`` times larger means sharded along it. With none of these an
equal-shaped record is taken as replicated. See docs/distributed.md.
"""

from __future__ import annotations

from tracediff.merge.files import load_merged, merge_files, merge_paths, write_trace
from tracediff.merge.merger import merge_traces
from tracediff.merge.rules import DEFAULT_REPLICA_RTOL, NameMap, ShardDims, ShardRule, parse_shard_dims

__all__ = [
    "DEFAULT_REPLICA_RTOL",
    "NameMap",
    "ShardDims",
    "ShardRule",
    "load_merged",
    "merge_files",
    "merge_paths",
    "merge_traces",
    "parse_shard_dims",
    "write_trace",
]
