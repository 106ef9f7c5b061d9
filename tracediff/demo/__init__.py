"""Bundled demo: a Wan-style upstream DiT, an independently written port, and planted bugs.

``python -m tracediff run`` uses this pair when no model is given; the tests use it
as the ground truth for alignment, diffing and bisection.
"""

from tracediff.demo.convert import PARAM_NAMES_MAPPING, ConversionError, convert_state_dict
from tracediff.demo.models import (
    BUGS,
    DEFAULT_BUG,
    BugSpec,
    DemoConfig,
    make_inputs,
    make_port,
    make_upstream,
    plant_bug,
)

__all__ = [
    "BUGS",
    "DEFAULT_BUG",
    "PARAM_NAMES_MAPPING",
    "BugSpec",
    "ConversionError",
    "DemoConfig",
    "convert_state_dict",
    "make_inputs",
    "make_port",
    "make_upstream",
    "plant_bug",
]
