"""In-memory view of one traced side: records as numpy columns plus metadata.

Both the HDF5 reader and the FastVideo JSONL importer produce a :class:`Trace`,
so aligner and differ never care where the numbers came from. Records stay
column-wise (one numpy array per field) so a million of them cost a few
arrays, not a million Python objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tracediff.errors import TraceFormatError
from tracediff.moments import DERIVED_STATS
from tracediff.store.format import FULL_NONE, MAX_DIMS

#: Elements per parameter kept in the fingerprint sample.
FINGERPRINT_SAMPLE = 32


@dataclass(frozen=True)
class ParamEntry:
    """One parameter or buffer owned directly by a module."""

    module_index: int
    name: str
    kind: str  # "parameter" or "buffer"
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ModuleTable:
    """Every module of a model in ``named_modules()`` order, with its own tensors."""

    names: list[str]
    classes: list[str]
    params: list[ParamEntry]
    #: ``(len(params), MOMENT_COUNT)`` moments, laid out as :data:`tracediff.moments.MOMENT_NAMES`.
    param_moments: np.ndarray
    #: ``(len(params), FINGERPRINT_SAMPLE)`` values at fixed positions (NaN-padded).
    param_samples: np.ndarray
    #: same positions read from the transposed tensor (2-D tensors only, else NaN).
    param_samples_t: np.ndarray


#: What a rank-mismatch entry found different, see :class:`RankLayout`.
MISMATCH_CHECKS = ("shape", "dtype", "nonfinite", "sum", "abs_sum", "sumsq", "min", "max", "sample", "full")


@dataclass
class RankLayout:
    """How a merged trace's records were combined from per-rank traces (docs/distributed.md).

    Attributes:
        ranks: the ranks merged, ascending; ``shard_sizes`` columns follow this order.
        world_size: the world size the ranks ran in.
        shard_dim: per record, the dimension its shards were concatenated along,
            ``-1`` when the tensor is replicated (or only one rank recorded it).
        shard_sizes: ``(N, len(ranks))`` each rank's size along ``shard_dim`` (0 where
            the rank has no shard or the record is replicated).
        mismatch_record, mismatch_rank, mismatch_check, mismatch_value: one entry per
            replicated record and rank whose copy differs from the lowest rank's:
            the record, the rank, what differed (index into :data:`MISMATCH_CHECKS`)
            and by how much (relative to the tensor's scale).
        base_rank: per record, the rank whose values a replicated record carries.
    """

    ranks: list[int]
    world_size: int
    shard_dim: np.ndarray
    shard_sizes: np.ndarray
    base_rank: np.ndarray
    mismatch_record: np.ndarray
    mismatch_rank: np.ndarray
    mismatch_check: np.ndarray
    mismatch_value: np.ndarray

    def mismatched(self, count: int) -> np.ndarray:
        """Boolean per record (``count`` records): some rank's replicated copy differs."""
        flags = np.zeros(count, dtype=bool)
        flags[self.mismatch_record] = True
        return flags

    def describe_mismatch(self, record: int) -> str:
        """One line naming the ranks whose copy of replicated record ``record`` differs."""
        at = np.flatnonzero(self.mismatch_record == record)
        if not len(at):
            return ""
        base = int(self.base_rank[record])
        parts = []
        for i in at[:4]:
            check = MISMATCH_CHECKS[int(self.mismatch_check[i])]
            value = float(self.mismatch_value[i])
            how = check if check in ("shape", "dtype", "nonfinite") else f"{check} differs by {value:.3g} (relative)"
            parts.append(f"rank {int(self.mismatch_rank[i])}: {how}")
        more = f", and {len(at) - 4} more" if len(at) > 4 else ""
        ranks = ", ".join(str(int(r)) for r in self.mismatch_rank[at])
        return (
            f"replicated tensor differs across ranks: rank{'s' if len(at) > 1 else ''} {ranks} "
            f"disagree{'' if len(at) > 1 else 's'} with rank {base} ({'; '.join(parts)}{more}); "
            f"the merged record holds rank {base}'s values"
        )

    def shard_slices(self, record: int, shape: tuple[int, ...]) -> list[tuple[int, tuple[slice, ...]]]:
        """``(rank, index)`` of every rank's shard inside the merged tensor of ``record``; empty if replicated."""
        dim = int(self.shard_dim[record])
        if dim < 0:
            return []
        out = []
        start = 0
        for column, rank in enumerate(self.ranks):
            size = int(self.shard_sizes[record, column])
            if size <= 0:
                continue
            index = tuple(slice(start, start + size) if d == dim else slice(None) for d in range(len(shape)))
            out.append((rank, index))
            start += size
        return out


class ArrayLike(Protocol):
    def __getitem__(self, item: Any) -> Any: ...


@dataclass
class Records:
    """Column store of records in execution order.

    Attributes:
        columns: name -> 1-D array, see :data:`tracediff.store.format.RECORD_COLUMNS`.
        shape: ``(N, MAX_DIMS)`` int64, padded with -1.
        labels: label table; ``columns["label"]`` indexes it.
        dtypes: dtype-name table; ``columns["dtype"]`` indexes it.
        direct: stats stored as values rather than moments (FastVideo JSONL).
    """

    columns: dict[str, np.ndarray]
    shape: np.ndarray
    labels: list[str]
    dtypes: list[str]
    direct: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.columns["seq"].shape[0])

    def shape_of(self, index: int) -> tuple[int, ...]:
        ndim = int(self.columns["ndim"][index])
        return tuple(int(d) for d in self.shape[index, :ndim])

    def label_of(self, index: int) -> str:
        return self.labels[int(self.columns["label"][index])]

    def dtype_of(self, index: int) -> str:
        return self.dtypes[int(self.columns["dtype"][index])]


