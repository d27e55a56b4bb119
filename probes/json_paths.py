"""JSON paths as hops write them (``$.meta.trace_id``), compiled into steps."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

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
