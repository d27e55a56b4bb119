"""Configuration vocabulary that hop kinds and the scenario share: durations, JSON paths."""

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


JsonPath = tuple[str | int, ...]
_PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\[\"([^\"]*)\"\]|\['([^']*)'\]")


def compile_path(text: str) -> JsonPath:
    """The steps of a path like ``$.meta.trace_id`` or ``$.items[0]["trace-id"]``."""
    if not text.startswith("$"):
        raise ValueError(f"{text!r} is not a path: a path starts with '$', like $.meta.trace_id")
    steps: list[str | int] = []
    position = 1
    while position < len(text):
        match = _PATH_STEP.match(text, position)
        if not match:
            raise ValueError(
                f'{text!r} is not a path: at {text[position:]!r} expected .name, [index] or ["key"]'
            )
        name, index, dq, sq = match.groups()
        steps.append(
            int(index) if index is not None else next(s for s in (name, dq, sq) if s is not None)
        )
        position = match.end()
    return tuple(steps)


def _path_input(value: Any) -> Any:
    if isinstance(value, str):
        compile_path(value)
    return value


PathText = Annotated[
    str,
    BeforeValidator(_path_input),
    WithJsonSchema({"type": "string", "pattern": r"^\$", "examples": ["$.meta.trace_id"]}),
]
"""A JSON path as written in the scenario (checked, kept as text for messages)."""
