"""Trace ids: 32 lowercase hex characters, a W3C trace-id.

A value in W3C ``traceparent`` form (``00-<trace-id>-<span-id>-01``) yields its trace-id
part, and 16 bytes (MQTT 5 Correlation Data) their hex form. All zeros is invalid (W3C).
"""

from __future__ import annotations

import re
from typing import Any

_INVALID_TRACE_ID = "0" * 32
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def normalize_trace_id(value: Any) -> str | None:
    """The 32-hex trace id in ``value``, or None when it has the wrong shape."""
    if isinstance(value, bytes | bytearray):
        found = value.hex() if len(value) == 16 else None
    elif isinstance(value, str):
        text = value.strip().lower()
        if len(text) == 32 and _TRACE_ID.fullmatch(text):
            found = text
        else:
            match = _TRACEPARENT.fullmatch(text)
            found = match.group(1) if match else None
    else:
        found = None
    return None if found == _INVALID_TRACE_ID else found  # all zeros is invalid (W3C)
