"""Pairing by order between anchors: the weakest evidence, used last.

Pairs already found (by name or by weights) are anchors. Between two
consecutive anchors, the modules still unpaired on each side ran (or were
defined) in the same stretch of the model, so they are matched in order, one
class of look-alikes at a time (same output shapes, or same weights for ties
between identical tensors). A class is paired only when both sides hold the
same number of its members in that stretch and order matched them all;
anything less is ambiguous and stays unmatched rather than guessed.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class OrderedPair:
    """A pair found by order, with the size of its class in its stretch (1 = no look-alike)."""

    upstream: int
    port: int
    class_size: int


def monotone_anchors(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The longest chain of anchors increasing in both orders.

    Anchors that cross (a pair that ran early on one side and late on the other)
    would make stretches overlap; dropping the fewest of them keeps the rest usable.
    """
    ordered = sorted(set(points), key=lambda p: (p[0], -p[1]))
    tails: list[float] = []
    tail_index: list[int] = []
    previous = [-1] * len(ordered)
    for i, (_, y) in enumerate(ordered):
        k = bisect.bisect_left(tails, y)
        if k == len(tails):
            tails.append(y)
            tail_index.append(i)
        else:
            tails[k] = y
            tail_index[k] = i
        previous[i] = tail_index[k - 1] if k > 0 else -1
    chain: list[tuple[float, float]] = []
    i = tail_index[-1] if tail_index else -1
    while i >= 0:
        chain.append(ordered[i])
        i = previous[i]
    return chain[::-1]


def pair_by_order(
    upstream: dict[int, float],
    port: dict[int, float],
    anchors: list[tuple[float, float]],
    key_upstream: Callable[[int], Hashable],
    key_port: Callable[[int], Hashable],
) -> list[OrderedPair]:
    """Match unpaired modules stretch by stretch, in order, within classes of equal key.

    Args:
        upstream: candidate upstream module -> its position in upstream order.
        port: candidate port module -> its position in port order.
        anchors: ``(upstream position, port position)`` of modules already paired.
        key_upstream: class of an upstream candidate; only equal keys may pair.
        key_port: class of a port candidate.

    Returns:
        The accepted pairs, in upstream order.
    """
    chain = monotone_anchors(anchors)
    xs = [x for x, _ in chain]
    ys = [y for _, y in chain]
    up_segments: dict[int, list[int]] = defaultdict(list)
    port_segments: dict[int, list[int]] = defaultdict(list)
    for module, position in sorted(upstream.items(), key=lambda item: item[1]):
        up_segments[bisect.bisect_right(xs, position)].append(module)
    for module, position in sorted(port.items(), key=lambda item: item[1]):
        port_segments[bisect.bisect_right(ys, position)].append(module)
    found: list[OrderedPair] = []
    for segment, ups in sorted(up_segments.items()):
        ports = port_segments.get(segment, [])
        if ports:
            found += _pair_segment(ups, ports, [key_upstream(u) for u in ups], [key_port(p) for p in ports])
    return found


def pair_by_rank(
    upstream: dict[int, float],
    port: dict[int, float],
    key_upstream: Callable[[int], Hashable],
    key_port: Callable[[int], Hashable],
) -> list[OrderedPair]:
    """Match each class of look-alikes by rank, independently of the other classes.

    Used where order is only trusted within a class (definition order inside
    one parent): the k-th upstream member pairs with the k-th port member, and
    only when both sides have the same number of members.
    """
    up_classes: dict[Hashable, list[int]] = defaultdict(list)
    port_classes: dict[Hashable, list[int]] = defaultdict(list)
    for module, _ in sorted(upstream.items(), key=lambda item: item[1]):
        key = key_upstream(module)
        if key is not None:
            up_classes[key].append(module)
    for module, _ in sorted(port.items(), key=lambda item: item[1]):
        key = key_port(module)
        if key is not None:
            port_classes[key].append(module)
    found = []
    for key, ups in up_classes.items():
        ports = port_classes.get(key, [])
        if len(ports) == len(ups):
            found += [OrderedPair(u, p, len(ups)) for u, p in zip(ups, ports, strict=True)]
    return sorted(found, key=lambda item: upstream[item.upstream])


def _pair_segment(
    ups: list[int], ports: list[int], up_keys: list[Hashable], port_keys: list[Hashable]
) -> list[OrderedPair]:
    """Longest common subsequence of the two key sequences, kept per class only when complete."""
    n, m = len(ups), len(ports)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, below = table[i], table[i + 1]
        for j in range(m - 1, -1, -1):
            if up_keys[i] is not None and up_keys[i] == port_keys[j]:
                row[j] = below[j + 1] + 1
            else:
                row[j] = max(below[j], row[j + 1])
    matched: list[tuple[int, int]] = []
    i = j = 0
    while i < n and j < m:
        if up_keys[i] is not None and up_keys[i] == port_keys[j] and table[i][j] == table[i + 1][j + 1] + 1:
            matched.append((i, j))
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    up_count, port_count = Counter(up_keys), Counter(port_keys)
    matched_count = Counter(up_keys[i] for i, _ in matched)
    return [
        OrderedPair(ups[i], ports[j], up_count[up_keys[i]])
        for i, j in matched
        if up_count[up_keys[i]] == port_count[up_keys[i]] == matched_count[up_keys[i]]
    ]
