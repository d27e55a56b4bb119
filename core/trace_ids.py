"""Trace ids and the run ids they derive from.

A trace id is 32 lowercase hex characters, a W3C trace-id. A value in W3C ``traceparent``
form (``00-<trace-id>-<span-id>-01``) yields its trace-id part, and 16 bytes (MQTT 5
Correlation Data) their hex form. All zeros is invalid (W3C).

Every run has a run id, random unless given; a signal's trace id derives from the seed
and the run id, so the same seed and run id replay a run exactly and two runs against
one broker never claim each other's signals.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_RUN_ID = re.compile(RUN_ID_PATTERN)


def new_run_id() -> str:
    """A random run id: 16 hex characters (64 bits)."""
    return secrets.token_hex(8)


def check_run_id(text: str) -> str:
    """``text`` if it is a valid run id, else ValueError saying what one looks like."""
    if not _RUN_ID.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a run id: 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return text


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
