"""Printed floating-point numbers, read back as numbers.

A number computed by a reduction or a matmul can differ in its last bits from one CPU to another (the
vector width picks the summation order), so a test compares the number a line prints with a tolerance and
the rest of the line exactly, never the printed digits.
"""

from __future__ import annotations

import re

#: a printed float: a decimal point or an exponent, not part of a dotted name (``blocks.2.ffn``)
FLOAT = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*(?:e[-+]?\d+)?|\d+e[-+]?\d+)(?![\w.])")
NUMBER = re.compile(r"[-+]?(?:inf|nan|\d+(?:\.\d*)?(?:e[-+]?\d+)?)")


def mask_floats(text: str) -> str:
    """``text`` with every printed float replaced by ``#``: the structure a test can compare exactly."""
    return FLOAT.sub("#", text)


def number_after(text: str, label: str) -> float:
    """The number printed right after the first ``label`` in ``text``."""
    assert label in text, f"{label!r} not in {text!r}"
    match = NUMBER.match(text.split(label, 1)[1])
    assert match, f"no number after {label!r} in {text!r}"
    return float(match.group())
