"""The result of aligning two traces: which upstream module is which port module.

This is the contract between the aligner (:mod:`tracediff.align.aligner`, which builds
an :class:`Alignment`) and everything downstream (differ, bisection, reports),
kept in its own small module so neither side reaches into the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

#: Containers that only hold modules and have no forward: never called, never a module's counterpart.
NEVER_CALLED = frozenset({"ModuleList", "ModuleDict", "ParameterList", "ParameterDict"})

#: Where a pair came from, strongest first.
Source = Literal["root", "map", "param_map", "fingerprint", "values", "name", "structure"]
SOURCES: tuple[str, ...] = ("root", "map", "param_map", "fingerprint", "values", "name", "structure")


@dataclass(frozen=True)
class Pair:
    """One upstream module that computes what one port module computes.

    Attributes:
        upstream: module name in the upstream model (``""`` is the model itself).
        port: module name in the port.
        source: which evidence paired them, see :data:`SOURCES`.
        confidence: 0..1; explicit mappings are 1.0, structural guesses lower.
        note: why the aligner chose this pair when that is not obvious from
            ``source`` alone (tie broken by order, paired through its children, ...).
    """

    upstream: str
    port: str
    source: str
    confidence: float
    note: str = ""


@dataclass(frozen=True)
class Group:
    """Several modules on one side matching one (or several) on the other.

    The classic case is a fused upstream ``qkv`` against the port's ``to_q``,
    ``to_k``, ``to_v``: their outputs are not comparable one to one, but the
    group is reported so nobody thinks those modules were forgotten.
    """

    upstream: tuple[str, ...]
    port: tuple[str, ...]
    source: str
    note: str = ""


@dataclass(frozen=True)
class Suspect:
    """A pairing the traced values contradict: shown beside the report, never a finding.

    Attributes:
        upstream, port: the two modules that order and shape alone would have paired.
        distance: relative distance of their first outputs.
        reason: one line saying what was seen.
    """

    upstream: str
    port: str
    distance: float
    reason: str
    #: what to put in a mapping file to settle it, when a plain pair is not the answer
    map_line: str = ""

    def hint(self) -> str:
        """The mapping-file line that pairs them anyway, if they are the same module after all."""
        return self.map_line or f'[pairs] "{self.upstream}" = "{self.port}"'

    def to_dict(self) -> dict[str, object]:
        """Plain JSON types (an infinite distance becomes ``None``)."""
        distance = self.distance if math.isfinite(self.distance) else None
        return {"upstream": self.upstream, "port": self.port, "distance": distance, "reason": self.reason,
                "map_line": self.hint()}


@dataclass
class Alignment:
    """All pairs, many-to-one groups, and what stayed unmatched on each side.

    ``notes`` carries findings that are worth a look but are not errors (a
    parameter-map rule that matched nothing in this model, for instance).
    """

    pairs: list[Pair] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    unmatched_upstream: list[str] = field(default_factory=list)
    unmatched_port: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: pairs that order and shape proposed and the values contradicted (left unpaired)
    suspects: list[Suspect] = field(default_factory=list)

    def port_for(self, upstream: str) -> str | None:
        return self._by_upstream().get(upstream)

    def upstream_for(self, port: str) -> str | None:
        return self._by_port().get(port)

    def _by_upstream(self) -> dict[str, str]:
        return {pair.upstream: pair.port for pair in self.pairs}

    def _by_port(self) -> dict[str, str]:
        return {pair.port: pair.upstream for pair in self.pairs}