@dataclass
class Trace:
    """One side's trace. Use :func:`tracediff.open_trace` to get one.

    Attributes:
        path: where it was read from.
        meta: root attributes (side, model class, versions, device, …).
        config: the tracing configuration that produced it.
        modules: module table of the traced model (may be empty for imports).
        records: the records.
        complete: False when the writer never closed the file (killed run).
        ranks: how a merged trace's records combine the ranks' (None unless merged).
    """

    path: str
    meta: dict[str, Any]
    config: dict[str, Any]
    modules: ModuleTable
    records: Records
    complete: bool = True
    samples: ArrayLike | None = None
    full_values: Mapping[int, ArrayLike] = field(default_factory=dict)
    _closer: Any = None
    #: set on a trace merged from per-rank traces (:mod:`tracediff.merge`), else None
    ranks: RankLayout | None = None

    # -- convenience -------------------------------------------------------
    @property
    def side(self) -> str:
        return str(self.meta.get("side", ""))

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in np.unique(self.records.columns["step"]))

    def module_name(self, index: int) -> str:
        return self.modules.names[index] if index >= 0 else "<unknown>"

    def record_modules(self) -> np.ndarray:
        """Module name of every record, as an object array (vectorised lookup)."""
        table = np.asarray(self.modules.names + ["<unknown>"], dtype=object)
        return table[self.records.columns["module"]]

    def record_labels(self) -> np.ndarray:
        return np.asarray(self.records.labels, dtype=object)[self.records.columns["label"]]

    def module_input_records(self) -> np.ndarray:
        """Per record: an input of a traced module other than the model itself (``inputs`` on)."""
        if not len(self.records):
            return np.zeros(0, dtype=bool)
        is_input = np.asarray([label.startswith("input") for label in self.records.labels] or [False], dtype=bool)
        root = self.modules.names.index("") if "" in self.modules.names else -1
        columns = self.records.columns
        return is_input[columns["label"]] & (columns["module"] != root)

    def has_stat(self, name: str) -> bool:
        if name in self.records.direct:
            return True
        return bool(self.meta.get("has_moments", False)) and name in DERIVED_STATS

    def stat(self, name: str) -> np.ndarray:
        """One stat for every record (NaN where unknown), derived from moments.

        ``std`` is the unbiased (Bessel-corrected) standard deviation, as
        ``torch.std`` and FastVideo's tracer compute it.
        """
        if name in self.records.direct:
            return self.records.direct[name]
        cols = self.records.columns
        count = cols["numel"].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            if name in ("sum", "min", "max"):
                return cols[name]
            if name in ("nan_count", "inf_count"):
                return cols[name].astype(np.float64)
            if name == "abs_mean":
                return cols["abs_sum"] / count
            if name == "mean":
                return cols["sum"] / count
            if name == "l2":
                return np.sqrt(cols["sumsq"])
            if name == "std":
                centred = np.maximum(cols["sumsq"] - cols["sum"] ** 2 / count, 0.0)
                return np.sqrt(centred / (count - 1.0))
        raise KeyError(f"unknown stat {name!r}; known: {', '.join(DERIVED_STATS)}")

    def sample(self, index: int) -> np.ndarray | None:
        """The ``sample`` stat's values of record ``index``, or None."""
        length = int(self.records.columns["sample_len"][index])
        if length <= 0 or self.samples is None:
            return None
        offset = int(self.records.columns["sample_offset"][index])
        return np.asarray(self.samples[offset : offset + length], dtype=np.float64)

    def full(self, index: int) -> np.ndarray | None:
        """The whole tensor of record ``index`` (shape restored), or None."""
        kind = int(self.records.columns["full_kind"][index])
        if kind == FULL_NONE or kind not in self.full_values:
            return None
        offset = int(self.records.columns["full_offset"][index])
        length = int(self.records.columns["full_len"][index])
        try:
            flat = np.asarray(self.full_values[kind][offset : offset + length])
            return flat.reshape(self.records.shape_of(index))
        except (OSError, ValueError) as exc:  # read lazily: damage in the file shows only now
            raise TraceFormatError(
                f"{self.path}: damaged trace: cannot read the full tensor of record {index} "
                f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
            ) from None

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def empty_shape(n: int) -> np.ndarray:
    return np.full((n, MAX_DIMS), -1, dtype=np.int64)
