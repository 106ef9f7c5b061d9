"""How the user says which modules are sharded: ``--shard-dim REGEX=DIM`` declarations, and module name maps.

Declarations win over every inference from shapes (:mod:`tracediff.merge.layout`), so they are parsed once, up
front, and every mistake in them is reported with the flag that carried it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tracediff.errors import MergeError

#: Relative difference above which two copies of a replicated tensor count as different.
#: Copies computed from the same inputs by the same kernels are bitwise equal; this only
#: forgives the last bits of a reduction done in another order.
DEFAULT_REPLICA_RTOL = 1e-6
_REPLICATED_WORDS = frozenset({"replicated", "r", "none"})

NameMap = Mapping[str, str] | Callable[[str], "str | None"]
ShardDims = Mapping[str, "int | str"] | Iterable["str | tuple[str, int | str]"] | None


@dataclass(frozen=True)
class ShardRule:
    """A declaration: modules whose name matches ``pattern`` are sharded along ``dim`` (None: replicated)."""

    pattern: re.Pattern[str]
    dim: int | None
    text: str


def parse_shard_dims(spec: ShardDims, *, source: str = "--shard-dim") -> list[ShardRule]:
    """Turn every accepted declaration form into rules, first match wins.

    Args:
        spec: ``{"regex": dim}``, a list of ``"REGEX=DIM"`` strings or ``(regex, dim)``
            pairs; ``dim`` is an integer (negative counts from the end) or ``replicated``.
        source: what to call the value in error messages.

    Raises:
        MergeError: a regex does not compile or a dimension is not an integer.
    """
    if spec is None:
        return []
    items: list[tuple[str, int | str]] = []
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        for item in spec:
            if isinstance(item, str):
                regex_text, sep, dim_text = item.rpartition("=")
                if not sep or not regex_text:
                    raise MergeError(f"{source}={item!r} is not REGEX=DIM; use e.g. 'fc_in$=2' or 'norm=replicated'")
                items.append((regex_text, dim_text))
            else:
                items.append((item[0], item[1]))
    rules = []
    for regex, dim in items:
        text = f"{regex}={dim}"
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise MergeError(f"{source}={text!r}: {regex!r} is not a valid Python regex ({exc})") from None
        rules.append(ShardRule(pattern, _parse_dim(dim, text, source), text))
    return rules


def as_rules(shard_dims: ShardDims | Sequence[ShardRule]) -> list[ShardRule]:
    """Rules already parsed pass through; any declaration form is parsed (:func:`parse_shard_dims`)."""
    if isinstance(shard_dims, Sequence) and not isinstance(shard_dims, str) and all(
            isinstance(v, ShardRule) for v in shard_dims):
        return [rule for rule in shard_dims if isinstance(rule, ShardRule)]
    return parse_shard_dims(shard_dims)  # type: ignore[arg-type]


def name_mapper(name_map: NameMap | None) -> Callable[[str], str | None]:
    """``name_map`` as one function: this run's module name -> the reference's (the same name without a map)."""
    if name_map is None:
        return lambda name: name
    if isinstance(name_map, Mapping):
        mapping = name_map
        return lambda name: mapping.get(name, name)
    return name_map


def _parse_dim(dim: int | str, text: str, source: str) -> int | None:
    if isinstance(dim, str) and dim.strip().lower() in _REPLICATED_WORDS:
        return None
    try:
        if isinstance(dim, bool):
            raise ValueError
        return int(dim)
    except (TypeError, ValueError):
        raise MergeError(
            f"{source}={text!r}: {dim!r} is not a dimension; use an integer (negative counts from the end) "
            "or 'replicated'"
        ) from None
