"""Durations as the scenario writes them (``250ms``, ``1.5s``, ``5m``, ``2h``), in seconds."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_PATTERN = r"^(\d+(\.\d*)?|\.\d+)(ms|s|m|h)$"


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``250ms``, ``1.5s``, ``5m`` or ``2h``."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit (ms, s, m, h),"
            " like 250ms or 1.5s"
        )
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _duration_input(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(
            f"{str(value).lower()} is not a duration: write a number and a unit (ms, s, m, h),"
            " like 250ms or 1.5s"
        )
    if isinstance(value, int | float):
        raise ValueError(
            f"{value} has no unit: write a number and a unit, like {value}s or {value}ms"
        )
    return value  # let the float validator report the type


Duration = Annotated[
    float,
    BeforeValidator(_duration_input),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["250ms", "1.5s"]}),
]
"""A duration in the scenario, validated into seconds."""
