"""Find a signal's trace id in what an observer saw: a JSON body, a property, a header.

A trace id is 32 lowercase hex characters (a W3C trace-id); a value in W3C ``traceparent``
form (``00-<trace-id>-<span-id>-01``) yields its trace-id part, and 16 bytes of MQTT 5
Correlation Data their hex form. Anything else is a trace id of the wrong shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

from fleetprobe.core.trace_ids import normalize_trace_id
from fleetprobe.probes.json_paths import JsonPath, compile_path

MISSING: Final = object()
"""What :func:`lookup` returns when the path does not exist in the body."""

# Bounded reasons for what could not be matched; they become metric labels.
NOT_JSON = "not_json"
NO_TRACE_ID = "no_trace_id"
BAD_TRACE_ID = "bad_trace_id"
UNKNOWN_TRACE_ID = "unknown_trace_id"
RETAINED = "retained"
LATE = "late"
TOO_LARGE = "too_large"  # a message over transport.mqtt.MAX_MESSAGE_BYTES, not kept


def lookup(body: Any, steps: JsonPath) -> Any:
    """The value at ``steps`` inside a parsed JSON body, or :data:`MISSING`."""
    node = body
    for step in steps:
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                return MISSING
        elif not isinstance(node, dict) or step not in node:
            return MISSING
        node = node[step]
    return node


def parse_json(payload: bytes) -> Any:
    """The parsed body, or :data:`MISSING` when it is not UTF-8 JSON."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return MISSING


DEFAULT_PATH = "$.trace_id"


class TraceIdReader:
    """Where a hop finds the trace id: a path into the JSON body (``$.trace_id`` unless
    told), or a named pair (an MQTT 5 user property, an HTTP header)."""

    __slots__ = ("_name", "_steps")

    def __init__(self, path: str | None = None, name: str | None = None) -> None:
        if path is not None and name is not None:
            raise ValueError("a trace id is read from a path or from a name, not both")
        self._name = name or ""
        self._steps = None if name else compile_path(path or DEFAULT_PATH)

    def read(self, body: Any, pairs: Iterable[tuple[str, str]]) -> str:
        """The trace id; raises :class:`Unmatched` with the reason when there is none."""
        if self._steps is not None:
            return from_body(body, self._steps)
        return from_pairs(pairs, self._name)


def one_source(trace_id: str | None, name: str | None, key: str) -> None:
    """Raise ValueError when a hop's config gives both ``trace_id`` and ``key`` (``name``)."""
    if trace_id is not None and name is not None:
        raise ValueError(f"give the trace id by one of trace_id or {key}, not both")


def from_body(body: Any, steps: JsonPath) -> str:
    """The trace id at ``steps`` in a parsed body; raises :class:`Unmatched` otherwise."""
    if body is MISSING:
        raise Unmatched(NOT_JSON)
    return _checked(lookup(body, steps))


def from_pairs(pairs: Iterable[tuple[str, str]], name: str) -> str:
    """The trace id in the first pair called ``name`` (case-insensitive for headers)."""
    wanted = name.lower()
    for key, value in pairs:
        if key.lower() == wanted:
            return _checked(value)
    raise Unmatched(NO_TRACE_ID)


def _checked(value: Any) -> str:
    if value is MISSING or value is None:
        raise Unmatched(NO_TRACE_ID)
    trace_id = normalize_trace_id(value)
    if trace_id is None:
        raise Unmatched(BAD_TRACE_ID)
    return trace_id


class Unmatched(Exception):
    """A message that cannot be matched to a signal; ``reason`` is a bounded label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
